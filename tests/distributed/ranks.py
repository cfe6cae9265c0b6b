"""Functions run on gloo ranks by the tests (module-level so spawned processes can import them)."""

import time

import torch
import torch.distributed as dist

from engine.callbacks import Callback


def collectives(rank: int, world_size: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    value = torch.tensor([float(rank + 1)])
    dist.all_reduce(value)
    gathered = [torch.zeros(1) for _ in range(world_size)]
    dist.all_gather(gathered, torch.tensor([float(rank)]))
    mesh = init_device_mesh("cpu", (2, world_size // 2), mesh_dim_names=("dp", "tp"))
    tp_sum = torch.tensor([float(rank)])
    dist.all_reduce(tp_sum, group=mesh.get_group("tp"))
    return {"sum": value.item(), "gathered": [g.item() for g in gathered], "tp_sum": tp_sum.item(),
            "tp_rank": mesh.get_local_rank("tp")}


def fails_on_rank_one(rank: int, world_size: int) -> int:
    if rank == 1:
        raise ValueError("rank one is broken")
    dist.barrier()  # rank 0 would wait here forever: the harness must stop it
    return rank


def hangs_on_rank_one(rank: int, world_size: int) -> int:
    if rank == 1:
        time.sleep(600)
    return rank


class Recorder(Callback):
    """Keeps every step's metrics (on every rank)."""

    def __init__(self):
        self.steps = []

    def on_step_end(self, trainer, metrics):
        self.steps.append(dict(metrics))


def train_layouts(rank: int, world_size: int, corpus: str, run_dir: str, layouts: list) -> list:
    """Train each layout (a list of overrides) in turn; rank 0 returns per-step losses and full parameters."""
    import io
    from pathlib import Path

    from engine.run import build_trainer
    from tests.helpers import parity_config
    results = []
    for index, overrides in enumerate(layouts):
        started = time.perf_counter()
        cfg = parity_config(Path(corpus), Path(run_dir) / f"layout{index}", overrides, world_size)
        trainer = build_trainer(cfg, stream=io.StringIO())
        recorder = Recorder()
        trainer.callbacks.append(recorder)
        trainer.fit()
        params = trainer.module.parallel.full_parameters()
        losses = [m["loss"] for m in recorder.steps]
        local_numel = sum((p.to_local() if hasattr(p, "to_local") else p).numel()
                          for p in trainer.module.parallel.parameters())
        grad_norms = [m["grad_norm"] for m in recorder.steps]
        # the same 16 validation sequences in every layout: 8 micro-batches of 2 over the dp ranks
        dp = cfg.parallel.dp_replicate * cfg.parallel.dp_shard
        evaluation = trainer.module.eval_loss(trainer.loader.fixed_micro_batches(8 // dp))  # (loss sum, tokens)
        results.append({"losses": losses, "grad_norms": grad_norms, "params": params, "local_numel": local_numel,
                        "eval": evaluation, "seconds": time.perf_counter() - started}
                       if rank == 0 else {"losses": losses, "local_numel": local_numel, "eval": evaluation})
    return results
