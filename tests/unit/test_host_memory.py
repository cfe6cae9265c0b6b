"""engine/host_memory.py: a CPU training process keeps the heap memory a step frees, so the next step does not
fault the same pages in again (the kernel time that was 30% of the scaling demo's CPU time)."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# one process per measurement: mallopt settings are process-wide and cannot be undone
STEPS = textwrap.dedent("""
    import resource, sys, torch
    from engine.host_memory import keep_freed_heap
    if sys.argv[1] == "keep":
        assert keep_freed_heap()
    def step():  # a step's activations: 24 tensors of 1 MiB alive together, then all freed
        tensors = [torch.ones(1 << 18) for _ in range(24)]
        del tensors
    for _ in range(3):
        step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(50):
        step()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


def _faults(mode: str, **malloc_env: str) -> int:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **malloc_env)
    out = subprocess.run([sys.executable, "-c", STEPS, mode], env=env, capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc") if hasattr(os, "confstr") else True,
                    reason="mallopt is glibc's")
def test_freed_heap_is_kept_between_steps():
    # glibc's own thresholds float with what the process freed before, so whether it trims here varies from run to
    # run (0 to 305,650 faults measured); the baseline pins them at glibc's initial 128 KiB, where it always trims:
    # 50 steps x 24 MiB then fault ~6,000 pages back each step
    trimming = _faults("default", MALLOC_TRIM_THRESHOLD_="131072", MALLOC_MMAP_THRESHOLD_="131072")
    kept = _faults("keep")
    assert trimming > 50 * 5000, trimming
    assert kept < 50 * 6144 // 20, (kept, trimming)  # under 5% of the pages the 50 steps touch


def test_the_users_malloc_settings_win(monkeypatch):
    from engine.host_memory import keep_freed_heap
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")
    assert keep_freed_heap() is False
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=131072")
    assert keep_freed_heap() is False
