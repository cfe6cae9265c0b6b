"""Fused cross-entropy (csrc/cross_entropy) on the Llama-3-8B loss shape: logits [tokens 8192, vocab 128256] bf16
(2.1 GB), single device; the same kernels run on a tensor-parallel shard [8192, 128256 / tp].

Bytes moved (the minimum): the forward reads the logits once (plus targets [N] int64 and three [N] fp32 outputs);
the backward reads the logits and writes dlogits (plus grad, lse [N] fp32 and targets). The eager forward is the
reference loss (engine/ops/reference.py cross_entropy_sum: an fp32 copy of the logits, then F.cross_entropy); the
eager backward is what autograd runs for it: fp32 softmax minus the one-hot, times the upstream gradient, cast to
bf16. The compiled ones are the same under torch.compile.
"""

from typing import List

import torch

from benchmarks.kernels.harness import Case
from engine.ops import reference

TOKENS, VOCAB = 8192, 128256


def _eager_backward(logits, targets, grad):
    probs = torch.softmax(logits.float(), dim=-1)  # [N, V] fp32
    probs[torch.arange(logits.shape[0], device=logits.device), targets] -= 1.0
    return (probs * grad[:, None]).to(logits.dtype)


def cases() -> List[Case]:
    logits = torch.randn(TOKENS, VOCAB, device="cuda", dtype=torch.bfloat16)  # [N, V]
    targets = torch.randint(0, VOCAB, (TOKENS,), device="cuda")
    mask = torch.ones(TOKENS, dtype=torch.bool, device="cuda")
    grad = torch.ones(TOKENS, device="cuda")  # every token counts (no row skipped)
    lse = torch.logsumexp(logits.float(), dim=-1)
    n, shape = logits.numel(), f"{TOKENS}x{VOCAB} bf16"
    small = TOKENS * (8 + 4 + 4)  # targets, and two [N] fp32 vectors

    def eager_forward():
        with torch.no_grad():
            return reference.cross_entropy_sum(logits[None], targets[None], mask[None])

    return [
        Case("cross_entropy fwd", shape, lambda: torch.ops.herd.cross_entropy_fwd(logits, targets, 0, VOCAB),
             eager_forward, bytes_moved=2 * n + small + TOKENS * 4),
        Case("cross_entropy bwd", shape,
             lambda: torch.ops.herd.cross_entropy_bwd(grad, logits, targets, lse, 0, VOCAB),
             lambda: _eager_backward(logits, targets, grad), bytes_moved=2 * n + 2 * n + small),
    ]
