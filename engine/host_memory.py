"""Keeping the CPU process's freed heap memory instead of handing it back to the kernel after every step.

glibc's malloc returns the free memory at the top of the heap to the kernel once it exceeds M_TRIM_THRESHOLD (128 KiB
at start, raised dynamically to twice the largest mmapped chunk freed so far), and the next allocation of the same
size faults it back in page by page. A training step on the CPU frees and reallocates the same activations every
step, so the kernel zeroes and maps the same pages again and again. Measured on the scaling demo's smallest model
(benchmarks/results/scaling_demo.md, 300 steps of c3e12-d16, one thread, 2-core machine): 24.7 s user and 11.1 s
system time with 6.6M minor page faults by default; 24.7 s user and 0.4 s system with 96K faults when the heap is
kept (MALLOC_TRIM_THRESHOLD_ and MALLOC_TOP_PAD_ in the environment, which is what `keep_freed_heap` sets from
inside the process). The arithmetic is untouched: only where the bytes come from changes.

The memory kept is what the run already used at its peak (the heap does not grow past the peak because of this);
the process's resident size no longer shrinks between steps. Does nothing off glibc (macOS, musl) and where the
user set any of these (MALLOC_*_ variables or glibc.malloc tunables in GLIBC_TUNABLES): theirs win."""

import ctypes
import os

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3  # mallopt parameters (glibc malloc.h)
TRIM_THRESHOLD = 1 << 30  # 1 GiB of free memory at the heap's top is kept (mallopt takes an int: < 2 GiB)
TOP_PAD = 64 << 20  # each heap extension asks for 64 MiB more than needed (virtual until touched)
# setting the trim threshold freezes the mmap threshold where it is (128 KiB at start): raise it to glibc's largest
# (32 MiB on 64-bit), or every chunk above 128 KiB would be mmapped and unmapped, faulting on every use
MMAP_THRESHOLD = 32 << 20


def keep_freed_heap() -> bool:
    """Sets glibc's trim threshold and top pad for this process; True where it did (glibc, not set by the user)."""
    if any(f"MALLOC_{name}_" in os.environ for name in ("TRIM_THRESHOLD", "TOP_PAD", "MMAP_THRESHOLD")) \
            or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    try:
        # the process's own symbols (dlopen(NULL)): libc is loaded already; ctypes.util.find_library would run
        # `ldconfig -p` in a child process at every run's start (and a herd error must start no process: R20)
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc: no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    settings = ((M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, TRIM_THRESHOLD), (M_TOP_PAD, TOP_PAD))
    return all([bool(mallopt(param, value)) for param, value in settings])
