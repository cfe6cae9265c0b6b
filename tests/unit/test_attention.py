"""The blockwise attention kernel (engine/model/attention.py) against the dense-mask SDPA oracle, its block plan,
and the memory it allocates: no tensor of s x s / 8 elements or more at a length where a dense mask would cost.

The memory check watches every operator with a TorchDispatchMode and records the largest tensor any of them
returns (forward and backward); the dense reference trips it, so the check can fail."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from engine.config import ModelConfig
from engine.model.attention import (BlockPlan, DocumentMask, attention_forward, blockwise_attention,
                                    causal_attention, document_causal_mask, document_mask)
from engine.model.init import build_model
from parallel.context_parallel import zigzag_indices


def random_docs(batch: int, seq: int, mean_length: float, seed: int) -> torch.Tensor:
    """[batch, seq] document ids of packed sequences: ids start at 0 and step by one at each document start, the
    lengths drawn from an exponential distribution (realistic packing: many short documents, a few long)."""
    gen = torch.Generator().manual_seed(seed)
    starts = torch.rand(batch, seq, generator=gen) < 1.0 / mean_length
    starts[:, 0] = False
    return torch.cumsum(starts.long(), dim=1)


def qkv(batch, seq, heads, kv_heads, dim, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    make = lambda h: torch.randn(batch, seq, h, dim, generator=gen, dtype=dtype).requires_grad_()  # noqa: E731
    return make(heads), make(kv_heads), make(kv_heads), torch.randn(batch, seq, heads, dim, generator=gen,
                                                                     dtype=dtype)


def forward_backward(q, k, v, grad, mask):
    out = causal_attention(q, k, v, mask)
    return (out, *torch.autograd.grad(out, (q, k, v), grad))


LAYOUTS = {  # name: (seq, doc ids of each of 2 rows)
    "exponential_docs": (203, lambda s: random_docs(2, s, 40.0, seed=1)),
    "one_document": (96, lambda s: torch.zeros(2, s, dtype=torch.long)),
    "every_token_its_own": (50, lambda s: torch.arange(s).expand(2, s)),
    "rows_differ": (160, lambda s: torch.stack([random_docs(1, s, 12.0, 2)[0], random_docs(1, s, 90.0, 3)[0]])),
    "unsorted_ids": (77, lambda s: torch.randint(0, 3, (2, s), generator=torch.Generator().manual_seed(4))),
}


@pytest.mark.parametrize("dtype,tolerance", [(torch.float64, 1e-12), (torch.float32, 1e-5)], ids=["fp64", "fp32"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_blockwise_equals_dense_reference(layout, dtype, tolerance):
    """Output and the gradients of q, k, v equal SDPA under the dense [b, 1, s, s] mask (GQA: 4 query heads on 2
    KV heads; blocks of 16, so most pairs are skipped or partial). fp64: exact to 1e-12; fp32: to rounding."""
    seq, make_docs = LAYOUTS[layout]
    docs = make_docs(seq)
    q, k, v, grad = qkv(2, seq, 4, 2, 16, dtype, seed=seq)
    ours = forward_backward(q, k, v, grad, DocumentMask(docs, block=16))
    reference = forward_backward(q, k, v, grad, document_causal_mask(None, docs))
    # relative to the largest reference entry, at least 1: one key per query has dq = dk = 0 exactly
    errors = [((a - r).abs().max() / r.abs().max().clamp(min=1.0)).item() for a, r in zip(ours, reference)]
    print(f"{layout} {dtype}: max error out/dq/dk/dv {[f'{e:.1e}' for e in errors]}")
    assert max(errors) < tolerance


def dense_blocks(docs: torch.Tensor, q_index: torch.Tensor, k_index: torch.Tensor, block: int):
    """From the dense mask: {(query block, key block): whether every entry is allowed} over the non-empty blocks."""
    allowed = (k_index[None, :] <= q_index[:, None]) & (docs[0][:, None] == docs[1][None, :])
    found = {}
    for i in range(0, len(q_index), block):
        for j in range(0, len(k_index), block):
            tile = allowed[i:i + block, j:j + block]
            if tile.any():
                found[(i // block, j // block)] = bool(tile.all())
    return found


def plan_blocks(plan: BlockPlan, block: int):
    return {(rows.start // block, cols.start // block): not masked for rows, pairs in plan.rows
            for cols, masked in pairs}


def test_plan_computes_exactly_the_blocks_that_attend():
    """With documents in order, the plan visits exactly the block pairs holding an allowed entry and skips the
    mask exactly where every entry is allowed; so a packed 4K sequence of ~300-token documents computes a
    small share of the pairs."""
    seq, block = 4096, 64
    docs = random_docs(1, seq, 300.0, seed=5)
    plan = BlockPlan(((0, seq),), ((0, seq),), docs, docs, block, "cpu")
    index = torch.arange(seq)
    assert plan_blocks(plan, block) == dense_blocks((docs[0], docs[0]), index, index, block)
    share = plan.pairs() / (seq // block) ** 2
    print(f"pairs computed: {plan.pairs()} of {(seq // block) ** 2} ({share:.1%})")
    assert share < 0.1


@pytest.mark.parametrize("cp", [2, 4])
def test_zigzag_plan_and_gathered_keys_equal_dense(cp):
    """What all_gather context parallelism computes: one rank's zigzag queries against every rank's keys in rank
    order, planned from global indices (here in one process) -> that rank's rows of the one-sequence answer."""
    seq, block = 128, 8
    docs = random_docs(1, seq, 20.0, seed=6)
    q, k, v, grad = qkv(1, seq, 4, 2, 8, torch.float64, seed=7)
    reference = forward_backward(q, k, v, grad, document_causal_mask(None, docs))
    c = seq // (2 * cp)
    keys = torch.cat([zigzag_indices(seq, cp, r) for r in range(cp)])
    k_segments = tuple(span for r in range(cp) for span in ((r * c, (r + 1) * c),
                                                            ((2 * cp - 1 - r) * c, (2 * cp - r) * c)))
    for rank in range(cp):
        mine = zigzag_indices(seq, cp, rank)
        plan = BlockPlan(k_segments[2 * rank:2 * rank + 2], k_segments, docs[:, mine], docs[:, keys], block, "cpu")
        assert plan_blocks(plan, block) == dense_blocks((docs[0, mine], docs[0, keys]), mine, keys, block)
        q_local = q.detach()[:, mine].requires_grad_()
        out = blockwise_attention(q_local.transpose(1, 2), k.transpose(1, 2)[:, :, keys],
                                  v.transpose(1, 2)[:, :, keys], plan).transpose(1, 2)
        dq, = torch.autograd.grad(out, q_local, grad[:, mine])
        torch.testing.assert_close(out, reference[0][:, mine], rtol=0, atol=1e-12)
        torch.testing.assert_close(dq, reference[1][:, mine], rtol=0, atol=1e-12)


