"""Context-parallel attention cores (parallel/context_parallel.py) on gloo ranks against the dense-mask oracle of
one process: output and q, k, v gradients of every rank's zigzag share, for cp = 4 and cp = 2, all_gather and
ring, with and without document masks, in fp64 (exact to 1e-12). Blocks of 8 tokens over a 128-token sequence,
so each rank's plan skips, masks and keeps whole blocks across rank boundaries (the parity harness trains the
model under the same cores at the kernel's real block size)."""

import torch

from engine.model.attention import causal_attention, document_causal_mask
from parallel.context_parallel import shard_sequence
from parallel.multiprocess import run_on_ranks
from tests.distributed.cp_attention_ranks import cp_attention_grads
from tests.unit.test_attention import random_docs


def test_cp_cores_equal_one_process():
    seq, world = 128, 4
    gen = torch.Generator().manual_seed(12)
    shape = lambda heads: (2, seq, heads, 8)  # noqa: E731
    tensors = {"q": torch.randn(shape(4), generator=gen, dtype=torch.float64),
               "k": torch.randn(shape(2), generator=gen, dtype=torch.float64),
               "v": torch.randn(shape(2), generator=gen, dtype=torch.float64),
               "grad": torch.randn(shape(4), generator=gen, dtype=torch.float64)}
    cases = {"documents": {**tensors, "docs": random_docs(2, seq, 20.0, seed=13)}, "causal": {**tensors, "docs": None}}
    expected = {}
    for case, inputs in cases.items():
        q, k, v = (inputs[name].clone().requires_grad_() for name in ("q", "k", "v"))
        out = causal_attention(q, k, v, document_causal_mask(None, inputs["docs"]))  # None: SDPA is_causal
        expected[case] = [out.detach(), *torch.autograd.grad(out, (q, k, v), inputs["grad"])]
    results = run_on_ranks(cp_attention_grads, world, cases, 8)
    worst = 0.0
    for rank, result in enumerate(results):
        assert len(result) == 2 * 2 * 2  # cases x cp degrees x variants
        for (case, cp, variant), got in result.items():
            cp_rank = rank if cp == world else rank % 2
            want = [shard_sequence(t, cp, cp_rank) for t in expected[case]]
            for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
                error = (a - b).abs().max().item()
                worst = max(worst, error)
                assert error < 1e-12, f"rank {rank} {case} cp={cp} {variant} {name}: {error:.2e}"
    print(f"largest absolute difference over ranks, cases, variants, out and gradients: {worst:.1e}")
