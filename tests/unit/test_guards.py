"""The runtime guards on one process: a skipped NaN step, the spike window, the consecutive-skip limit, stop from
the `herd` command, the check before a checkpoint is saved, the straggler verdict and its patience, GPU telemetry
against a fake NVML (and disabled on this CPU machine), and the config checks. Multi-rank agreement, rollback and
the spike and straggler runs (R9, R11) are tests/distributed/test_guards.py."""

import io
import json
import math
import sys
import types

import pytest
import torch

from engine.callbacks.guards import (NONFINITE, GuardCallback, GuardError, StepGuard, StragglerCallback, judge)
from engine.callbacks.telemetry import Telemetry, TelemetryCallback, describe
from engine.config import to_yaml
from engine.errors import ConfigError
from engine.run import build_trainer
from tests.distributed.ranks import StepLog
from tests.helpers import make_corpus, tiny_config


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"))


def run(corpus, run_dir, extra=(), fault=None, monkeypatch=None, snapshot_at=None):
    if fault:
        monkeypatch.setenv("HERD_FAULT", fault)
    out = io.StringIO()
    trainer = build_trainer(tiny_config(corpus, run_dir, ["train.eval_every=0", *extra]), stream=out)
    log = StepLog(snapshot_at)
    trainer.callbacks.append(log)
    trainer.fit()
    if monkeypatch is not None:
        monkeypatch.delenv("HERD_FAULT", raising=False)
    return trainer, log, out.getvalue()


def guard_of(trainer) -> GuardCallback:
    return next(c for c in trainer.callbacks if isinstance(c, GuardCallback))


def test_nan_gradient_skips_the_update_and_the_schedule(corpus, tmp_path, monkeypatch):
    trainer, log, console = run(corpus, tmp_path, ["train.steps=5"], "nan_grad:0:3", monkeypatch, snapshot_at=2)
    print(console)
    assert guard_of(trainer).events == [{"step": 3, "kind": "nonfinite", "action": "skip", "to": None}]
    snaps = log.snapshots
    assert all(torch.equal(snaps["step2"][k], snaps["step3"][k]) for k in snaps["step2"])  # no update at step 3
    assert trainer.module.scheduler.last_epoch == 4  # 5 steps, one skipped: the schedule counts updates
    assert [row["skipped_steps"] for row in log.rows] == [0, 0, 1, 1, 1]
    assert all(torch.isfinite(p).all() for p in trainer.module.model.parameters())
    assert "guards: non-finite loss or gradients at step 3 on every rank: update skipped" in console


def test_step_guard_median_window():
    guard = StepGuard(spike_factor=2.0, spike_window=3, device=torch.device("cpu"))
    verdicts = [guard.check(torch.tensor(v), torch.tensor(1.0)) for v in (5.0, 4.0, 4.5, 9.5, 8.0, 4.25, 9.1)]
    # window [5, 4, 4.5] -> median 4.5: 9.5 > 9 is a spike; 8.0 is not; 4.25 enters; [4.5, 8, 4.25] -> 9.1 > 9
    assert verdicts == [True, True, True, False, True, True, False]
    assert list(guard.losses) == [4.5, 8.0, 4.25]  # withheld losses never enter the window
    assert not guard.check(torch.tensor(math.nan), torch.tensor(1.0)) and guard.verdict == NONFINITE
    assert not guard.check(torch.tensor(4.0), torch.tensor(math.inf)) and guard.verdict == NONFINITE


class _Trainer:
    def __init__(self):
        self.state = types.SimpleNamespace(step=0, total_steps=100, stop_requested=False)


def test_consecutive_skips_stop_the_run():
    guard = types.SimpleNamespace(verdict=NONFINITE, loss=math.nan, median=math.nan, losses=[])
    callback = GuardCallback(guard, "skip", "skip", 0.0, max_consecutive_skips=2, max_rollbacks=1)
    trainer = _Trainer()
    for step in (1, 2):
        trainer.state.step = step
        callback.on_step_end(trainer, {})
    trainer.state.step = 3
    with pytest.raises(GuardError, match=r"3 steps in a row skipped, the last at step 3 .*max_consecutive_skips=2"):
        callback.on_step_end(trainer, {})