def test_queries_without_keys_get_zero_output_and_minus_infinite_lse():
    """A ring partial whose keys all follow the queries: nothing is computed, out 0 and lse -inf (merge weight 0)."""
    q, k, v = (torch.randn(1, 2, 16, 8) for _ in range(3))
    plan = BlockPlan(((0, 16),), ((16, 32),), None, None, 8, "cpu")
    assert plan.rows == []
    out, lse = attention_forward(q, k, v, plan)
    assert torch.equal(out, torch.zeros_like(out)) and bool((lse == -math.inf).all())


def test_model_with_documents_equals_dense_mask_model():
    """The whole model: Transformer.attention_mask's DocumentMask and the dense mask give the same logits."""
    cfg = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, vocab_size=64, max_seq_len=96)
    model = build_model(cfg, torch.device("cpu"), seed=0)
    tokens = torch.randint(0, 64, (2, 96))
    docs = random_docs(2, 96, 25.0, seed=8)
    positions = torch.arange(96).expand(2, 96)
    assert isinstance(model.attention_mask(positions, docs), DocumentMask)
    assert model.attention_mask(positions, None) is None  # plain causal keeps SDPA's is_causal path
    with torch.no_grad():
        ours = model(tokens, positions, docs)
        model.attention_mask = document_causal_mask
        dense = model(tokens, positions, docs)
    torch.testing.assert_close(ours, dense, rtol=1e-5, atol=1e-5)


