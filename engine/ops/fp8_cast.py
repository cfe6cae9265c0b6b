"""FP8 quantization ops for the FP8 linear layers (engine/fp8): herd::fp8_amax, herd::fp8_cast and
herd::fp8_delayed_update.

fp8_cast quantizes x as saturate(x * scale) to float8_e4m3fn or float8_e5m2 and, in the same pass over x, gives the
transposed copy the weight-gradient GEMM needs and amax = max|x| (the statistic of delayed scaling, Micikevicius et
al. 2022, "FP8 Formats for Deep Learning", sec. 4.3). CPU tensors run the references of engine/ops/reference.py;
CUDA tensors run csrc/fp8_cast when herd_kernels was built (see csrc/fp8_cast/README.md for the numerics).
fp8_delayed_update is delayed scaling's per-step bookkeeping (window push, overflow count, next scale) in one
launch instead of about fifteen small torch kernels, which left the delayed recipe CPU-launch bound on an H100.
No autograd: quantization is not differentiated through; the FP8 linear's own autograd function calls these.
"""

import torch

from engine.ops import library, reference

__all__ = ["fp8_amax", "fp8_cast", "fp8_delayed_update"]

library.define("fp8_amax(Tensor x) -> Tensor", reference.fp8_amax)
library.define("fp8_cast(Tensor x, Tensor scale, ScalarType dtype, bool transpose) -> (Tensor, Tensor, Tensor)",
               reference.fp8_cast)
library.define("fp8_delayed_update(Tensor(a!) history, Tensor(b!) scale, Tensor(c!) overflows, Tensor amax, "
               "float limit) -> Tensor", reference.fp8_delayed_update)

_KERNEL_DTYPES = (torch.bfloat16, torch.float32)  # the input dtypes csrc/fp8_cast handles
MAX_KERNEL_WINDOW = 8192  # fp8_delayed_update's kernel stages the window in 32 KiB of shared memory


@torch.library.register_fake("herd::fp8_amax")
def _fp8_amax_fake(x):
    return x.new_empty((), dtype=torch.float32)


@torch.library.register_fake("herd::fp8_cast")
def _fp8_cast_fake(x, scale, dtype, transpose):
    torch._check(x.dim() == 2, lambda: f"fp8_cast: x must be 2-D [M, K], got {x.dim()} dims")
    m, k = x.shape
    out_t = x.new_empty((k, m) if transpose else (0,), dtype=dtype)
    return x.new_empty((m, k), dtype=dtype), out_t, x.new_empty((), dtype=torch.float32)


@torch.library.register_fake("herd::fp8_delayed_update")
def _fp8_delayed_update_fake(history, scale, overflows, amax, limit):
    return scale.new_empty(())


def fp8_amax(x: torch.Tensor) -> torch.Tensor:
    """max |x| over the whole tensor (any shape) as an fp32 0-dim tensor; NaN anywhere gives NaN."""
    if library.fused("fp8_amax", x) and x.dtype in _KERNEL_DTYPES:
        return torch.ops.herd.fp8_amax(x)
    return reference.fp8_amax(x)


def fp8_cast(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, transpose: bool = False):
    """Quantize x [..., K] to `dtype` (float8_e4m3fn / float8_e5m2) as saturate(x * scale).

    scale: fp32 one-element tensor on x's device (read there: no host sync). Leading dims of x are flattened to
    M rows -> (out [..., K] (x's shape), out_t [K, M] row-major when `transpose` else an empty [0] tensor,
    amax = max|x| fp32 0-dim).
    """
    x2 = x.reshape(-1, x.shape[-1])  # [M, K]
    if library.fused("fp8_cast", x) and x.dtype in _KERNEL_DTYPES:
        out, out_t, amax = torch.ops.herd.fp8_cast(x2, scale, dtype, transpose)
    else:
        out, out_t, amax = reference.fp8_cast(x2, scale, dtype, transpose)
    return out.view(x.shape), out_t, amax


def fp8_delayed_update(history: torch.Tensor, scale: torch.Tensor, overflows: torch.Tensor, amax: torch.Tensor,
                       limit: float) -> torch.Tensor:
    """Delayed scaling's step, in place on history [H] fp32, scale fp32 0-dim and overflows int64 0-dim (see
    reference.fp8_delayed_update); returns 1/scale of the scale used, fp32 0-dim. Reads nothing on the host."""
    if library.fused("fp8_delayed_update", history) and history.numel() <= MAX_KERNEL_WINDOW:
        return torch.ops.herd.fp8_delayed_update(history, scale, overflows, amax, limit)
    return reference.fp8_delayed_update(history, scale, overflows, amax, limit)