def test_a_run_that_skipped_every_step_is_not_a_finished_run(corpus, tmp_path, monkeypatch):
    """Fewer skipped steps than max_consecutive_skips ended with rc 0, and a DPO stage of an absurd beta was
    recorded finished with its starting weights (helper H44). Raised from the last step, through the trainer's
    abort path: the run's locks are released (the same run builds again at once); a resumed run whose remaining
    steps are all skipped trained before, and is left alone."""
    args = ["train.eval_every=0", "train.steps=3", "checkpoint.every=3"]
    with pytest.raises(GuardError, match=r"^guards: every one of the 3 steps of this run was skipped for "
                                         r"non-finite loss or gradients .*it learned nothing$"):
        _every_step_nan(corpus, tmp_path, args, monkeypatch)
    build_trainer(tiny_config(corpus, tmp_path, ["train.eval_every=0", "train.steps=2", "checkpoint.every=2"]),
                  stream=io.StringIO()).fit()  # its locks were released: a good run of the same name trains
    _every_step_nan(corpus, tmp_path, ["train.eval_every=0", "train.steps=4", "checkpoint.every=4"], monkeypatch)


def _every_step_nan(corpus, run_dir, args, monkeypatch):
    """A run whose every step has a non-finite loss."""
    from engine.callbacks.guards import StepGuard
    real = StepGuard.check

    def always_nonfinite(self, loss, grad_norm):
        return real(self, torch.tensor(math.nan), grad_norm)
    monkeypatch.setattr(StepGuard, "check", always_nonfinite)
    try:
        build_trainer(tiny_config(corpus, run_dir, args), stream=io.StringIO()).fit()
    finally:
        monkeypatch.setattr(StepGuard, "check", real)


def test_a_checkpoint_is_never_written_from_a_nonfinite_state(corpus, tmp_path):
    trainer = build_trainer(tiny_config(corpus, tmp_path, ["checkpoint.every=2", "train.steps=2"]),
                            stream=io.StringIO())
    trainer.fit()  # saves step 2
    checkpointer = next(c.checkpointer for c in trainer.callbacks if hasattr(c, "checkpointer"))
    store = checkpointer.store
    name, param = next(iter(trainer.module.model.named_parameters()))
    with torch.no_grad():
        param.view(-1)[3] = math.inf
    with pytest.raises(GuardError, match=f"refusing to save the checkpoint of step 3: non-finite values in "
                                         f"parameter {name} on rank 0"):
        checkpointer.save(3)
    with torch.no_grad():
        param.view(-1)[3] = 0.0
        moment = trainer.module.optimizer.state[param]["exp_avg_sq"]
        moment.view(-1)[0] = math.nan
    with pytest.raises(GuardError, match=f"non-finite values in optimizer exp_avg_sq of {name}"):
        checkpointer.save(3)
    assert store.complete_steps() == [2] and not store.step_dir(3).exists()


def test_stop_policy_is_one_line_and_nonzero_from_the_command(corpus, tmp_path, monkeypatch, capsys):
    from launch.cli import main
    config = tmp_path / "run.yaml"
    config.write_text(to_yaml(tiny_config(corpus, tmp_path, ["guards.nonfinite=stop", "train.eval_every=0"])))
    monkeypatch.setenv("HERD_FAULT", "nan_grad:0:2")
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)
    code = main(["train", str(config)])
    err = capsys.readouterr().err.strip().splitlines()
    print(err)
    assert code != 0 and len(err) == 1
    assert err[0] == "herd: error: guards: non-finite loss or gradients at step 2; stopping (guards.nonfinite=stop)"


# ---------------------------------------------------------------------------------------------- stragglers

def _row(data, fwd, opt, telemetry=(math.nan,) * 5):
    """A rank's gathered row: mean seconds per section, then the joined telemetry (NaN: not readable)."""
    return [data, fwd, opt, data + fwd + opt, *telemetry]