def test_bf16_inputs_close_to_fp32():
    """bf16 q, k, v (as autocast gives on a GPU): bf16 matmuls, fp32 statistics; within bf16 rounding of fp32."""
    docs = random_docs(1, 128, 30.0, seed=9)
    q, k, v, grad = qkv(1, 128, 4, 2, 32, torch.float32, seed=10)
    reference = forward_backward(q, k, v, grad, document_causal_mask(None, docs))
    low = [t.detach().bfloat16().requires_grad_() for t in (q, k, v)]
    ours = forward_backward(*low, grad.bfloat16(), DocumentMask(docs, block=32))
    assert all(t.dtype == torch.bfloat16 for t in ours)
    for a, r in zip(ours, reference):
        assert ((a.float() - r).abs().max() / r.abs().max()).item() < 3e-2


class LargestTensor(TorchDispatchMode):
    """Records the most elements of any tensor an operator returns while active (views included)."""

    def __init__(self):
        super().__init__()
        self.largest, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.numel() > self.largest:
                self.largest, self.op = t.numel(), str(func)
        return out


def largest_tensor_of_one_call(seq: int, mask_of) -> LargestTensor:
    """Forward and backward of one attention call with documents (1 x seq, 4 heads on 2 KV heads, d 16)."""
    docs = random_docs(1, seq, 1024.0, seed=seq)
    q, k, v, grad = qkv(1, seq, 4, 2, 16, torch.float32, seed=1)
    with LargestTensor() as watch:
        out = causal_attention(q, k, v, mask_of(torch.arange(seq).expand(1, seq), docs))
        torch.autograd.grad(out, (q, k, v), grad)
    return watch


def test_memory_detector_catches_the_dense_mask():
    """The check below can fail: the dense reference allocates a tensor of s x s elements."""
    seq = 2048
    watch = largest_tensor_of_one_call(seq, document_causal_mask)
    assert watch.largest >= seq * seq


def test_no_s_by_s_tensor_at_4k():
    seq = 4096
    watch = largest_tensor_of_one_call(seq, document_mask)
    print(f"s={seq}: largest tensor {watch.largest} elements ({watch.op}); s*s/8 = {seq * seq // 8}")
    assert watch.largest < seq * seq // 8, watch.op


@pytest.mark.slow
def test_no_s_by_s_tensor_at_16k():
    seq = 16384
    watch = largest_tensor_of_one_call(seq, document_mask)
    print(f"s={seq}: largest tensor {watch.largest} elements ({watch.op}); s*s/8 = {seq * seq // 8}")
    assert watch.largest < seq * seq // 8, watch.op


def test_plan_under_fake_tensors_keeps_one_masked_pair():
    """The dry run (FakeTensorMode) has no values: the plan keeps one masked pair (the same peak memory as all of
    them: each pair's temporaries are freed before the next), and forward and backward give the right shapes."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        docs = torch.zeros(1, 64, dtype=torch.long)
        plan = BlockPlan(((0, 64),), ((0, 64),), docs, docs, 16, "cpu")
        q = torch.randn(1, 4, 64, 8, requires_grad=True)
        k, v = torch.randn(1, 2, 64, 8, requires_grad=True), torch.randn(1, 2, 64, 8, requires_grad=True)
        out = blockwise_attention(q, k, v, plan)
        out.sum().backward()
        assert out.shape == q.shape and k.grad.shape == k.shape
    assert plan.pairs() == 1 and plan.rows[0][1][0][1]  # one pair, masked
    real = BlockPlan(((0, 64),), ((0, 64),), None, None, 16, "cpu")
    assert real.pairs() == 10  # causal: 4 + 3 + 2 + 1 of the 16 pairs


def test_sdpa_causal_path_is_kept():
    """No document mask: the core is exactly SDPA's is_causal call."""
    q, k, v, _ = qkv(1, 32, 4, 2, 8, torch.float32, seed=11)
    expected = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              is_causal=True, enable_gqa=True).transpose(1, 2)
    assert torch.equal(causal_attention(q, k, v, None), expected)


def test_gpu_short_sequences_keep_sdpa_with_the_dense_mask():
    """Up to GPU_DENSE_MASK_MAX_KEYS keys a CUDA run takes SDPA's fused kernel with the dense mask (the blockwise
    kernel's GPU speed is not measured); longer ones, and every CPU run, take the blockwise kernel."""
    from engine.model.attention import GPU_DENSE_MASK_MAX_KEYS, dense_mask_on
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert dense_mask_on(cuda, 8192) and dense_mask_on(cuda, GPU_DENSE_MASK_MAX_KEYS)
    assert not dense_mask_on(cuda, GPU_DENSE_MASK_MAX_KEYS + 1) and not dense_mask_on(cpu, 8192)
