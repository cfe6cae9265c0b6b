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


def eval_sample_ids(trainer) -> list:
    """The sample ids the run's EvalCallback evaluates, over all data-parallel ranks (sorted, with repeats: a
    sample evaluated by two dp ranks appears twice). Every rank of one dp rank (tp, cp, pp) must hold the same."""
    from engine.callbacks import EvalCallback
    callback = next(c for c in trainer.callbacks if isinstance(c, EvalCallback))
    ids = [int(i) for batch in callback.batches for i in batch.sample_ids]
    mesh = trainer.module.parallel.mesh
    if mesh is None:
        return sorted(ids)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (mesh.dp_rank, ids))
    by_dp = {}
    for dp_rank, rank_ids in gathered:
        assert by_dp.setdefault(dp_rank, rank_ids) == rank_ids, "ranks of one dp rank evaluate different samples"
    return sorted(i for rank_ids in by_dp.values() for i in rank_ids)


def logged_eval(trainer, recorder) -> tuple:
    """(val_loss of the last step, val_loss before the first): what the EvalCallback logged."""
    return recorder.steps[-1]["val_loss"], trainer.initial_val_loss


def train_layouts(rank: int, world_size: int, corpus: str, run_dir: str, layouts: list,
                  evaluate: bool = False) -> list:
    """Train each layout (a list of overrides) in turn; rank 0 returns per-step losses and full parameters. With
    `evaluate`, the runs have validation data and every rank also returns the EvalCallback's logged val_loss
    (before the first step and after the last) and the sample ids it evaluated over all dp ranks."""
    import io
    from pathlib import Path

    from engine.fp8.native import ScalingState
    from engine.run import build_trainer
    from tests.helpers import parity_config, parity_eval
    results, fused_casts = [], [0]
    cast_delayed = ScalingState.cast_delayed

    def counting(state, cast, fused=False):  # this rank process only: how many casts a fused op made (fp8 tests)
        fused_casts[0] += int(fused)
        return cast_delayed(state, cast, fused)
    ScalingState.cast_delayed = counting
    for index, overrides in enumerate(layouts):
        started, fused_casts[0] = time.perf_counter(), 0
        overrides = overrides + (parity_eval(Path(corpus)) if evaluate else [])
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
        out = {"losses": losses, "local_numel": local_numel, "fused_casts": fused_casts[0]}
        if evaluate:
            out.update(eval=logged_eval(trainer, recorder), eval_ids=eval_sample_ids(trainer))
        if rank == 0:
            out.update(grad_norms=grad_norms, params=params, seconds=time.perf_counter() - started)
        results.append(out)
    ScalingState.cast_delayed = cast_delayed
    return results


