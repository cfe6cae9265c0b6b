"""The herd::cross_entropy_fwd / _bwd glue on CPU (their reference kernels): values and gradients against the
pure-torch references, opcheck, the shard combine, and the all-reduce path on two gloo ranks.
The CUDA kernels themselves: tests/gpu/test_kernel_cross_entropy.py."""

import pytest
import torch
import torch.nn.functional as F

import engine.ops as ops
from engine.ops import cross_entropy as ce
from engine.ops import reference
from parallel.multiprocess import run_on_ranks


def _inputs(rows, vocab, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(rows, vocab, generator=gen)).to(dtype)  # [N, V]
    targets = torch.randint(0, vocab, (rows,), generator=gen)  # [N]
    return logits, targets


def _combine(stats):
    """Per-token loss from each shard's (max, sum_exp, target logit), as the autograd Function combines them."""
    maxes = torch.stack([s[0] for s in stats])  # [shards, N]
    global_max = maxes.max(dim=0).values
    sum_exp = sum(s[1] * (s[0] - global_max).exp() for s in stats)
    lse = sum_exp.log() + global_max
    return lse, lse - sum(s[2] for s in stats)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_public_function_on_cpu_is_the_reference_exactly(dtype):
    logits, targets = _inputs(2 * 7, 53, dtype)
    logits, targets = logits.view(2, 7, 53), targets.view(2, 7)
    mask = torch.rand(2, 7, generator=torch.Generator().manual_seed(1)) > 0.3
    ours, theirs = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    loss = ops.cross_entropy_sum(ours, targets, mask)
    expected = reference.cross_entropy_sum(theirs, targets, mask)
    (loss * 1.7).backward()
    (expected * 1.7).backward()
    assert torch.equal(loss, expected) and loss.dtype == torch.float32
    assert torch.equal(ours.grad, theirs.grad)


def test_forward_op_gives_the_statistics_of_its_shard():
    logits, targets = _inputs(9, 41, torch.float64)
    row_max, sum_exp, target_logit = torch.ops.herd.cross_entropy_fwd(logits, targets, 0, 41)
    assert torch.equal(row_max, logits.max(dim=-1).values)
    torch.testing.assert_close(sum_exp, (logits - row_max[:, None]).exp().sum(-1), rtol=1e-14, atol=0)
    assert torch.equal(target_logit, logits.gather(1, targets[:, None]).squeeze(1))
    per_token = sum_exp.log() + row_max - target_logit
    torch.testing.assert_close(per_token, F.cross_entropy(logits, targets, reduction="none"), rtol=1e-13, atol=0)


def test_forward_op_on_a_shard_of_padding_only():
    logits, targets = _inputs(4, 8)
    row_max, sum_exp, target_logit = torch.ops.herd.cross_entropy_fwd(logits, targets, 40, 37)
    assert torch.equal(row_max, torch.full((4,), float("-inf")))
    assert torch.equal(sum_exp, torch.zeros(4)) and torch.equal(target_logit, torch.zeros(4))


