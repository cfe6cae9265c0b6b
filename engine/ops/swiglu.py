"""SwiGLU (Shazeer 2020) as the ops `herd::swiglu_fwd` and `herd::swiglu_bwd`; the CUDA kernels are csrc/swiglu.

The fused forward saves only gate and up for the backward (the reference's autograd also keeps silu(gate)), and the
backward produces both input gradients in one pass. The public `swiglu` runs the plain reference
(engine/ops/reference.py) on CPU, so CPU numerics stay exactly the reference's.
"""

from typing import Tuple

import torch

from engine.ops import library, reference

_DTYPES = (torch.bfloat16, torch.float32)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for bf16/fp32 (what the kernels compute in); float64 stays float64 so gradcheck can run the CPU ops."""
    return torch.promote_types(dtype, torch.float32)


def _swiglu_fwd_cpu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate, up: [..., ffn] -> silu(gate) * up [..., ffn] contiguous: the reference in fp32 (float64 for float64),
    rounded once to the inputs' dtype, as the CUDA kernel computes it (for fp32 inputs: the reference exactly)."""
    acc = _compute_dtype(gate.dtype)
    return reference.swiglu(gate.to(acc), up.to(acc)).to(gate.dtype).contiguous()


def swiglu_bwd_reference(dout: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Gradients of out = silu(g) * u, silu(g) = g * sig(g) (so d silu / dg = sig * (1 + g * (1 - sig))):
        dgate = dout * u * sig(g) * (1 + g * (1 - sig(g))),   dup = dout * silu(g)
    in fp32 (float64 for float64). dout, gate, up: [..., ffn] -> (dgate, dup) [..., ffn] in gate's dtype."""
    acc = _compute_dtype(gate.dtype)
    d, g, u = dout.to(acc), gate.to(acc), up.to(acc)
    sig = torch.sigmoid(g)
    dgate = d * u * (sig * (1 + g * (1 - sig)))
    dup = d * (g * sig)
    return dgate.to(gate.dtype).contiguous(), dup.to(up.dtype).contiguous()


library.define("swiglu_fwd(Tensor gate, Tensor up) -> Tensor", _swiglu_fwd_cpu)
library.define("swiglu_bwd(Tensor dout, Tensor gate, Tensor up) -> (Tensor, Tensor)", swiglu_bwd_reference)


@torch.library.register_fake("herd::swiglu_fwd")
def _swiglu_fwd_fake(gate, up):
    return torch.empty_like(gate, memory_format=torch.contiguous_format)


@torch.library.register_fake("herd::swiglu_bwd")
def _swiglu_bwd_fake(dout, gate, up):
    return (torch.empty_like(gate, memory_format=torch.contiguous_format),
            torch.empty_like(up, memory_format=torch.contiguous_format))


def _setup_context(ctx, inputs, output):
    gate, up = inputs
    ctx.save_for_backward(gate, up)


def _backward(ctx, dout):
    gate, up = ctx.saved_tensors
    dgate, dup = torch.ops.herd.swiglu_bwd(dout, gate, up)
    return dgate, dup


torch.library.register_autograd("herd::swiglu_fwd", _backward, setup_context=_setup_context)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up. gate, up: [..., ffn] -> [..., ffn]. Fused (csrc/swiglu) for bf16/fp32 CUDA tensors of one
    shape and dtype when the kernel is built; the plain reference otherwise."""
    if (library.fused("swiglu_fwd", gate) and up.device == gate.device and gate.dtype in _DTYPES
            and up.dtype == gate.dtype and up.shape == gate.shape):
        return torch.ops.herd.swiglu_fwd(gate, up)
    return reference.swiglu(gate, up)
