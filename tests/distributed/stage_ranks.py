"""Per-rank functions of the post-training layout-parity tests (module-level so spawned processes import them)."""

import io
import time
from pathlib import Path

from tests.distributed.ranks import Recorder, eval_sample_ids


def stage_overrides(kind: str, data_file: str) -> list:
    """A post-training job on top of tests/helpers.parity_config: 4 steps of 8 rows of 128 tokens, validated
    before the first step and after the last on 4 global micro-batches of 2 rows (shared over the dp ranks)."""
    return [f"align.kind={kind}", f"align.train_file={data_file}", f"align.valid_file={data_file}",
            "data.seq_len=128", "data.global_batch_size=8", "data.micro_batch_size=2", "train.steps=4",
            "train.eval_batches=4", "train.eval_every=0"]


def train_stage(cfg, rank: int = 0) -> dict:
    """Fit one stage; per-step metrics, the validation as logged ("eval": the EvalCallback's val_loss after the
    last step and the sample ids it evaluated over all dp ranks; "eval_metrics": its held-out metrics) and
    (rank 0) the full parameters."""
    from align.run import build_stage_trainer
    started = time.perf_counter()
    trainer = build_stage_trainer(cfg, stream=io.StringIO())
    recorder = Recorder()
    trainer.callbacks.append(recorder)
    trainer.fit()
    evaluation = (recorder.steps[-1]["val_loss"], eval_sample_ids(trainer))
    result = {"steps": recorder.steps, "losses": [m["loss"] for m in recorder.steps], "eval": evaluation,
              "eval_metrics": dict(getattr(trainer.module, "eval_metrics", {})),
              "seconds": time.perf_counter() - started}
    params = trainer.module.parallel.full_parameters()  # a collective: every rank takes part
    if rank == 0:
        result["params"] = params
    return result


def train_stage_layouts(rank: int, world_size: int, corpus: str, run_dir: str, base: list, layouts: list) -> list:
    from tests.helpers import parity_config
    return [train_stage(parity_config(Path(corpus), Path(run_dir) / f"layout{i}", base + overrides, world_size), rank)
            for i, overrides in enumerate(layouts)]
