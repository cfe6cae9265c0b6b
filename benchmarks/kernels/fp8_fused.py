"""FP8 casts fused into RMSNorm and SwiGLU (herd::rms_norm_fp8_fwd in csrc/rms_norm, herd::swiglu_fp8_fwd in
csrc/swiglu; engine/ops/fp8_fused.py) on Llama-3-8B activation shapes, as the model runs them under bf16 autocast:
the MLP norm (bf16 branch output + fp32 residual stream, fp32 weight, 8192 x 4096) and SwiGLU (bf16 gate and up,
8192 x 14336), each writing the e4m3 tensor, its transposed copy and the amax.

Columns, unlike the other rows: "eager" here is herd's unfused path, the norm (or SwiGLU) kernel writing bf16 and
then csrc/fp8_cast reading it back (what fp8.fuse_*_cast=false runs); "compiled" is torch.compile of the op's
pure-torch reference (the same two steps). Bytes moved: the one-pass minimum (inputs, h, the two fp8 copies,
rstd); the fused path today writes the e4m3 tensor and transposes it in a second, byte-sized pass.
"""

from typing import List

import torch

from benchmarks.kernels.harness import Case
from engine.ops import fp8_fused

TOKENS, DIM, FFN, EPS = 8192, 4096, 14336, 1e-5
E4M3 = torch.float8_e4m3fn


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _norm_case() -> Case:
    x = torch.randn(TOKENS, DIM, device="cuda", dtype=torch.bfloat16)  # attention output (bf16 GEMM)
    residual = torch.randn(TOKENS, DIM, device="cuda")  # fp32 stream
    weight = torch.ones(DIM, device="cuda")
    scale = torch.full((), 64.0, device="cuda")
    bf16 = torch.bfloat16
    q, q_t, amax, h, rstd = torch.ops.herd.rms_norm_fp8_fwd(x, residual, weight, EPS, bf16, scale, E4M3, True)

    def unfused():
        y, h, _ = torch.ops.herd.add_rms_norm_fwd(x, residual, weight, EPS, bf16)
        return torch.ops.herd.fp8_cast(y, scale, E4M3, True), h

    def reference():
        return fp8_fused._rms_norm_fp8_cpu(x, residual, weight, EPS, bf16, scale, E4M3, True)

    return Case("add_rms_norm+fp8+t (eager: norm kernel, then cast kernel)",
                f"{TOKENS}x{DIM} x bf16 + residual fp32 -> e4m3 + t",
                lambda: torch.ops.herd.rms_norm_fp8_fwd(x, residual, weight, EPS, bf16, scale, E4M3, True), unfused,
                _nbytes(x, residual, weight, q, q_t, h, rstd), compiled=torch.compile(reference))


def _swiglu_case() -> Case:
    gate = torch.randn(TOKENS, FFN, device="cuda", dtype=torch.bfloat16)
    up = torch.randn(TOKENS, FFN, device="cuda", dtype=torch.bfloat16)
    scale = torch.full((), 64.0, device="cuda")
    q, q_t, _ = torch.ops.herd.swiglu_fp8_fwd(gate, up, scale, E4M3, True)
    return Case("swiglu+fp8+t (eager: swiglu kernel, then cast kernel)", f"{TOKENS}x{FFN} bf16 -> e4m3 + t",
                lambda: torch.ops.herd.swiglu_fp8_fwd(gate, up, scale, E4M3, True),
                lambda: torch.ops.herd.fp8_cast(torch.ops.herd.swiglu_fwd(gate, up), scale, E4M3, True),
                _nbytes(gate, up, q, q_t),
                compiled=torch.compile(lambda: fp8_fused._swiglu_fp8_cpu(gate, up, scale, E4M3, True)))


def cases() -> List[Case]:
    return [_norm_case(), _swiglu_case()]
