"""Fused RoPE (csrc/rope) on Llama-3-8B shapes: q [1, 8192, 32, 128] and k [1, 8192, 8, 128] bf16 rotated in place
in one launch, with fp32 cos/sin tables [1, 8192, 1, 64]. Bytes = q and k read and written once + cos and sin read
once.

The backward case is what engine/ops/rope.py's autograd runs: the incoming gradients (they may be shared, so they
are never rotated in place) rotated back into new tensors by herd::rope(inverse=True), one read and one write.
(Until 2026-11-27 it was a contiguous copy followed by the in-place kernel: twice the traffic.)"""

from typing import List

import torch

from benchmarks.kernels.harness import Case
from engine.ops import reference

TOKENS, HQ, HK, HEAD_DIM, THETA = 8192, 32, 8, 128, 500000.0


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _tables():
    inv_freq = 1.0 / (THETA ** (torch.arange(0, HEAD_DIM, 2, device="cuda").float() / HEAD_DIM))  # [d/2]
    angles = torch.outer(torch.arange(TOKENS, device="cuda").float(), inv_freq)  # [s, d/2]
    return angles.cos()[None, :, None], angles.sin()[None, :, None]  # [1, s, 1, d/2] each


def cases() -> List[Case]:
    q = torch.randn(1, TOKENS, HQ, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, TOKENS, HK, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    cos, sin = _tables()
    moved = 2 * _nbytes(q, k) + _nbytes(cos, sin)
    shape = f"q 1x{TOKENS}x{HQ}x{HEAD_DIM} + k 1x{TOKENS}x{HK}x{HEAD_DIM} bf16"
    neg_sin = -sin

    def fused_bwd():  # _RopeQK.backward
        return torch.ops.herd.rope(q, k, cos, sin, True)

    return [
        Case("rope fwd (in place)", shape, lambda: torch.ops.herd.rope_(q, k, cos, sin, False),
             lambda: (reference.apply_rope(q, cos, sin), reference.apply_rope(k, cos, sin)), moved),
        Case("rope bwd (out of place)", shape, fused_bwd,
             lambda: (reference.apply_rope(q, cos, neg_sin), reference.apply_rope(k, cos, neg_sin)), moved),
    ]
