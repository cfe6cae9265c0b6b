"""Fused SwiGLU (csrc/swiglu) on the Llama-3-8B MLP shape: gate and up [8192 tokens, 14336 ffn] bf16. Bytes:
forward reads gate and up and writes out; backward reads dout, gate and up and writes dgate and dup. The eager
backward is the explicit derivative (engine/ops/swiglu.py swiglu_bwd_reference), the same work as the kernel."""

from typing import List

import torch

from benchmarks.kernels.harness import Case
from engine.ops import reference
from engine.ops.swiglu import swiglu_bwd_reference

TOKENS, FFN = 8192, 14336


def cases() -> List[Case]:
    gate, up, dout = (torch.randn(TOKENS, FFN, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    nbytes = gate.numel() * gate.element_size()
    shape = f"{TOKENS}x{FFN} bf16"
    return [
        Case("swiglu fwd", shape, lambda: torch.ops.herd.swiglu_fwd(gate, up),
             lambda: reference.swiglu(gate, up), 3 * nbytes),
        Case("swiglu bwd", shape, lambda: torch.ops.herd.swiglu_bwd(dout, gate, up),
             lambda: swiglu_bwd_reference(dout, gate, up), 5 * nbytes),
    ]
