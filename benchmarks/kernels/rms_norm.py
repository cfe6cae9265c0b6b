"""Fused RMSNorm (csrc/rms_norm) on Llama-3-8B shapes: 8192 tokens x dim 4096, forward and backward, plain and
with the residual add. Dtypes as the model runs them under bf16 autocast: fp32 residual stream and weights, bf16
branch outputs and normed activations; plus an all-bf16 case (bf16 parameters)."""

from typing import List

import torch

from benchmarks.kernels.harness import Case
from engine.ops import reference
from engine.ops.norm import rms_norm_bwd_reference

TOKENS, DIM, EPS = 8192, 4096, 1e-5


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _fwd_cases(x_dtype, w_dtype) -> List[Case]:
    x = torch.randn(TOKENS, DIM, device="cuda").to(x_dtype)
    weight = torch.ones(DIM, device="cuda", dtype=w_dtype)
    out = torch.bfloat16
    y, rstd = torch.ops.herd.rms_norm_fwd(x, weight, EPS, out)
    shape = f"{TOKENS}x{DIM} x {str(x_dtype)[6:]} w {str(w_dtype)[6:]} -> bf16"
    return [Case("rms_norm fwd", shape, lambda: torch.ops.herd.rms_norm_fwd(x, weight, EPS, out),
                 lambda: reference.rms_norm(x, weight, EPS).to(out), _nbytes(x, weight, y, rstd))]


def _add_fwd_case() -> Case:
    x = torch.randn(TOKENS, DIM, device="cuda", dtype=torch.bfloat16)  # branch output (bf16 GEMM)
    residual = torch.randn(TOKENS, DIM, device="cuda")  # fp32 stream
    weight = torch.ones(DIM, device="cuda")
    out = torch.bfloat16
    y, h, rstd = torch.ops.herd.add_rms_norm_fwd(x, residual, weight, EPS, out)

    def eager():
        h = residual + x
        return reference.rms_norm(h, weight, EPS).to(out), h

    return Case("add_rms_norm fwd", f"{TOKENS}x{DIM} x bf16 + residual fp32 -> bf16, h fp32",
                lambda: torch.ops.herd.add_rms_norm_fwd(x, residual, weight, EPS, out), eager,
                _nbytes(x, residual, weight, y, h, rstd))


def _bwd_case(dy_dtype, h_dtype, w_dtype, extra: bool) -> Case:
    dy = torch.randn(TOKENS, DIM, device="cuda").to(dy_dtype)
    h = torch.randn(TOKENS, DIM, device="cuda").to(h_dtype)
    weight = torch.ones(DIM, device="cuda", dtype=w_dtype)
    rstd = torch.rsqrt(h.float().pow(2).mean(-1) + EPS)
    dh_extra = torch.randn(TOKENS, DIM, device="cuda").to(h_dtype) if extra else None
    dx, dw = torch.ops.herd.rms_norm_bwd(dy, h, weight, rstd, dh_extra)
    moved = _nbytes(dy, h, weight, rstd, dx, dw) + (_nbytes(dh_extra) if extra else 0)
    name = "add_rms_norm bwd" if extra else "rms_norm bwd"
    shape = f"{TOKENS}x{DIM} dy {str(dy_dtype)[6:]} h {str(h_dtype)[6:]} w {str(w_dtype)[6:]}"
    return Case(name, shape, lambda: torch.ops.herd.rms_norm_bwd(dy, h, weight, rstd, dh_extra),
                lambda: rms_norm_bwd_reference(dy, h, weight, rstd, dh_extra), moved)


def cases() -> List[Case]:
    return [*_fwd_cases(torch.float32, torch.float32), *_fwd_cases(torch.bfloat16, torch.bfloat16),
            _add_fwd_case(),
            _bwd_case(torch.bfloat16, torch.float32, torch.float32, extra=False),
            _bwd_case(torch.bfloat16, torch.bfloat16, torch.bfloat16, extra=False),
            _bwd_case(torch.bfloat16, torch.float32, torch.float32, extra=True)]
