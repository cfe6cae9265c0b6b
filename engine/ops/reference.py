"""Pure-torch references of the fused ops: the fallback on CPU and the oracle for csrc/ kernels."""

import torch
import torch.distributed as dist
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm (Zhang & Sennrich 2019) as Llama computes it: normalize in fp32, cast back, then scale.

    x: [..., dim], weight: [dim] -> [..., dim] in x's dtype (times weight's dtype promotion).
    """
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.type_as(x)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding (Su et al. 2021, eq. 34) in the half-split layout HF checkpoints use.

    Pair i of a head is (x[i], x[i + d/2]) rotated by angle pos * freq_i, computed in fp32.
    x: [b, s, heads, d]; cos, sin: [b, s, 1, d/2] -> [b, s, heads, d] in x's dtype.
    """
    half = x.shape[-1] // 2
    x1, x2 = x.float()[..., :half], x.float()[..., half:]
    rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return rotated.type_as(x)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU (Shazeer 2020): silu(x W1) * (x W3). gate, up: [..., ffn] -> [..., ffn]."""
    return F.silu(gate) * up


def cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over the tokens where loss_mask is true, computed in fp32.

    Summing (not averaging) lets the caller divide by the token count of the whole optimizer step, so gradient
    accumulation over micro-batches equals one large batch.
    logits: [b, s, vocab]; targets, loss_mask: [b, s] -> scalar fp32.
    """
    per_token = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")  # [b*s]
    return (per_token * loss_mask.flatten().float()).sum()


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Per-token cross-entropy from vocabulary-sharded logits: max, sum of exponentials and the target logit are
    reduced over tp (three all-reduces of [N] floats), never the [N, vocab] logits."""

    @staticmethod
    def forward(ctx, logits, targets, vocab_start, vocab_size, group):
        # logits: [N, V/tp] fp32 (padded columns masked out); targets: [N]
        columns = vocab_start + torch.arange(logits.shape[-1], device=logits.device)
        logits = logits.masked_fill(columns >= vocab_size, float("-inf"))
        row_max = logits.max(dim=-1).values
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - row_max.unsqueeze(-1)
        exp = shifted.exp()
        sum_exp = exp.sum(dim=-1)
        dist.all_reduce(sum_exp, group=group)
        local_target = targets - vocab_start
        in_range = (local_target >= 0) & (local_target < logits.shape[-1])
        local_target = local_target.clamp(0, logits.shape[-1] - 1)
        target_logit = shifted.gather(-1, local_target.unsqueeze(-1)).squeeze(-1) * in_range
        dist.all_reduce(target_logit, group=group)
        ctx.save_for_backward(exp / sum_exp.unsqueeze(-1), local_target, in_range)
        return sum_exp.log() - target_logit  # [N]

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, local_target, in_range = ctx.saved_tensors
        grad = softmax.clone()
        rows = torch.arange(grad.shape[0], device=grad.device)
        grad[rows, local_target] -= in_range.to(grad.dtype)
        return grad * grad_loss.unsqueeze(-1), None, None, None, None


def vocab_parallel_cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor, loss_mask: torch.Tensor,
                                     vocab_size: int, group: dist.ProcessGroup) -> torch.Tensor:
    """cross_entropy_sum from this rank's vocabulary shard under tensor parallelism (Shoeybi et al. 2019, sec. 3).

    logits: [b, s, V/tp] columns [rank * V/tp, (rank + 1) * V/tp) of the vocabulary padded to a multiple of tp
    (ids >= vocab_size are padding, ignored); targets, loss_mask: [b, s] -> scalar fp32.
    """
    vocab_start = dist.get_rank(group) * logits.shape[-1]
    per_token = _VocabParallelCrossEntropy.apply(logits.float().flatten(0, 1), targets.flatten(), vocab_start,
                                                 vocab_size, group)
    return (per_token * loss_mask.flatten().float()).sum()


FP8_MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}  # largest finite value of each format


def fp8_amax(x: torch.Tensor) -> torch.Tensor:
    """max |x| over the whole tensor, as an fp32 scalar tensor (the input of an FP8 scale)."""
    return x.abs().max().float()


def fp8_cast(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, transpose: bool):
    """Quantize x [M, K] to `dtype` as saturate(x * scale), plus (when `transpose`) the [K, M] row-major copy
    the weight-gradient GEMM needs, and the amax of x (for delayed scaling's history).

    x: [M, K] bf16/fp32; scale: fp32 scalar tensor -> (out [M, K], out_t [K, M] or empty [0], amax fp32 scalar).
    Values beyond the format's largest finite value saturate to it (an overflow clamps instead of giving inf).
    """
    limit = FP8_MAX[dtype]
    out = (x.float() * scale).clamp(-limit, limit).to(dtype)
    out_t = out.t().contiguous() if transpose else out.new_empty(0)
    return out, out_t, fp8_amax(x)


FP8_TINY_AMAX = 1e-12  # an all-zero tensor gets scale fp8_max / 1e-12 -> its (zero) values stay exact


@torch.no_grad()
def fp8_delayed_update(history: torch.Tensor, scale: torch.Tensor, overflows: torch.Tensor, amax: torch.Tensor,
                       limit: float) -> torch.Tensor:
    """One step of delayed scaling (TransformerEngine's DelayedScaling, "max" over the window), in place.

    history: [H] fp32, newest amax first; scale: fp32 0-dim, the scale the step's cast used; overflows: int64
    0-dim; amax: fp32 0-dim, this step's amax (already reduced over the ranks sharing the tensor); limit: the fp8
    format's largest finite value. Returns 1/scale of the scale used (what the GEMM dequantizes with). Then:
    overflows += 1 when amax * scale > limit (the cast saturated); amax enters the window (the oldest leaves)
    unless it is inf/NaN; scale = limit / max(window) when the window holds anything above 0, else unchanged."""
    inv_used = scale.reciprocal()
    finite = torch.isfinite(amax)
    overflows.add_((finite & (amax * scale > limit)).long())
    rolled = torch.roll(history, 1)
    rolled[0] = amax
    history.copy_(torch.where(finite, rolled, history))
    window_max = history.max()
    scale.copy_(torch.where(window_max > 0, limit / window_max.clamp(min=FP8_TINY_AMAX), scale))
    return inv_used
