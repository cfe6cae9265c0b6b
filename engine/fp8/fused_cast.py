"""FP8 casts fused into the ops before the FP8 layers (config `fp8.fuse_norm_cast`, `fp8.fuse_swiglu_cast`).

Every consumer of a block's attention norm (wq/wk/wv or wqkv), of its MLP norm (w1/w3 or w13) and of its SwiGLU (w2)
is a Float8Linear that reads one quantization of that activation (native.InputShare). With these switches the
producing op quantizes instead: RMSNorm (with the residual add) or SwiGLU writes the e4m3 tensor, its transposed
copy and its amax in one pass (herd::rms_norm_fp8_fwd, herd::swiglu_fp8_fwd; csrc/rms_norm, csrc/swiglu) and offers them to
the consumers' InputShare. The bf16 activation is never written nor read again: autograd gets a carrier in its
place (native.fp8_carrier: the activation's shape and dtype, no memory), whose gradient is the ordinary one.
The backward of the norm and of SwiGLU is unchanged (it reads the norm's input and rstd, SwiGLU's gate and up).

Delayed scaling only (config checks refuse recipe tensorwise): the scale must be known before the one pass, and with
current scaling it is max|y| of the very tensor being produced, which a second pass over the inputs would have to
measure first. The step that fills a fresh window (native.ScalingState: it scales by the current amax) takes the
unfused path, as do: inference mode (its tensors have no version counter for InputShare), torch.compile tracing
(this is host-side state compile does not trace), CUDA tensors the kernels do not take (then the unfused ops and
kernels run, with the same numbers) and shapes cuBLASLt's FP8 GEMM refuses.

Paths. On CUDA with the kernel: autograd functions around the fused ops (`_NormFP8`, `_AddNormFP8`, `_SwiGLUFP8`),
backward by the unfused ops' kernels (rms_norm_bwd, swiglu_bwd). On CPU (the proof path): the unfused ops with
their own autograd, the cast through the same ScalingState, and the carrier: bitwise the unfused run by
construction of the values, which tests/unit/test_fp8_fused_cast.py checks end to end (losses, parameters,
windows), while tests/unit check the fused ops' references and the device-path functions against the unfused ops
on CPU tensors and tests/gpu the kernels against those references.
"""

from typing import List, Optional, Sequence

import torch
from torch import nn

from engine import ops
from engine.fp8 import native
from engine.fp8.native import E4M3, Float8Linear, fp8_carrier
from engine.ops.fp8_cast import fp8_cast
from engine.ops.fp8_fused import (rms_norm_fp8, rms_norm_fp8_kernel_applies, swiglu_fp8,
                                  swiglu_fp8_kernel_applies)
from engine.ops.norm import _out_dtype


class _Carrier(torch.autograd.Function):
    """CPU path: y -> a carrier of y's shape and dtype; the carrier's gradient is y's."""

    @staticmethod
    def forward(ctx, y):
        return fp8_carrier(y, y.shape, y.dtype)

    @staticmethod
    def backward(ctx, dy):
        return dy


class _NormFP8(torch.autograd.Function):
    """Device path of y = rmsnorm(x) * weight quantized to e4m3: forward herd::rms_norm_fp8_fwd, backward
    herd::rms_norm_bwd (norm.py's autograd of rms_norm_fwd). box["quantized"] gets (y_fp8 [M, D], y_fp8^T or
    empty, 1/scale) for the consumers."""

    @staticmethod
    def forward(ctx, x, weight, eps, norm_dtype, state, transpose, box):
        rstd = _cast_into(box, state, lambda scale: rms_norm_fp8(x, None, weight, eps, norm_dtype, scale, E4M3,
                                                                 transpose))[1]
        ctx.save_for_backward(x, weight, rstd)
        return fp8_carrier(x, x.shape, norm_dtype)

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        dx, dweight = torch.ops.herd.rms_norm_bwd(dy, x, weight, rstd, None)
        return dx, dweight, None, None, None, None, None