def test_judge_blames_the_late_rank_not_the_ranks_that_wait_for_it():
    # rank 3 spends 50 ms more in its optimizer; the others wait for it in the next collective (data section)
    rows = [_row(0.055, 0.1, 0.005)] * 3 + [_row(0.005, 0.1, 0.055)]
    verdicts = judge(rows)
    assert verdicts[3][1] == "optimizer" and verdicts[3][0] == pytest.approx(0.05 / 0.16)
    assert all(excess <= 0 for excess, _ in verdicts[:3])
    # a rank with slow data loading: the others wait in forward/backward, which is never blamed
    rows = [_row(0.01, 0.15, 0.005)] * 3 + [_row(0.06, 0.1, 0.005)]
    assert max(range(4), key=lambda r: judge(rows)[r][0]) == 3 and judge(rows)[3][1] == "data"


def test_straggler_callback_needs_patience(tmp_path):
    guard = StepGuard(0.0, 3, torch.device("cpu"))
    lines = []
    cb = StragglerCallback(every=1, threshold=0.1, patience=2, guard=guard, device=torch.device("cpu"),
                           report=tmp_path / "stragglers.jsonl", say=lines.append)
    cb.on_fit_start(None)
    cb.hosts, cb._streak = ["a", "b", "c", "d"], [0] * 4
    throttled = (1230.0, 2619.0, 88.0, 700.0, 0x40)  # SM clock, memory clock, C, W, hw_thermal
    slow = [_row(0.055, 0.1, 0.005)] * 3 + [_row(0.005, 0.1, 0.055, throttled)]
    healthy = [_row(0.005, 0.1, 0.005)] * 4
    for step, rows in enumerate([slow, healthy, slow, slow, slow], start=1):
        metrics = {}
        cb._decide(step, rows, metrics)
    assert [f["step"] for f in cb.flags] == [4] and cb.flags[0]["rank"] == 3  # two slow windows in a row
    assert metrics["stragglers"] == 1 and metrics["straggler_worst_rank"] == 3
    assert lines[0].startswith("straggler: rank 3 on d is slower than the median by 0.31 of a step in optimizer")
    assert lines[0].endswith("for 2 windows of 1 steps, at step 4 | SM clock 1230 MHz, memory clock 2619 MHz, "
                             "88 C, 700 W, throttle hw_thermal")
    record = json.loads((tmp_path / "stragglers.jsonl").read_text())
    assert record["host"] == "d" and record["telemetry"]["gpu_throttle_reasons"] == 0x40


# ---------------------------------------------------------------------------------------------- telemetry

class _NVMLError(Exception):
    def __init__(self, value):
        super().__init__(f"NVML error {value}")
        self.value = value


def fake_pynvml(ecc_supported=False, power_fails_once=True, renamed_throttle=True):
    """A stand-in for nvidia-ml-py's pynvml: the constants and calls telemetry.py uses, with counters."""
    m = types.ModuleType("pynvml")
    m.NVMLError, m.NVML_ERROR_NOT_SUPPORTED, m.NVML_ERROR_NO_PERMISSION, m.NVML_ERROR_UNKNOWN = _NVMLError, 3, 4, 999
    m.NVML_ERROR_TIMEOUT = 10
    m.NVML_CLOCK_SM, m.NVML_CLOCK_MEM, m.NVML_TEMPERATURE_GPU = 1, 2, 0
    m.NVML_MEMORY_ERROR_TYPE_CORRECTED, m.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, m.NVML_VOLATILE_ECC = 0, 1, 0
    m.nvmlEventTypeXidCriticalError = 8
    m.calls = {"ecc": 0, "power": 0}
    m.xids = [types.SimpleNamespace(eventData=79)]
    m.nvmlInit = lambda: None
    m.nvmlShutdown = lambda: None
    m.nvmlDeviceGetHandleByUUID = lambda uuid: "gpu0"
    m.nvmlDeviceGetHandleByIndex = lambda index: "gpu0"
    m.nvmlDeviceGetClockInfo = lambda h, kind: {1: 1755, 2: 2619}[kind]
    m.nvmlDeviceGetTemperature = lambda h, sensor: 71

    def power(h):
        m.calls["power"] += 1
        if power_fails_once and m.calls["power"] == 1:
            raise _NVMLError(999)  # a transient failure: left out of this reading only
        return 512300

    def ecc(h, kind, counter):
        m.calls["ecc"] += 1
        if not ecc_supported:
            raise _NVMLError(3)  # not supported: dropped for good
        return {0: 2, 1: 0}[kind]

    def wait(events, timeout_ms):
        if m.xids:
            return m.xids.pop(0)
        raise _NVMLError(10)

    m.nvmlDeviceGetPowerUsage, m.nvmlDeviceGetTotalEccErrors = power, ecc
    if renamed_throttle:
        m.nvmlDeviceGetCurrentClocksEventReasons = lambda h: 0x44
    else:
        m.nvmlDeviceGetCurrentClocksThrottleReasons = lambda h: 0x44
    m.nvmlEventSetCreate = lambda: "events"
    m.nvmlDeviceRegisterEvents = lambda h, kinds, events: None
    m.nvmlEventSetWait_v2, m.nvmlEventSetFree = wait, lambda events: None
    return m


