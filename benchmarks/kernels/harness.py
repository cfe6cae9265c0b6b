"""Timing harness for the csrc/ kernels on a CUDA GPU (see benchmarks/kernels/run.py).

Each op module in this folder has `cases() -> List[Case]`. A case names the fused call (through torch.ops.herd, as
engine/ops runs it), the eager PyTorch reference doing the same work, and the bytes the fused kernel must move at
least (inputs read once, outputs written once). The harness times the fused call, the eager reference and the
reference under torch.compile with CUDA events (20 back-to-back calls, median of 5 such runs) and reports the fused kernel's
bandwidth against the measured device copy bandwidth.
"""

import statistics
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch


@dataclass
class Case:
    op: str  # e.g. "rms_norm fwd"
    shape: str  # e.g. "8192x4096 bf16"
    fused: Callable[[], object]  # runs the csrc/ kernel
    eager: Callable[[], object]  # the same work in plain PyTorch (the reference)
    bytes_moved: int  # minimum bytes the fused kernel reads + writes
    compiled: Optional[Callable[[], object]] = None  # default: torch.compile(eager)


def time_ms(fn: Callable[[], object], warmup: int = 5, calls: int = 20, repeats: int = 5) -> float:
    """Milliseconds per call: CUDA events around `calls` back-to-back calls (the GPU queue stays full, so a short
    kernel is not charged the host's dispatch gaps between single timed calls), median over `repeats`."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return statistics.median(times)


def copy_bandwidth_gbs(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth (bytes read + bytes written per second), the roofline for these kernels."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src))
    return 2 * nbytes / ms / 1e6


def measure(case: Case, copy_gbs: float) -> dict:
    fused_ms = time_ms(case.fused)
    eager_ms = time_ms(case.eager)
    compiled = case.compiled or torch.compile(case.eager)
    try:
        compiled_ms = time_ms(compiled)
    except Exception as err:  # a compile failure is a result to report, not a reason to stop the suite
        print(f"torch.compile failed for {case.op}: {type(err).__name__}: {err}".splitlines()[0])
        compiled_ms = float("nan")
    gbs = case.bytes_moved / fused_ms / 1e6
    return {"op": case.op, "shape": case.shape, "fused_ms": fused_ms, "fused_gbs": gbs,
            "pct_of_copy": 100 * gbs / copy_gbs, "eager_ms": eager_ms, "compiled_ms": compiled_ms,
            "vs_eager": eager_ms / fused_ms, "vs_compiled": compiled_ms / fused_ms}
