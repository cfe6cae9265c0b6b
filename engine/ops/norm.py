"""RMSNorm (Zhang & Sennrich 2019) as the ops `herd::rms_norm_fwd`, `herd::add_rms_norm_fwd` (with the pre-norm
block's residual add fused in) and `herd::rms_norm_bwd`; the CUDA kernels are csrc/rms_norm.

The CPU kernels below are the reference (engine/ops/reference.py `rms_norm`) written out with its rstd kept for
the backward; the public functions run the plain reference on CPU, so CPU numerics stay exactly the reference's.
"""

import math
from typing import Tuple

import torch

from engine.ops import library, reference

MAX_DIM = 16384  # the kernels keep a row in registers: csrc/rms_norm/rms_norm.cu (kMaxThreads * kChunks * 8)
_KERNEL_DTYPES = (torch.float32, torch.bfloat16)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32, as the reference computes; float64 stays float64 so gradcheck can run the CPU ops."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _rms_norm_fwd_cpu(x, weight, eps, out_dtype):
    """x: [..., D], weight: [D] -> (y [..., D] out_dtype, rstd [rows] fp32): the reference's operations."""
    xa = x.to(_acc_dtype(x.dtype))
    rstd = torch.rsqrt(xa.pow(2).mean(-1, keepdim=True) + eps)  # [..., 1]
    y = weight * (xa * rstd).to(x.dtype)
    return y.to(out_dtype), rstd.reshape(-1)


def _add_rms_norm_fwd_cpu(x, residual, weight, eps, out_dtype):
    """h = residual + x (fp32 add, stored in residual's dtype) -> (y, h, rstd)."""
    acc = _acc_dtype(residual.dtype)
    h = (residual.to(acc) + x.to(acc)).to(residual.dtype)
    y, rstd = _rms_norm_fwd_cpu(h, weight, eps, out_dtype)
    return y, h, rstd


def rms_norm_bwd_reference(dy, h, weight, rstd, dh_extra=None):
    """Gradients of y = weight * round(n), n = h * rstd, rstd = (mean(h^2) + eps)^-1/2 (round: to h's dtype, which
    passes gradients through). With g = dy * weight and d rstd / dh_j = -rstd^3 h_j / D:
        dh = rstd * (g - n * mean(g * n)) (+ dh_extra),   dweight = sum over rows of dy * round(n).
    dy, h, dh_extra: [..., D]; weight: [D]; rstd: [rows] -> (dh in h's dtype, dweight in weight's dtype)."""
    acc = _acc_dtype(h.dtype)
    r = rstd.to(acc).reshape(h.shape[:-1] + (1,))
    n = h.to(acc) * r
    g = dy.to(acc) * weight.to(acc)
    dh = r * (g - n * (g * n).mean(-1, keepdim=True))
    if dh_extra is not None:
        dh = dh + dh_extra.to(acc)
    dweight = (dy.to(acc) * n.to(h.dtype).to(acc)).reshape(-1, h.shape[-1]).sum(0)
    return dh.to(h.dtype), dweight.to(weight.dtype)


library.define("rms_norm_fwd(Tensor x, Tensor weight, float eps, ScalarType out_dtype) -> (Tensor, Tensor)",
               _rms_norm_fwd_cpu)
library.define("add_rms_norm_fwd(Tensor x, Tensor residual, Tensor weight, float eps, ScalarType out_dtype) "
               "-> (Tensor, Tensor, Tensor)", _add_rms_norm_fwd_cpu)
library.define("rms_norm_bwd(Tensor dy, Tensor h, Tensor weight, Tensor rstd, Tensor? dh_extra) -> (Tensor, Tensor)",
               rms_norm_bwd_reference)


def _rows(x: torch.Tensor):
    return math.prod(x.shape[:-1])


@torch.library.register_fake("herd::rms_norm_fwd")
def _rms_norm_fwd_fake(x, weight, eps, out_dtype):
    return x.new_empty(x.shape, dtype=out_dtype), x.new_empty(_rows(x), dtype=_acc_dtype(x.dtype))


@torch.library.register_fake("herd::add_rms_norm_fwd")
def _add_rms_norm_fwd_fake(x, residual, weight, eps, out_dtype):
    return (x.new_empty(x.shape, dtype=out_dtype), residual.new_empty(residual.shape),
            x.new_empty(_rows(x), dtype=_acc_dtype(residual.dtype)))


