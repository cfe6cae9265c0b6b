"""Document-masked attention on CUDA: the blockwise kernel (engine/model/attention.py, the path of sequences past
GPU_DENSE_MASK_MAX_KEYS and of context parallelism) against SDPA with the dense mask (the short-sequence GPU path
and the oracle), in bf16 under autocast and fp32, forward and gradients; and the time of each at 8K, so the next
GPU session sees what the blockwise kernel costs. Skipped without CUDA."""

import time

import pytest
import torch
import torch.nn.functional as F

from engine.model.attention import DocumentMask, blockwise_attention, document_causal_mask

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _docs(b: int, s: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    cuts = torch.sort(torch.randint(1, s, (b, 6), generator=g), dim=1).values
    ids = torch.zeros(b, s, dtype=torch.long)
    for row in range(b):
        for c in cuts[row]:
            ids[row, c:] += 1
    return ids.cuda()


def _inputs(b, s, h, kv, d, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(b, heads, s, d, device="cuda", dtype=dtype, generator=g).requires_grad_()
            for heads in (h, kv, kv)]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 2e-2)])
def test_blockwise_matches_dense_sdpa_on_cuda(dtype, tol):
    b, s, h, kv, d = 2, 4096, 8, 2, 128
    doc_ids = _docs(b, s, 0)
    q, k, v = _inputs(b, s, h, kv, d, dtype)
    out = blockwise_attention(q, k, v, DocumentMask(doc_ids).plan(q.device))
    grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    ref = F.scaled_dot_product_attention(q2, k2, v2, attn_mask=document_causal_mask(None, doc_ids), enable_gqa=True)
    ref_grads = torch.autograd.grad(ref.float().square().sum(), (q2, k2, v2))
    for a, r in zip((out, *grads), (ref, *ref_grads)):
        err = ((a.float() - r.float()).norm() / r.float().norm()).item()
        assert err < tol, err


def test_time_of_both_paths_at_8k():
    """Printed, not asserted: the blockwise kernel against SDPA's memory-efficient kernel with the dense mask."""
    b, s, h, kv, d = 1, 8192, 32, 8, 128
    doc_ids = _docs(b, s, 1)
    q, k, v = _inputs(b, s, h, kv, d, torch.bfloat16)
    mask = DocumentMask(doc_ids)

    def blockwise():
        blockwise_attention(q, k, v, mask.plan(q.device)).sum().backward()

    def dense():
        F.scaled_dot_product_attention(q, k, v, attn_mask=mask.dense_cached(), enable_gqa=True).sum().backward()

    for name, fn in (("blockwise", blockwise), ("sdpa dense mask", dense)):
        fn()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
        print(f"attention fwd+bwd, 8K, 32 heads / 8 KV heads, 6 documents: {name} "
              f"{(time.perf_counter() - start) / 5 * 1e3:.2f} ms")
