"""The end of a recipe: the annealing checkpoints averaged into the final model (Llama 3 section 3.4.3, Polyak
averaging) and its export for transformers. Rank 0 writes; every rank waits for it."""

import os
import shutil
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Optional

import torch.distributed as dist

from engine.checkpoint.store import CheckpointError, CheckpointStore
from recipe.plan import TRAIN_NAME

AVERAGED, HF = "averaged", "hf"


def _rank0_then_all(work):
    """Run `work` on rank 0 and hand its result (or its failure, as one line) to every rank."""
    box = [None]
    if int(os.environ.get("RANK", "0")) == 0:
        try:
            box[0] = ("ok", work())
        except Exception as e:  # noqa: BLE001 - every rank raises the same one-line error
            box[0] = ("error", f"{type(e).__name__}: {e}")
    if dist.is_initialized():  # rank 0 may work for hours (a 405B average): wait beyond the collective timeout
        waiting = dist.new_group(backend="gloo", timeout=timedelta(days=7))
        dist.broadcast_object_list(box, src=0, group=waiting)
        dist.destroy_process_group(waiting)
    kind, value = box[0]
    if kind == "error":
        raise CheckpointError(value)
    return value


def anneal_steps(start_step: int, end_step: int, every: int) -> list:
    """The steps at which the anneal stage saves by its schedule: every `every` global steps and at its end (a
    preemption's save at another step is a resume point, not an annealing snapshot: it is not averaged)."""
    return sorted({s for s in range(start_step + 1, end_step + 1) if s % every == 0} | {end_step})


def anneal_save_count(start_step: int, end_step: int, every: int) -> int:
    """len(anneal_steps(start_step, end_step, every)), counted (a stage of 1e13 tokens has billions of steps): the
    global multiples of `every` in (start, end], and the end."""
    return end_step // every - start_step // every + (end_step % every != 0)


def anneal_checkpoints(ckpt_root: Path, start_step: int, end_step: int, every: int) -> list:
    """The complete checkpoints of the anneal stage's schedule, oldest first."""
    store = CheckpointStore(ckpt_root, lineage=TRAIN_NAME)
    wanted = set(anneal_steps(start_step, end_step, every))
    return [store.step_dir(s) for s in store.complete_steps() if s in wanted]


def average_stage(run_dir: Path, ckpt_root: Path, start_step: int, end_step: int, every: int) -> dict:
    """<run_dir>/averaged: the element-wise fp32 mean of the anneal stage's checkpoints (engine/checkpoint/average.py),
    a weights-only checkpoint root like an import (checkpoint.load_weights, herd convert herd-to-hf)."""
    def work():
        sources = anneal_checkpoints(ckpt_root, start_step, end_step, every)
        if not sources:
            raise CheckpointError(f"{run_dir}: the anneal stage left no checkpoint to average (steps "
                                  f"{start_step + 1} to {end_step})")
        out = run_dir / AVERAGED  # replaced atomically if a kill came after the write, before the state recorded it
        _average(sources, out)
        return {"root": str(out), "sources": [str(s) for s in sources]}
    return _rank0_then_all(work)


def _in_group() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def _herd_child(args: list) -> None:
    """`herd ARGS` in a child process outside this run's process group: the checkpoint readers use
    torch.distributed.checkpoint, which inside a multi-rank group would wait for the other ranks."""
    rank_keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in rank_keys and not k.startswith("TORCHELASTIC")}
    done = subprocess.run([sys.executable, "-m", "launch", *map(str, args)], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines()
        raise CheckpointError(f"herd {args[0]} failed: {lines[-1] if lines else done.returncode}")


def _average(sources: list, out: Path) -> None:
    """engine/checkpoint/average.py in this process, or inside a multi-rank run as `herd average` in a child."""
    if not _in_group():
        from engine.checkpoint.average import average_checkpoints
        average_checkpoints(sources, out, overwrite=True)
        return
    _herd_child(["average", "--overwrite", "--out", out, *sources])


def export_final(run_dir: Path, averaged: Optional[dict], ckpt_root: Path) -> str:
    """<run_dir>/hf from the averaged model, or from the run's newest checkpoint when nothing was averaged."""
    def work():
        from engine.checkpoint.hf_export import export_hf
        out = run_dir / HF
        if out.exists():  # an export this recipe began before a kill (the state file did not record it)
            shutil.rmtree(out)
        source = Path(averaged["root"]) if averaged else ckpt_root
        if _in_group():
            _herd_child(["convert", "herd-to-hf", source, out])
            return str(out)
        return str(export_hf(source, out).path)
    return _rank0_then_all(work)