class _AddNormFP8(torch.autograd.Function):
    """Device path of h = residual + x, y = rmsnorm(h) * weight quantized to e4m3 -> (carrier of y, h); backward as
    norm.py's add_rms_norm_fwd (x and residual get the same gradient)."""

    @staticmethod
    def forward(ctx, x, residual, weight, eps, norm_dtype, state, transpose, box):
        h, rstd = _cast_into(box, state, lambda scale: rms_norm_fp8(x, residual, weight, eps, norm_dtype, scale,
                                                                    E4M3, transpose))
        ctx.dtypes = (x.dtype, residual.dtype)
        ctx.save_for_backward(h, weight, rstd)
        return fp8_carrier(x, x.shape, norm_dtype), h

    @staticmethod
    def backward(ctx, dy, dh):
        h, weight, rstd = ctx.saved_tensors
        if dy is None:
            dy = torch.zeros_like(h)
        dsum, dweight = torch.ops.herd.rms_norm_bwd(dy, h, weight, rstd, dh)
        x_dtype, residual_dtype = ctx.dtypes
        return dsum.to(x_dtype), dsum.to(residual_dtype), dweight, None, None, None, None, None


class _SwiGLUFP8(torch.autograd.Function):
    """Device path of silu(gate) * up quantized to e4m3: forward herd::swiglu_fp8_fwd, backward herd::swiglu_bwd."""

    @staticmethod
    def forward(ctx, gate, up, state, transpose, box):
        _cast_into(box, state, lambda scale: swiglu_fp8(gate, up, scale, E4M3, transpose) + (None, None))
        ctx.save_for_backward(gate, up)
        return fp8_carrier(gate, gate.shape, gate.dtype)

    @staticmethod
    def backward(ctx, dout):
        gate, up = ctx.saved_tensors
        dgate, dup = torch.ops.herd.swiglu_bwd(dout, gate, up)
        return dgate, dup, None, None, None


def _cast_into(box: dict, state: native.ScalingState, fused_op):
    """Run `fused_op(scale)` -> (out, out_t, amax, extra1, extra2) under the delayed recipe of `state`; the
    quantization goes to box["quantized"]; returns (extra1, extra2)."""
    extras = []

    def cast(scale):
        out, out_t, amax, *rest = fused_op(scale)
        extras.extend(rest)
        return out, out_t, amax
    box["quantized"] = state.cast_delayed(cast, fused=True)
    return tuple(extras)


class _FusedCast:
    """What the consumers of one activation have in common: their InputShare and input ScalingState."""

    def __init__(self, consumers: Sequence[Float8Linear]):
        self.consumers = list(consumers)
        self.state, self.share = consumers[0].input_scaling, consumers[0].input_share

    def applies(self, x: torch.Tensor) -> bool:
        """The fused path may run on x (the op's main input, [..., K]); see the module docstring for the others.
        A recomputation (activation checkpointing) takes the path its forward took."""
        if self.state.replay is not None:
            return self.state.replays_fused()
        if (torch.is_inference_mode_enabled() or x.is_inference() or torch.compiler.is_compiling()
                or self.state.recipe != "delayed" or not self.state.filled
                or not self.state.recording):
            return False
        rows = x.numel() // x.shape[-1] if x.dim() and x.shape[-1] else 0
        return not x.is_cuda or all(native._gemm_ok(rows, *layer.weight.shape) for layer in self.consumers)

    @property
    def transpose(self) -> bool:
        return self.consumers[0].weight.requires_grad

    def offer(self, carrier: torch.Tensor, quantized) -> torch.Tensor:
        self.share.offer(carrier, self.transpose, quantized)
        return carrier

    def cpu_path(self, y: torch.Tensor) -> torch.Tensor:
        """y computed by the unfused op (with its autograd) -> its carrier, y quantized as the consumers would."""
        with torch.no_grad():
            quantized = self.state.cast_delayed(
                lambda scale: fp8_cast(y.reshape(-1, y.shape[-1]), scale, E4M3, self.transpose), fused=True)
        return self.offer(_Carrier.apply(y), quantized)


