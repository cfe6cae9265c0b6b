"""The runtime guards and GPU telemetry in a one-process training run on CUDA, bf16 (benchmarks/gpu/check.sh runs
this on a lent GPU). tests/unit/test_guards.py proves the same paths on CPU; here the non-finite check's host sync
runs against CUDA streams, the skipped step must leave the fused AdamW's state untouched on the device, and the
telemetry callback writes real NVML readings into the step metrics."""

import io

import pytest
import torch

from engine.callbacks.guards import GuardCallback
from engine.run import build_trainer
from tests.distributed.ranks import StepLog
from tests.helpers import make_corpus, tiny_config

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"))


def _run(corpus, run_dir, extra, monkeypatch, fault=None):
    if fault:
        monkeypatch.setenv("HERD_FAULT", fault)
    out = io.StringIO()
    trainer = build_trainer(tiny_config(corpus, run_dir, ["train.device=cuda", "train.dtype=bf16",
                                                          "train.eval_every=0", *extra]), stream=out)
    log = StepLog(snapshot_at=2)
    trainer.callbacks.append(log)
    trainer.fit()
    monkeypatch.delenv("HERD_FAULT", raising=False)
    return trainer, log, out.getvalue()


def test_nan_gradient_on_cuda_skips_the_update_and_keeps_adam_state(corpus, tmp_path, monkeypatch):
    trainer, log, console = _run(corpus, tmp_path, ["train.steps=5"], monkeypatch, fault="nan_grad:0:3")
    print(console)
    guard = next(c for c in trainer.callbacks if isinstance(c, GuardCallback))
    assert guard.events == [{"step": 3, "kind": "nonfinite", "action": "skip", "to": None}]
    snaps = log.snapshots
    assert all(torch.equal(snaps["step2"][k], snaps["step3"][k]) for k in snaps["step2"])  # no update at step 3
    assert trainer.module.scheduler.last_epoch == 4
    optimizer = trainer.module.optimizer
    assert optimizer.defaults["fused"] is True
    steps = {float(state["step"]) for state in optimizer.state.values()}
    assert steps == {4.0}, steps  # AdamW stepped 4 times in 5 steps: the skipped one left its state alone
    assert all(torch.isfinite(p).all() for p in trainer.module.model.parameters())


def test_telemetry_readings_reach_the_step_metrics(corpus, tmp_path, monkeypatch):
    pytest.importorskip("pynvml", reason="nvidia-ml-py is not installed")
    trainer, log, console = _run(corpus, tmp_path, ["train.steps=4", "guards.telemetry_every=2"], monkeypatch)
    lines = [line for line in console.splitlines() if line.startswith("telemetry")]
    print(lines, log.rows[1], sep="\n")
    assert lines == ["telemetry: NVML, every 2 steps"]
    with_gpu = [row["step"] for row in log.rows if "gpu_sm_clock_mhz" in row]
    assert with_gpu == [2, 4]
    assert all(row["gpu_power_w"] > 20 and 5 <= row["gpu_temp_c"] <= 110 for row in log.rows if "gpu_power_w" in row)