@torch.library.register_fake("herd::rms_norm_bwd")
def _rms_norm_bwd_fake(dy, h, weight, rstd, dh_extra):
    return h.new_empty(h.shape), weight.new_empty(weight.shape)


def _rms_norm_setup(ctx, inputs, output):
    x, weight, _, _ = inputs
    ctx.save_for_backward(x, weight, output[1])


def _rms_norm_backward(ctx, dy, _drstd):
    x, weight, rstd = ctx.saved_tensors
    if dy is None:  # only rstd was used: nothing flows back
        return None, None, None, None
    dx, dweight = torch.ops.herd.rms_norm_bwd(dy, x, weight, rstd, None)
    return dx, dweight, None, None


def _add_rms_norm_setup(ctx, inputs, output):
    x, residual, weight, _, _ = inputs
    ctx.dtypes = (x.dtype, residual.dtype)
    ctx.save_for_backward(output[1], weight, output[2])  # h, weight, rstd


def _add_rms_norm_backward(ctx, dy, dh, _drstd):
    """h = residual + x feeds both the norm and the residual path (dh): x and residual get the same gradient."""
    h, weight, rstd = ctx.saved_tensors
    if dy is None:  # y unused: only the residual path carries a gradient
        dy = torch.zeros_like(h)
    dsum, dweight = torch.ops.herd.rms_norm_bwd(dy, h, weight, rstd, dh)
    x_dtype, residual_dtype = ctx.dtypes
    return dsum.to(x_dtype), dsum.to(residual_dtype), dweight, None, None


torch.library.register_autograd("herd::rms_norm_fwd", _rms_norm_backward, setup_context=_rms_norm_setup)
torch.library.register_autograd("herd::add_rms_norm_fwd", _add_rms_norm_backward, setup_context=_add_rms_norm_setup)


def _out_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The autocast dtype under CUDA autocast: the next matmul would cast the reference's (promoted) output to it
    anyway, so the values match the reference's there; else what the reference returns."""
    if torch.is_autocast_enabled("cuda"):
        return torch.get_autocast_dtype("cuda")
    return torch.promote_types(x.dtype, weight.dtype)


def _kernel_applies(name: str, out_dtype: torch.dtype, x: torch.Tensor, weight: torch.Tensor,
                    *others: torch.Tensor) -> bool:
    """The CUDA kernel exists and takes these tensors (fp32/bf16, D <= MAX_DIM, weight [D], all on x's device);
    else the reference runs."""
    return (library.fused(name, x) and 1 <= x.shape[-1] <= MAX_DIM and tuple(weight.shape) == (x.shape[-1],)
            and out_dtype in _KERNEL_DTYPES
            and all(t.dtype in _KERNEL_DTYPES and t.device == x.device for t in (weight, *others))
            and x.dtype in _KERNEL_DTYPES)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm: weight * (x / sqrt(mean(x^2) + eps)) normalized in fp32. x: [..., D], weight: [D] -> [..., D]."""
    out_dtype = _out_dtype(x, weight)
    if not _kernel_applies("rms_norm_fwd", out_dtype, x, weight):
        return reference.rms_norm(x, weight, eps)
    return torch.ops.herd.rms_norm_fwd(x, weight, eps, out_dtype)[0]


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """h = residual + x and rms_norm(h): the pre-norm block's residual add fused with the next norm.

    x (branch output), residual (stream): [..., D]; weight: [D] -> (normed [..., D], h [..., D]).
    The kernel stores h in residual's dtype, so it runs only where that is what `residual + x` gives.
    """
    out_dtype = _out_dtype(residual, weight)
    fused = (_kernel_applies("add_rms_norm_fwd", out_dtype, x, weight, residual) and residual.shape == x.shape
             and torch.promote_types(x.dtype, residual.dtype) == residual.dtype)
    if not fused:
        h = residual + x
        return reference.rms_norm(h, weight, eps), h
    y, h, _ = torch.ops.herd.add_rms_norm_fwd(x, residual, weight, eps, out_dtype)
    return y, h


__all__ = ["MAX_DIM", "add_rms_norm", "rms_norm", "rms_norm_bwd_reference"]
