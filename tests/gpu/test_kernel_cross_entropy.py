"""csrc/cross_entropy against engine/ops/reference.py cross_entropy_sum (and F.cross_entropy for vocabulary
shards) on a CUDA GPU.

Tolerances. The kernels read the same bf16/fp32 values as the reference and compute in fp32; they differ from it in
the order of summation and in exp (ex2.approx, relative error ~2^-22), so the summed loss is held to relative 1e-5
for fp32 logits and 1e-3 for bf16 (the stated budget; the measured gap is far smaller). Gradients are probabilities
minus a one-hot: fp32 within atol 1e-6 + rtol 1e-5 (an lse off by 1e-6 moves every probability by that relative
amount); bf16 within one bf16 rounding of the fp32 value (rtol 2^-7) plus 1e-6. Outputs land in memory poisoned
with 0xFF bytes (NaN in fp32 and bf16), so an element the kernel fails to write shows up.
The vocabulary-parallel combine is checked on one GPU: logits are cut into 2 or 4 padded column shards, the forward
op runs on each and the shards are combined with plain torch ops, as the autograd Function does over all-reduces.
"""

import pytest
import torch
import torch.nn.functional as F

import engine.ops
from engine.ops import cross_entropy as ce
from engine.ops import reference

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

DTYPES = [torch.float32, torch.bfloat16]
LOSS_RTOL = {torch.float32: 1e-5, torch.bfloat16: 1e-3}
GRAD_TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.bfloat16: dict(rtol=2 ** -7, atol=1e-6)}
# (N, V): Llama-3 vocabulary, an odd vocabulary (every row at another alignment), a small one, odd N
SHAPES = [(257, 128256), (1031, 32003), (4097, 1000), (3, 128256), (1, 1000)]


@pytest.fixture(autouse=True, scope="module")
def kernels_are_loaded():
    status = engine.ops.kernel_status()
    for op in ("cross_entropy_fwd", "cross_entropy_bwd"):
        assert status[op] == "cuda kernel", status[op]  # no silent fallback to the reference


def poison(nbytes: int) -> None:
    """Fill the caching allocator's free blocks with 0xFF bytes: one large block (split for large outputs) and
    full small-pool segments (for the [N] outputs under 1 MiB)."""
    torch.cuda.empty_cache()
    big = torch.full((max(nbytes, 1 << 22),), 0xFF, dtype=torch.uint8, device="cuda")
    small = [torch.full(((1 << 20) - 512,), 0xFF, dtype=torch.uint8, device="cuda") for _ in range(8)]
    del big, small