class NormToFP8(_FusedCast):
    """RMSNorm.fp8_output: the norm's output in e4m3 for its FP8 consumers (same call and returns as
    RMSNorm.forward: the normed tensor, or with `residual` (normed, residual + x))."""

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, eps: float, residual: Optional[torch.Tensor] = None):
        if not self.applies(x):
            return ops.rms_norm(x, weight, eps) if residual is None else ops.add_rms_norm(x, residual, weight, eps)
        if not x.is_cuda:
            if residual is None:
                return self.cpu_path(ops.rms_norm(x, weight, eps))
            y, h = ops.add_rms_norm(x, residual, weight, eps)
            return self.cpu_path(y), h
        return self.device_path(x, weight, eps, residual)

    def device_path(self, x, weight, eps, residual=None, force: bool = False):
        """The fused op in its autograd function (`force`: also where the kernel does not apply, as tests do on
        CPU, where the op runs its reference); the unfused ops where the kernel does not apply."""
        norm_dtype = _out_dtype(x if residual is None else residual, weight)
        if not force and not rms_norm_fp8_kernel_applies(x, residual, weight, norm_dtype, self.state.scale, E4M3):
            return ops.rms_norm(x, weight, eps) if residual is None else ops.add_rms_norm(x, residual, weight, eps)
        box = {}
        if residual is None:
            carrier = _NormFP8.apply(x, weight, eps, norm_dtype, self.state, self.transpose, box)
            return self.offer(carrier, box["quantized"])
        carrier, h = _AddNormFP8.apply(x, residual, weight, eps, norm_dtype, self.state, self.transpose, box)
        return self.offer(carrier, box["quantized"]), h


class SwiGLUToFP8(_FusedCast):
    """FeedForward.fp8_activation: silu(gate) * up in e4m3 for w2."""

    def __call__(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        if not self.applies(gate):
            return ops.swiglu(gate, up)
        if not gate.is_cuda:
            return self.cpu_path(ops.swiglu(gate, up))
        return self.device_path(gate, up)

    def device_path(self, gate, up, force: bool = False):
        if not force and not swiglu_fp8_kernel_applies(gate, up, self.state.scale, E4M3):
            return ops.swiglu(gate, up)
        box = {}
        carrier = _SwiGLUFP8.apply(gate, up, self.state, self.transpose, box)
        return self.offer(carrier, box["quantized"])


def _shared(group: List[Float8Linear]) -> List[Float8Linear]:
    """One InputShare and input ScalingState over the group (convert gives them to wq/wk/wv and w1/w3 already)."""
    share = group[0].input_share
    if share is None or any(layer.input_share is not share for layer in group):
        native._share_input(group)
    return group


def attach(block: nn.Module, cfg) -> List[str]:
    """Give a converted transformer block's norms (fp8.fuse_norm_cast) and SwiGLU (fp8.fuse_swiglu_cast) their
    FP8 outputs; returns which ("attention_norm", "ffn_norm", "swiglu")."""
    attention, mlp, done = block.attention, block.feed_forward, []
    if cfg.fuse_norm_cast:
        qkv = [attention.wqkv] if attention.fused else [attention.wq, attention.wk, attention.wv]
        gate_up = [mlp.w13] if mlp.fused else [mlp.w1, mlp.w3]
        block.attention_norm.fp8_output = NormToFP8(_shared(qkv))
        block.ffn_norm.fp8_output = NormToFP8(_shared(gate_up))
        done += ["attention_norm", "ffn_norm"]
    if cfg.fuse_swiglu_cast:
        mlp.fp8_activation = SwiGLUToFP8(_shared([mlp.w2]))
        done.append("swiglu")
    return done
