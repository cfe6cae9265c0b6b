"""The long-context evaluation runs of tests/unit/test_long_context_eval.py and
tests/distributed/test_long_context_layouts.py (module-level so spawned ranks import them)."""

import io
import json
from pathlib import Path
from typing import List

from engine.config import JobConfig
from tests.helpers import tiny_config

# Haystacks of 160 tokens: the test BPE (vocabulary 500, trained on Python code) spends about 90 tokens on the
# needle, the question and the answer, leaving a few filler sentences. Few samples: each candidate is a forward.
LONG_EVAL = ["long_eval.enabled=true", "long_eval.short_seq_len=16", "long_eval.short_batches=4",
             "long_eval.needle_lengths=[160]", "long_eval.needle_depths=[0.0,1.0]", "long_eval.needle_trials=2",
             "long_eval.needle_candidates=3"]


def long_eval_config(corpus: Path, run_dir: Path, overrides: List[str] = (), world_size: int = 1) -> JobConfig:
    """tests/helpers.tiny_config's run (2 layers, dim 64, 6 steps of 8 x 32 tokens, fp32) with the long-context
    evaluations above, loadable under any world size."""
    return tiny_config(corpus, run_dir, ["watchdog.enabled=false", *LONG_EVAL, *overrides], world_size)


def read_jsonl(path: Path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines()]


def train_and_read(cfg: JobConfig, read: bool = True) -> dict:
    """Fit the run; its per-step losses and (with `read`, after every rank has finished) the long_eval.jsonl
    records rank 0 wrote."""
    import torch.distributed as dist
    from engine.run import build_trainer
    from tests.distributed.ranks import Recorder
    trainer = build_trainer(cfg, stream=io.StringIO())
    recorder = Recorder()
    trainer.callbacks.append(recorder)
    trainer.fit()
    if dist.is_initialized():
        dist.barrier()  # a record written by any rank is in the file
    path = Path(cfg.log.run_dir) / cfg.log.name / "long_eval.jsonl"
    return {"losses": [m["loss"] for m in recorder.steps], "records": read_jsonl(path) if read else None}


def train_layouts(rank: int, world_size: int, corpus: str, run_dir: str, layouts: list) -> list:
    """Each layout's run on these ranks; what train_and_read returns (the records on rank 0)."""
    return [train_and_read(long_eval_config(Path(corpus), Path(run_dir) / f"layout{i}", overrides, world_size),
                           read=rank == 0)
            for i, overrides in enumerate(layouts)]
