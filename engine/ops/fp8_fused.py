"""FP8 casts fused into the op that produces the FP8 layer's input: herd::rms_norm_fp8_fwd (RMSNorm, optionally with
the pre-norm block's residual add, writing e4m3) and herd::swiglu_fp8_fwd (SwiGLU writing e4m3). CUDA kernels:
csrc/rms_norm (the FP8 epilogue of its forward), csrc/swiglu (swiglu_fp8_kernel), csrc/fp8_cast (the transposed copy).

Unfused, the norm writes its bf16 output y, then the FP8 layer reads y again for the cast (and, with current
scaling, once more for the amax). Fused, y is computed in registers, rounded to the dtype the unfused op would have
stored (so every value is the one the unfused path casts), scaled and written only as e4m3, with its transposed copy
for the weight gradient and amax = max|y| for delayed scaling's window, in one pass (Micikevicius et al. 2022, "FP8
Formats for Deep Learning", sec. 4.3: the scale comes from earlier steps, so it is known before the pass). The
reference of each op is exactly that composition: engine/ops/norm.py's (or swiglu.py's) CPU kernel, then
reference.fp8_cast; it is the CPU kernel of the op and the oracle of the CUDA kernel.

The backward of either op is the unfused op's (rms_norm_bwd from the norm's input and rstd; swiglu_bwd from gate and
up): neither reads the forward's output. engine/fp8/fused_cast.py wires these ops into the model.
"""

from typing import Optional

import torch

from engine.ops import library, reference
from engine.ops.norm import MAX_DIM, _add_rms_norm_fwd_cpu, _rms_norm_fwd_cpu
from engine.ops.swiglu import _swiglu_fwd_cpu

__all__ = ["rms_norm_fp8", "rms_norm_fp8_kernel_applies", "swiglu_fp8", "swiglu_fp8_kernel_applies"]

_DTYPES = (torch.bfloat16, torch.float32)
_KERNEL_FP8 = torch.float8_e4m3fn  # the kernels write e4m3 only: the FP8 layers' inputs (gradients are e5m2)


def _rms_norm_fp8_cpu(x, residual, weight, eps, norm_dtype, scale, dtype, transpose):
    """x, residual (or None): [..., D]; weight: [D] -> (out [M, D] fp8, out_t [D, M] or [0], amax fp32 0-dim,
    h [..., D] (residual + x in residual's dtype; [0] without residual), rstd [M] fp32). out is the cast of the
    unfused norm output y (dtype norm_dtype)."""
    if residual is None:
        y, rstd = _rms_norm_fwd_cpu(x, weight, eps, norm_dtype)
        h = x.new_empty(0)
    else:
        y, h, rstd = _add_rms_norm_fwd_cpu(x, residual, weight, eps, norm_dtype)
    out, out_t, amax = reference.fp8_cast(y.reshape(-1, y.shape[-1]), scale, dtype, transpose)
    return out, out_t, amax, h, rstd


def _swiglu_fp8_cpu(gate, up, scale, dtype, transpose):
    """gate, up: [..., F] -> (out [M, F] fp8, out_t [F, M] or [0], amax): the cast of swiglu_fwd's output (computed
    in fp32, rounded once to gate's dtype, as csrc/swiglu)."""
    s = _swiglu_fwd_cpu(gate, up)
    return reference.fp8_cast(s.reshape(-1, s.shape[-1]), scale, dtype, transpose)


library.define("rms_norm_fp8_fwd(Tensor x, Tensor? residual, Tensor weight, float eps, ScalarType norm_dtype, "
               "Tensor scale, ScalarType dtype, bool transpose) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
               _rms_norm_fp8_cpu)
library.define("swiglu_fp8_fwd(Tensor gate, Tensor up, Tensor scale, ScalarType dtype, bool transpose) "
               "-> (Tensor, Tensor, Tensor)", _swiglu_fp8_cpu)


