"""FP8 amax and cast(+transpose) (csrc/fp8_cast) on Llama-3-8B activation shapes: [tokens 8192, dim 4096] (the
input of the attention / up projections) and [4096, ffn 14336] (a down-projection input of 4096 tokens), bf16.

Bytes moved (the minimum): amax reads x once; cast reads x once and writes out (1 byte per element), plus out_t
(1 more byte per element) with the transposed copy. The eager reference does the cast, the transpose and the amax
as separate passes; the compiled one is the same reference under torch.compile.

fp8_delayed_update (delayed scaling's per-tensor bookkeeping, windows of 16 (the default) and 1024 amaxes) is a
latency op: a few bytes, where the eager reference is about fifteen kernel launches; its bandwidth column means
nothing, its times against eager and torch.compile are the figures to read.
"""

from typing import List

import torch

from benchmarks.kernels.harness import Case
from engine.ops import reference

SHAPES = [(8192, 4096), (4096, 14336)]


def cases() -> List[Case]:
    out = []
    for m, k in SHAPES:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        scale = (448.0 / reference.fp8_amax(x)).reshape(1)  # fp32 [1] on the device
        shape = f"{m}x{k} bf16"
        n = x.numel()
        out.append(Case("fp8_amax", shape, lambda x=x: torch.ops.herd.fp8_amax(x),
                        lambda x=x: reference.fp8_amax(x), bytes_moved=2 * n))
        for transpose in (False, True):
            fp8 = torch.float8_e4m3fn
            out.append(Case("fp8_cast+t e4m3" if transpose else "fp8_cast e4m3", shape,
                            lambda x=x, s=scale, t=transpose: torch.ops.herd.fp8_cast(x, s, fp8, t),
                            lambda x=x, s=scale, t=transpose: reference.fp8_cast(x, s, fp8, t),
                            bytes_moved=2 * n + n + (n if transpose else 0)))
    for window in (16, 1024):
        history = torch.rand(window, device="cuda")
        state = (history, torch.full((), 448.0, device="cuda"), torch.zeros((), dtype=torch.int64, device="cuda"))
        amax = torch.full((), 0.5, device="cuda")  # inside the window's range: the scale stays finite call after call
        out.append(Case("fp8_delayed_update", f"window {window}",
                        lambda s=state, a=amax: torch.ops.herd.fp8_delayed_update(*s, a, 448.0),
                        lambda s=state, a=amax: reference.fp8_delayed_update(*s, a, 448.0),
                        bytes_moved=2 * 4 * window + 4 * 4 + 8 * 2))
    return out
