"""Run a function on N local processes joined in a torch.distributed group (gloo on CPU, or nccl).

The harness behind every parallel-parity test: each rank runs `fn(rank, world_size, *args)` and what it returns
comes back to the caller, ordered by rank. Ranks meet through a file store in a temporary directory (no port to
race for). If any rank raises, the others are stopped and the caller gets that rank's traceback; if ranks do not
finish in `timeout` seconds, all are killed and the error names the ranks that did not report.
Starting processes is the expensive part (each imports torch), so one world should run many checks.
"""

import os
import queue as queue_module
import tempfile
import time
import traceback
from datetime import timedelta
from typing import Any, Callable, Dict, List, Optional

import torch.multiprocessing as mp


class RankFailure(RuntimeError):
    """A rank raised; the message carries its rank and traceback."""


def _to_bytes(value: Any) -> bytes:
    """Results travel as bytes: a tensor put on a torch queue as is would be shared memory that dies with the
    rank's process, possibly before the parent reads it."""
    import io

    import torch
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def _from_bytes(data: bytes) -> Any:
    import io

    import torch
    return torch.load(io.BytesIO(data), weights_only=True)


def _worker(fn: Callable, rank: int, world_size: int, store_path: str, results: Any, args: tuple,
            backend: str, env: Dict[str, str], collective_timeout_s: float) -> None:
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
                       "LOCAL_WORLD_SIZE": str(world_size), **env})
    import torch
    import torch.distributed as dist
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    try:
        dist.init_process_group(backend, init_method=f"file://{store_path}", rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=collective_timeout_s))
        results.put((rank, "ok", _to_bytes(fn(rank, world_size, *args))))
    except BaseException:  # noqa: BLE001 - everything goes back to the parent, which decides
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_on_ranks(fn: Callable, world_size: int, *args: Any, timeout: float = 300.0, backend: str = "gloo",
                 env: Optional[Dict[str, str]] = None, collective_timeout_s: float = 120.0) -> List[Any]:
    """`[fn(0, world_size, *args), ..., fn(world_size - 1, world_size, *args)]`, each run in its own process.

    fn must be importable by name (a module-level function) and its return value picklable.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    child_env = {"OMP_NUM_THREADS": "1", **(env or {})}
    with tempfile.TemporaryDirectory(prefix="herd-ranks-") as tmp:
        store = os.path.join(tmp, "store")
        procs = [ctx.Process(target=_worker, daemon=True,
                             args=(fn, rank, world_size, store, results, args, backend, child_env,
                                   collective_timeout_s))
                 for rank in range(world_size)]
        for proc in procs:
            proc.start()
        try:
            return _collect(procs, results, world_size, timeout)
        finally:
            for proc in procs:
                if proc.is_alive():
                    proc.kill()
                proc.join(timeout=10)


def _collect(procs: list, results: Any, world_size: int, timeout: float) -> List[Any]:
    deadline = time.monotonic() + timeout
    outputs: Dict[int, Any] = {}
    while len(outputs) < world_size:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            missing = sorted(set(range(world_size)) - set(outputs))
            raise TimeoutError(f"ranks {missing} did not finish within {timeout:.0f} s")
        try:
            rank, status, payload = results.get(timeout=min(remaining, 1.0))
        except queue_module.Empty:
            dead = [r for r, p in enumerate(procs) if r not in outputs and not p.is_alive() and p.exitcode]
            if dead:
                raise RankFailure(f"rank {dead[0]} died with exit code {procs[dead[0]].exitcode} before reporting")
            continue
        if status == "error":
            raise RankFailure(f"rank {rank} of {world_size} failed:\n{payload}")
        outputs[rank] = _from_bytes(payload)
    return [outputs[r] for r in range(world_size)]
