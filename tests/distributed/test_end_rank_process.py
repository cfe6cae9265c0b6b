"""engine.run.end_rank_process, the last call of `herd train` / `herd align` on every rank: with a process group it
closes the groups, flushes the output and leaves with the given code without the interpreter's teardown (where a
gloo thread asking for the GIL can abort the process, see its docstring); without one it returns."""

import os
import subprocess
import sys
import textwrap

from tests.integration.test_cli import ROOT

RANK_SCRIPT = textwrap.dedent("""
    import atexit, sys
    from datetime import timedelta
    import torch
    import torch.distributed as dist
    from engine.run import end_rank_process
    rank, store, code = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    atexit.register(lambda: print("interpreter teardown ran", flush=True))
    if store != "-":
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2,
                                timeout=timedelta(seconds=120))
        total = torch.ones(4)
        dist.all_reduce(total)
        # no newline, no flush: stdout is a pipe (block-buffered), os._exit alone would lose this
        sys.stdout.write(f"rank {rank}: sum {total.sum().item():g}")
    end_rank_process(code)
    print("end_rank_process returned")
""")


def _start(rank: int, store: str, code: int) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # buffered, as under srun or a file
    return subprocess.Popen([sys.executable, "-c", RANK_SCRIPT, str(rank), store, str(code)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_every_rank_leaves_with_the_code_and_its_output_flushed(tmp_path):
    ranks = [_start(rank, str(tmp_path / "store"), 75) for rank in (0, 1)]
    outputs = [p.communicate(timeout=300) for p in ranks]
    for rank, (p, (out, err)) in enumerate(zip(ranks, outputs)):
        assert p.returncode == 75, err[-2000:]
        assert out == f"rank {rank}: sum 8", (out, err[-2000:])  # flushed; no teardown, nothing after the call


def test_without_a_process_group_it_returns_and_the_process_exits_normally():
    p = _start(0, "-", 75)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-2000:]
    assert out.splitlines() == ["end_rank_process returned", "interpreter teardown ran"]