def _fp8_outputs(x: torch.Tensor, dtype: torch.dtype, transpose: bool):
    cols = x.shape[-1]
    rows = x.numel() // cols if cols else 0
    out_t = x.new_empty((cols, rows) if transpose else (0,), dtype=dtype)
    return x.new_empty((rows, cols), dtype=dtype), out_t, x.new_empty((), dtype=torch.float32)


@torch.library.register_fake("herd::rms_norm_fp8_fwd")
def _rms_norm_fp8_fake(x, residual, weight, eps, norm_dtype, scale, dtype, transpose):
    out, out_t, amax = _fp8_outputs(x, dtype, transpose)
    h = residual.new_empty(residual.shape) if residual is not None else x.new_empty(0)
    return out, out_t, amax, h, x.new_empty(out.shape[0], dtype=torch.float32)


@torch.library.register_fake("herd::swiglu_fp8_fwd")
def _swiglu_fp8_fake(gate, up, scale, dtype, transpose):
    return _fp8_outputs(gate, dtype, transpose)


def _scale_ok(scale: torch.Tensor, x: torch.Tensor) -> bool:
    return scale.dtype == torch.float32 and scale.numel() == 1 and scale.device == x.device


def rms_norm_fp8_kernel_applies(x: torch.Tensor, residual: Optional[torch.Tensor], weight: torch.Tensor,
                                norm_dtype: torch.dtype, scale: torch.Tensor, dtype: torch.dtype) -> bool:
    """The CUDA kernel exists and takes these tensors: bf16/fp32 x, residual, weight and norm_dtype, e4m3 output, D a
    multiple of 16 up to norm.MAX_DIM, weight [D], residual of x's shape and of the dtype residual + x has, all on
    one device."""
    dim = x.shape[-1] if x.dim() else 0
    same = (weight, scale) + ((residual,) if residual is not None else ())
    return (library.fused("rms_norm_fp8_fwd", x) and x.dtype in _DTYPES and weight.dtype in _DTYPES
            and norm_dtype in _DTYPES and dtype == _KERNEL_FP8 and 16 <= dim <= MAX_DIM and dim % 16 == 0
            and tuple(weight.shape) == (dim,) and _scale_ok(scale, x) and all(t.device == x.device for t in same)
            and (residual is None or (residual.shape == x.shape and residual.dtype in _DTYPES
                                      and torch.promote_types(x.dtype, residual.dtype) == residual.dtype)))


def swiglu_fp8_kernel_applies(gate: torch.Tensor, up: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> bool:
    """The CUDA kernel exists and takes these: gate and up of one shape and dtype (bf16/fp32), on one device, e4m3
    output."""
    return (library.fused("swiglu_fp8_fwd", gate) and gate.dtype in _DTYPES and up.dtype == gate.dtype
            and up.shape == gate.shape and up.device == gate.device and gate.dim() >= 1 and dtype == _KERNEL_FP8
            and _scale_ok(scale, gate))


def rms_norm_fp8(x: torch.Tensor, residual: Optional[torch.Tensor], weight: torch.Tensor, eps: float,
                 norm_dtype: torch.dtype, scale: torch.Tensor, dtype: torch.dtype, transpose: bool):
    """herd::rms_norm_fp8_fwd: the kernel where it applies (rms_norm_fp8_kernel_applies), the reference otherwise.
    No autograd here: engine/fp8/fused_cast.py's autograd function calls it."""
    if rms_norm_fp8_kernel_applies(x, residual, weight, norm_dtype, scale, dtype):
        return torch.ops.herd.rms_norm_fp8_fwd(x, residual, weight, eps, norm_dtype, scale, dtype, transpose)
    return _rms_norm_fp8_cpu(x, residual, weight, eps, norm_dtype, scale, dtype, transpose)


def swiglu_fp8(gate: torch.Tensor, up: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, transpose: bool):
    """herd::swiglu_fp8_fwd: the kernel where it applies, the reference otherwise (no autograd, as rms_norm_fp8)."""
    if swiglu_fp8_kernel_applies(gate, up, scale, dtype):
        return torch.ops.herd.swiglu_fp8_fwd(gate, up, scale, dtype, transpose)
    return _swiglu_fp8_cpu(gate, up, scale, dtype, transpose)