def test_telemetry_fields_map_to_metric_names_and_unsupported_ones_are_skipped(monkeypatch):
    nvml = fake_pynvml()
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    telemetry = Telemetry(torch.device("cuda", 0))
    assert telemetry.enabled, telemetry.why
    first, second = telemetry.read(), telemetry.read()
    print(first, second, sep="\n")
    assert first == {"gpu_sm_clock_mhz": 1755.0, "gpu_mem_clock_mhz": 2619.0, "gpu_temp_c": 71.0,
                     "gpu_throttle_reasons": 0x44, "gpu_xid_events": 1.0, "gpu_last_xid": 79.0}
    assert second["gpu_power_w"] == pytest.approx(512.3) and "gpu_ecc_corrected" not in second
    assert nvml.calls["ecc"] == 2  # each ECC field asked once, refused, never asked again
    lines, metrics = [], {}
    callback = TelemetryCallback(2, telemetry, lines.append)
    trainer = _Trainer()
    trainer.state.step = 1
    callback.on_step_end(trainer, {})
    trainer.state.step = 2
    callback.on_step_end(trainer, metrics)
    assert lines == ["telemetry: NVML, every 2 steps"] and metrics["gpu_sm_clock_mhz"] == 1755.0
    assert describe(metrics).startswith("SM clock 1755 MHz, memory clock 2619 MHz, 71 C, 512 W, "
                                        "throttle sw_power_cap,hw_thermal")


def test_telemetry_reads_ecc_and_the_old_throttle_name(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(ecc_supported=True, power_fails_once=False,
                                                          renamed_throttle=False))
    values = Telemetry(torch.device("cuda", 0)).read()
    assert values["gpu_ecc_corrected"] == 2 and values["gpu_ecc_uncorrected"] == 0
    assert values["gpu_throttle_reasons"] == 0x44 and values["gpu_power_w"] == pytest.approx(512.3)


def test_telemetry_disables_cleanly_without_gpu_or_nvml(corpus, tmp_path, monkeypatch):
    assert not Telemetry(torch.device("cpu")).enabled
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml raises ImportError
    missing = Telemetry(torch.device("cuda", 0))
    assert not missing.enabled and "nvidia-ml-py is not installed" in missing.why and missing.read() == {}
    broken = fake_pynvml()
    broken.nvmlInit = lambda: (_ for _ in ()).throw(_NVMLError(9))
    assert "NVML did not start" in Telemetry(torch.device("cuda", 0), nvml=broken).why
    monkeypatch.delitem(sys.modules, "pynvml")
    _, log, console = run(corpus, tmp_path, ["train.steps=2", "guards.telemetry_every=1"])
    lines = [line for line in console.splitlines() if line.startswith("telemetry")]
    print(lines)
    assert lines == ["telemetry: off, no GPU on this rank (device cpu)"]
    assert not any(k.startswith("gpu_") for row in log.rows for k in row)


@pytest.mark.parametrize("override,message", [
    ("guards.nonfinite=retry", "guards.nonfinite: 'retry' is not one of skip, rollback, stop"),
    ("guards.spike=rollback", "guards.spike: rollback needs checkpoints to roll back to"),
    ("guards.spike_factor=0.5", "guards.spike_factor: must be 0 (off) or above 1"),
    ("guards.straggler_threshold=0", "guards.straggler_threshold: must be positive"),
    ("guards.spike_window=2", "guards.spike_window: must be at least 3"),
])
def test_bad_guard_config_names_the_key(corpus, tmp_path, override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        tiny_config(corpus, tmp_path, [override])