@pytest.mark.parametrize("shards,vocab", [(2, 38), (4, 37), (3, 1000)])
def test_shards_combine_to_the_whole_vocabulary(shards, vocab):
    logits, targets = _inputs(11, vocab, torch.float64)
    width = -(-vocab // shards)
    padded = F.pad(logits, (0, width * shards - vocab), value=123.0)  # padding values must not matter
    parts = padded.split(width, dim=1)
    stats = [torch.ops.herd.cross_entropy_fwd(p, targets, r * width, vocab) for r, p in enumerate(parts)]
    lse, per_token = _combine(stats)
    full = logits.clone().requires_grad_()
    expected = F.cross_entropy(full, targets, reduction="none")
    torch.testing.assert_close(per_token, expected.detach(), rtol=1e-13, atol=0)
    grad = torch.rand(11, dtype=torch.float64)
    expected.backward(grad)
    dlogits = torch.cat([torch.ops.herd.cross_entropy_bwd(grad, p, targets, lse, r * width, vocab)
                         for r, p in enumerate(parts)], dim=1)
    assert torch.equal(dlogits[:, vocab:], torch.zeros_like(dlogits[:, vocab:]))
    torch.testing.assert_close(dlogits[:, :vocab], full.grad, rtol=0, atol=1e-14)


def test_backward_op_keeps_the_logits_dtype():
    logits, targets = _inputs(5, 16, torch.bfloat16)
    lse = torch.logsumexp(logits.float(), dim=-1)
    dlogits = torch.ops.herd.cross_entropy_bwd(torch.ones(5), logits, targets, lse, 0, 16)
    expected = torch.softmax(logits.float(), -1) - F.one_hot(targets, 16).float()
    assert dlogits.dtype == torch.bfloat16 and torch.equal(dlogits, expected.to(torch.bfloat16))


def test_gradcheck_float64_with_padding_columns():
    logits, targets = _inputs(6, 13, torch.float64)
    logits.requires_grad_()
    targets = targets % 11  # columns 11 and 12 are padding (vocab_size 11)

    def per_token(x):
        return ce._CrossEntropy.apply(x, targets, 0, 11, None)

    assert torch.autograd.gradcheck(per_token, (logits,))
    per_token(logits).sum().backward()
    assert torch.equal(logits.grad[:, 11:], torch.zeros(6, 2, dtype=torch.float64))


def test_fused_sum_on_cpu_matches_the_reference_autograd():
    logits, targets = _inputs(3 * 5, 29)
    logits, targets = logits.view(3, 5, 29), targets.view(3, 5)
    mask = torch.arange(15).view(3, 5) % 4 != 0
    ours, theirs = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    loss = ce.fused_cross_entropy_sum(ours, targets, mask)
    expected = reference.cross_entropy_sum(theirs, targets, mask)
    loss.backward()
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-5, atol=1e-6)
    assert torch.equal(ours.grad[~mask], torch.zeros_like(ours.grad[~mask]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(dtype):
    logits, targets = _inputs(7, 24, dtype)
    torch.library.opcheck(torch.ops.herd.cross_entropy_fwd, (logits, targets, 8, 30))
    lse = torch.logsumexp(logits.float(), dim=-1)
    torch.library.opcheck(torch.ops.herd.cross_entropy_bwd, (torch.rand(7), logits, targets, lse, 8, 30))


def test_arguments_are_checked():
    logits, targets = _inputs(2, 10)
    with pytest.raises(ValueError, match="without a group"):
        ops.cross_entropy_sum(logits[None], targets[None], torch.ones(1, 2, dtype=torch.bool), vocab_size=9)


def two_rank_losses(rank: int, world_size: int) -> dict:
    """On each gloo rank: the vocabulary-parallel reference, the public function (CPU: that reference) and the
    fused path (its all-reduces with the ops' CPU kernels), from this rank's shard of the same logits."""
    import torch.distributed as dist
    vocab, width = 37, 19  # padded to 38: rank 1 holds one padding column
    logits, targets = _inputs(2 * 6, vocab)
    logits, targets = logits.view(2, 6, vocab), targets.view(2, 6)
    mask = torch.arange(12).view(2, 6) % 5 != 0
    shard = F.pad(logits, (0, 2 * width - vocab))[..., rank * width:(rank + 1) * width]
    out = {}
    for name, fn in (("reference", reference.vocab_parallel_cross_entropy_sum), ("public", ops.cross_entropy_sum),
                     ("fused", ce.fused_cross_entropy_sum)):
        x = shard.clone().requires_grad_()
        loss = fn(x, targets, mask, vocab_size=vocab, group=dist.group.WORLD)
        loss.backward()
        out[name] = (loss.detach(), x.grad)
    return out


def test_vocab_parallel_on_two_ranks():
    results = run_on_ranks(two_rank_losses, 2, timeout=180)
    logits, targets = _inputs(2 * 6, 37)
    full = logits.view(2, 6, 37).requires_grad_()
    mask = torch.arange(12).view(2, 6) % 5 != 0
    expected = reference.cross_entropy_sum(full, targets.view(2, 6), mask)
    expected.backward()
    grads = {name: torch.cat([r[name][1] for r in results], dim=-1) for name in results[0]}
    for name in grads:
        assert torch.equal(grads[name][..., 37:], torch.zeros(2, 6, 1)), name
        torch.testing.assert_close(grads[name][..., :37], full.grad, rtol=1e-5, atol=1e-6)
        for r in results:
            torch.testing.assert_close(r[name][0], expected, rtol=1e-6, atol=0)
    for r in results:  # on CPU the public function is the reference, bit for bit
        assert torch.equal(r["public"][0], r["reference"][0]) and torch.equal(r["public"][1], r["reference"][1])