def sample(rows, vocab, dtype, seed, offset=0):
    """Logits like an LM head's (scale 3), targets, and a loss mask with ~30% masked tokens. offset > 0 returns a
    contiguous view starting `offset` elements into its storage (rows not 16-byte aligned)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    storage = 3 * torch.randn(rows * vocab + offset, device="cuda", generator=g)
    logits = storage.to(dtype)[offset:].view(rows, vocab)  # [N, V]
    targets = torch.randint(0, vocab, (rows,), device="cuda", generator=g)
    mask = torch.rand(rows, device="cuda", generator=g) > 0.3
    return logits, targets, mask


def reference_loss_and_grad(logits, targets, mask):
    x = logits.detach().clone().requires_grad_()
    loss = reference.cross_entropy_sum(x[None], targets[None], mask[None])
    loss.backward()
    return loss.detach(), x.grad


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("rows,vocab", SHAPES, ids=[f"{n}x{v}" for n, v in SHAPES])
def test_single_device_loss_and_grad(rows, vocab, dtype):
    logits, targets, mask = sample(rows, vocab, dtype, seed=rows + vocab)
    expected, expected_grad = reference_loss_and_grad(logits, targets, mask)
    x = logits.detach().clone().requires_grad_()
    poison(2 * logits.numel() * logits.element_size())
    loss = engine.ops.cross_entropy_sum(x[None], targets[None], mask[None])
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    torch.testing.assert_close(loss, expected, rtol=LOSS_RTOL[dtype], atol=0)
    assert x.grad.dtype == dtype and torch.isfinite(x.grad).all()
    torch.testing.assert_close(x.grad, expected_grad, **GRAD_TOL[dtype])
    assert torch.equal(x.grad[~mask], torch.zeros_like(x.grad[~mask]))  # masked tokens: exactly 0


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("offset", [1, 3, 5])
def test_misaligned_rows_take_the_scalar_paths(dtype, offset):
    logits, targets, mask = sample(67, 4099, dtype, seed=offset, offset=offset)
    assert logits.data_ptr() % 16 != 0
    expected, expected_grad = reference_loss_and_grad(logits, targets, mask)
    x = logits.detach().requires_grad_()  # keeps the misaligned storage (the op calls .contiguous(), a no-op)
    poison(4 * logits.numel() * logits.element_size())
    loss = engine.ops.cross_entropy_sum(x[None], targets[None], mask[None])
    loss.backward()
    torch.testing.assert_close(loss, expected, rtol=LOSS_RTOL[dtype], atol=0)
    torch.testing.assert_close(x.grad, expected_grad, **GRAD_TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_forward_statistics(dtype):
    logits, targets, _ = sample(513, 32003, dtype, seed=7)
    poison(1 << 24)
    row_max, sum_exp, target_logit = torch.ops.herd.cross_entropy_fwd(logits, targets, 0, 32003)
    x = logits.float()
    assert torch.equal(row_max, x.max(dim=-1).values)  # a max is exact
    assert torch.equal(target_logit, x.gather(1, targets[:, None]).squeeze(1))
    torch.testing.assert_close(sum_exp, (x - row_max[:, None]).exp().sum(-1), rtol=1e-5, atol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("shards", [2, 4])
@pytest.mark.parametrize("vocab", [128256, 32003, 1000])
def test_vocabulary_shards_combine(vocab, shards, dtype):
    rows = 129
    logits, targets, _ = sample(rows, vocab, dtype, seed=vocab + shards)
    targets[:4] = torch.tensor([0, vocab - 1, vocab // shards, vocab // 2], device="cuda")  # shard edges
    width = -(-vocab // shards)
    padded = F.pad(logits, (0, width * shards - vocab), value=1e4)  # padding columns must be ignored
    parts = [p.contiguous() for p in padded.split(width, dim=1)]  # [N, width] each
    poison(1 << 26)
    stats = [torch.ops.herd.cross_entropy_fwd(p, targets, r * width, vocab) for r, p in enumerate(parts)]
    maxes = torch.stack([s[0] for s in stats])  # [shards, N]
    global_max = maxes.max(dim=0).values
    sum_exp = sum(s[1] * (s[0] - global_max).exp() for s in stats)  # the all-reduces of _CrossEntropy
    lse = sum_exp.log() + global_max
    per_token = lse - sum(s[2] for s in stats)
    x = logits.float().clone().requires_grad_()
    expected = F.cross_entropy(x, targets, reduction="none")  # [N]
    torch.testing.assert_close(per_token, expected.detach(), rtol=LOSS_RTOL[dtype], atol=0)
    grad = torch.rand(rows, device="cuda") * (torch.arange(rows, device="cuda") % 5 != 0)  # some rows 0
    expected.backward(grad)
    poison(1 << 26)
    dlogits = torch.cat([torch.ops.herd.cross_entropy_bwd(grad, p, targets, lse, r * width, vocab)
                         for r, p in enumerate(parts)], dim=1)
    assert torch.equal(dlogits[:, vocab:], torch.zeros_like(dlogits[:, vocab:]))
    torch.testing.assert_close(dlogits[:, :vocab], x.grad.to(dtype), **GRAD_TOL[dtype])


def test_shard_of_padding_only_and_no_rows():
    logits, targets, _ = sample(5, 64, torch.bfloat16, seed=3)
    row_max, sum_exp, target_logit = torch.ops.herd.cross_entropy_fwd(logits, targets, 64, 60)
    assert torch.equal(row_max, torch.full((5,), float("-inf"), device="cuda"))
    assert not sum_exp.any() and not target_logit.any()
    dlogits = torch.ops.herd.cross_entropy_bwd(torch.ones(5, device="cuda"), logits, targets, sum_exp, 64, 60)
    assert not dlogits.any()
    empty = torch.empty(0, 1000, device="cuda", requires_grad=True)
    loss = engine.ops.cross_entropy_sum(empty[None], torch.empty(1, 0, dtype=torch.long, device="cuda"),
                                        torch.empty(1, 0, dtype=torch.bool, device="cuda"))
    loss.backward()
    assert loss.item() == 0.0


def test_saves_no_fp32_softmax():
    """What autograd keeps between forward and backward: the bf16 logits (already alive), targets and lse [N]."""
    logits, targets, mask = sample(1024, 128256, torch.bfloat16, seed=11)
    x = logits.detach().requires_grad_()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    loss = ce.fused_cross_entropy_sum(x[None], targets[None], mask[None])
    held = torch.cuda.memory_allocated() - before
    assert held < 1 << 20, f"forward keeps {held} bytes"  # an fp32 softmax would be 525 MB
    loss.backward()