class StopAfter(Callback):
    """Requests the end of the run after step `step` (as a preemption would); the checkpoint callback then saves."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, trainer, metrics):
        if trainer.state.step == self.step:
            trainer.state.stop_requested = True


class FirstState(Callback):
    """The full parameters the run starts from (after any resume), and the sample ids of every step."""

    def __init__(self):
        self.params, self.samples = None, []

    def on_fit_start(self, trainer):
        self.params = trainer.module.parallel.full_parameters()

    def on_step_start(self, trainer):
        start = trainer.loader.consumed_samples - trainer.loader.data.global_batch_size
        self.samples.append([i for mb in trainer.loader.step_sample_ids(start) for i in mb])


def train_phases(rank: int, world_size: int, corpus: str, run_dir: str, jobs: list) -> list:
    """Each job: (overrides, stop_after or None). Trains it (resuming from its checkpoint.dir if one is there);
    returns per job the losses, the starting and final full parameters (rank 0), and this rank's dp rank and
    sample ids per step."""
    import io
    from pathlib import Path

    from engine.run import build_trainer
    from tests.helpers import parity_config
    results = []
    for index, (overrides, stop_after) in enumerate(jobs):
        cfg = parity_config(Path(corpus), Path(run_dir) / f"job{index}", overrides, world_size)
        trainer = build_trainer(cfg, stream=io.StringIO())
        recorder, first = Recorder(), FirstState()
        trainer.callbacks[:0] = [first, recorder] + ([StopAfter(stop_after)] if stop_after else [])
        trainer.fit()
        mesh = trainer.module.parallel.mesh
        out = {"losses": [m["loss"] for m in recorder.steps], "samples": first.samples,
               "dp_rank": mesh.dp_rank if mesh is not None else 0,
               "holds_data": mesh is None or (mesh.rank("tp") == 0 and mesh.rank("cp") == 0
                                              and mesh.rank("pp") == 0)}
        final = trainer.module.parallel.full_parameters()
        if rank == 0:
            out.update(start=first.params, final=final)
        results.append(out)
    return results


class SignalSelf(Callback):
    """Sends `signum` to this process at the end of step `step` on rank `rank` only (a SLURM preemption that
    reached one rank first)."""

    def __init__(self, rank, step, signum):
        self.rank, self.step, self.signum = rank, step, signum

    def on_step_end(self, trainer, metrics):
        import os
        if int(os.environ["RANK"]) == self.rank and trainer.state.step == self.step:
            os.kill(os.getpid(), self.signum)


def preempted_run(rank: int, world_size: int, corpus: str, run_dir: str, overrides: list, signal_at) -> dict:
    """Train; with signal_at = (rank, step, signum), that rank gets the signal after that step."""
    import io
    from pathlib import Path

    from engine.run import build_trainer
    from tests.helpers import parity_config
    cfg = parity_config(Path(corpus), Path(run_dir), overrides, world_size)
    trainer = build_trainer(cfg, stream=io.StringIO())
    recorder = Recorder()
    trainer.callbacks[:0] = [recorder] + ([SignalSelf(*signal_at)] if signal_at else [])
    trainer.fit()
    return {"step": trainer.state.step, "preempted": trainer.state.preempted,
            "losses": [m["loss"] for m in recorder.steps]}


def loaded_weights(rank: int, world_size: int, corpus: str, run_dir: str, overrides: list) -> dict:
    """Build a run with checkpoint.load_weights (no training); rank 0 returns its consolidated parameters."""
    import io
    from pathlib import Path

    from engine.run import build_trainer
    from tests.helpers import parity_config
    trainer = build_trainer(parity_config(Path(corpus), Path(run_dir), overrides, world_size), stream=io.StringIO())
    params = trainer.module.parallel.full_parameters()  # a collective: every rank takes part
    return {"params": params if rank == 0 else None}


def watched_run(rank: int, world_size: int, corpus: str, run_dir: str, overrides: list) -> dict:
    """Train with the hang watchdog (shared/TESTING.md R10). Returns this rank's final heartbeat and what it
    read of it at the end of step 1 (a hang ends the process with the watchdog's exit code instead)."""
    import io
    import json
    from pathlib import Path

    from engine.run import build_trainer
    from tests.helpers import parity_config
    cfg = parity_config(Path(corpus), Path(run_dir), overrides, world_size)
    trainer = build_trainer(cfg, stream=io.StringIO())
    beat = Path(run_dir) / cfg.log.name / "heartbeat" / f"rank{rank}.json"
    seen = {}

    class ReadHeartbeat(Callback):
        def on_step_end(self, trainer, metrics):
            if trainer.state.step == 1:
                seen.update(json.loads(beat.read_text()))

    trainer.callbacks.append(ReadHeartbeat())
    trainer.fit()
    from engine.callbacks.watchdog import WatchdogCallback
    watchdog = next(c for c in trainer.callbacks if isinstance(c, WatchdogCallback))
    watchdog._thread.join(timeout=30)  # it writes its last heartbeat once it sees fit() has returned
    return {"step": trainer.state.step, "during": seen, "final": json.loads(beat.read_text()),
            "unwrapped": not hasattr(dist.all_reduce, "__wrapped_by__")}


class StepLog(Callback):
    """Per executed step (a rollback repeats step numbers): the step as run, the data position it started at and
    its metrics; and the full parameters after steps `snapshot_at` and `snapshot_at + 1` (first time each) and at
    the start of the first step run again after a rollback."""

    def __init__(self, snapshot_at=None):
        self.snapshot_at, self.rows, self.snapshots = snapshot_at, [], {}
        self._running = self._position = 0

    def on_step_start(self, trainer):
        running = trainer.state.step + 1
        if running <= self._running and "after_rollback" not in self.snapshots:
            self.snapshots["after_rollback"] = trainer.module.parallel.full_parameters()
        self._running = running
        self._position = trainer.loader.consumed_samples - trainer.loader.data.global_batch_size

    def on_step_end(self, trainer, metrics):
        self.rows.append({"step": self._running, "position": self._position, **metrics})
        name = f"step{self._running}"
        if self.snapshot_at is not None and self._running in (self.snapshot_at, self.snapshot_at + 1) \
                and name not in self.snapshots:
            self.snapshots[name] = trainer.module.parallel.full_parameters()


def guarded_runs(rank: int, world_size: int, corpus: str, run_dir: str, jobs: list) -> list:
    """Each job: (overrides, HERD_FAULT value or None, snapshot step or None). Trains it in this world; returns
    per job what every rank saw: the guard's events, straggler flags, per-step rows, the LR schedule's count,
    the final full parameters, the console (rank 0) and the error of a run a guard stopped."""
    import io
    import os
    from pathlib import Path

    from engine.callbacks import GuardCallback, GuardError, StragglerCallback
    from engine.run import build_trainer
    from tests.helpers import parity_config
    results = []
    for index, (overrides, fault, snapshot_at) in enumerate(jobs):
        os.environ.pop("HERD_FAULT", None)
        if fault:
            os.environ["HERD_FAULT"] = fault
        out = io.StringIO()
        cfg = parity_config(Path(corpus), Path(run_dir) / f"job{index}", overrides, world_size)
        trainer = build_trainer(cfg, stream=out)
        log = StepLog(snapshot_at)
        trainer.callbacks.append(log)
        error = None
        try:
            trainer.fit()
        except GuardError as e:
            error = str(e)
        os.environ.pop("HERD_FAULT", None)
        guard = next(c for c in trainer.callbacks if isinstance(c, GuardCallback))
        straggler = next((c for c in trainer.callbacks if isinstance(c, StragglerCallback)), None)
        results.append({"events": guard.events, "flags": straggler.flags if straggler else [], "rows": log.rows,
                        "schedule_steps": trainer.module.scheduler.last_epoch, "step": trainer.state.step,
                        "final": trainer.module.parallel.full_parameters() if error is None else None,
                        "snapshots": log.snapshots if rank == 0 else {}, "error": error,
                        "console": out.getvalue() if rank == 0 else ""})
    return results
