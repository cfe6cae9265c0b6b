"""Summed next-token cross-entropy, on one device or from vocabulary shards under tensor parallelism, fused.

The fused path (csrc/cross_entropy) never materializes an [N, vocab] fp32 tensor. The forward op reads each row of
this rank's logits once and returns per-row statistics of its shard: local max m_r, local sum of exp(logit - m_r)
and the target's logit (0 outside the shard). Python combines the shards (Shoeybi et al. 2019, sec. 3; one
all-reduce MAX, one all-reduce SUM of [2, N]):
    M = max_r m_r,  S = sum_r s_r * exp(m_r - M),  lse = log S + M,  loss_token = lse - target logit.
The backward op recomputes softmax from the saved logits and lse: dlogits = (exp(logit - lse) - onehot) * grad.
Saved for backward: the logits (already alive), targets and lse [N], instead of an [N, vocab] fp32 softmax.

On CPU (or without the built kernel) cross_entropy_sum returns exactly the references in engine/ops/reference.py.
"""

from typing import Optional

import torch
import torch.distributed as dist

from engine.ops import library, reference


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for bf16/fp32 logits (what the kernel computes in); fp64 stays fp64 (gradcheck)."""
    return torch.promote_types(dtype, torch.float32)


def _valid_columns(columns: int, vocab_start: int, vocab_size: int) -> int:
    """Columns of this shard below vocab_size; the rest are vocabulary padding, always at the shard's end."""
    return max(0, min(vocab_size - vocab_start, columns))


def cross_entropy_fwd_reference(logits: torch.Tensor, targets: torch.Tensor, vocab_start: int, vocab_size: int):
    """logits: [N, V_local] columns [vocab_start, vocab_start + V_local) of the vocabulary; targets: [N] global ids
    -> (local max, local sum of exp(logit - local max), target logit or 0 outside the shard), each [N] fp32."""
    x = logits.to(_accumulate_dtype(logits.dtype))
    valid = _valid_columns(x.shape[-1], vocab_start, vocab_size)
    x = x[:, :valid]  # [N, valid]
    if valid == 0:  # the whole shard is padding
        return (x.new_full((x.shape[0],), float("-inf")), x.new_zeros(x.shape[0]), x.new_zeros(x.shape[0]))
    row_max = x.max(dim=-1).values  # [N]
    shift = row_max.masked_fill(row_max == float("-inf"), 0.0)  # rows of -inf logits: sum 0, not NaN
    sum_exp = (x - shift.unsqueeze(-1)).exp().sum(dim=-1)
    local = targets - vocab_start
    inside = (local >= 0) & (local < valid)
    target_logit = x.gather(-1, local.clamp(0, valid - 1).unsqueeze(-1)).squeeze(-1)
    return row_max, sum_exp, torch.where(inside, target_logit, torch.zeros_like(target_logit))


def cross_entropy_bwd_reference(grad: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor,
                                vocab_start: int, vocab_size: int) -> torch.Tensor:
    """d loss_token / d logits times grad: grad, lse: [N]; logits: [N, V_local] -> [N, V_local] in logits' dtype.
    (softmax - onehot(target)) * grad, 0 in padding columns (global id >= vocab_size)."""
    acc = _accumulate_dtype(logits.dtype)
    columns = vocab_start + torch.arange(logits.shape[-1], device=logits.device)  # [V_local] global ids
    probs = (logits.to(acc) - lse.to(acc).unsqueeze(-1)).exp()
    onehot = (columns == targets.unsqueeze(-1)).to(acc)
    dlogits = (probs - onehot) * grad.to(acc).unsqueeze(-1)
    return dlogits.masked_fill(columns >= vocab_size, 0.0).to(logits.dtype)


FWD = library.define("cross_entropy_fwd(Tensor logits, Tensor targets, int vocab_start, int vocab_size) "
                     "-> (Tensor, Tensor, Tensor)", cross_entropy_fwd_reference)
BWD = library.define("cross_entropy_bwd(Tensor grad, Tensor logits, Tensor targets, Tensor lse, int vocab_start, "
                     "int vocab_size) -> Tensor", cross_entropy_bwd_reference)


@torch.library.register_fake(f"herd::{FWD}")
def _fwd_fake(logits, targets, vocab_start, vocab_size):
    acc = _accumulate_dtype(logits.dtype)
    return tuple(logits.new_empty(logits.shape[0], dtype=acc) for _ in range(3))


@torch.library.register_fake(f"herd::{BWD}")
def _bwd_fake(grad, logits, targets, lse, vocab_start, vocab_size):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


class _CrossEntropy(torch.autograd.Function):
    """Per-token loss [N] from this rank's logits [N, V_local]; group None: the whole vocabulary is here."""

    @staticmethod
    def forward(ctx, logits, targets, vocab_start, vocab_size, group):
        row_max, sum_exp, target_logit = torch.ops.herd.cross_entropy_fwd(logits, targets, vocab_start, vocab_size)
        if group is not None:
            global_max = row_max.clone()
            dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=group)
            # a shard of padding only has max -inf and sum 0: exp(-inf) * 0 = 0
            sums = torch.stack([sum_exp * (row_max - global_max).exp(), target_logit])  # [2, N]
            dist.all_reduce(sums, group=group)
            row_max, sum_exp, target_logit = global_max, sums[0], sums[1]
        lse = sum_exp.log() + row_max  # [N]
        ctx.save_for_backward(logits, targets, lse)
        ctx.vocab = (vocab_start, vocab_size)
        return lse - target_logit

    @staticmethod
    def backward(ctx, grad_loss):
        logits, targets, lse = ctx.saved_tensors
        dlogits = torch.ops.herd.cross_entropy_bwd(grad_loss.to(lse.dtype), logits, targets, lse, *ctx.vocab)
        return dlogits, None, None, None, None


def fused_cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor, loss_mask: torch.Tensor,
                            vocab_size: Optional[int] = None, group: Optional[dist.ProcessGroup] = None):
    """cross_entropy_sum through the herd:: ops (their CUDA kernels on CUDA tensors, the references on CPU)."""
    columns = logits.shape[-1]
    vocab_start = 0 if group is None else dist.get_rank(group) * columns
    per_token = _CrossEntropy.apply(logits.reshape(-1, columns).contiguous(), targets.reshape(-1).long(),
                                    vocab_start, columns if vocab_size is None else vocab_size, group)  # [N]
    return (per_token * loss_mask.flatten().float()).sum()


def cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor, loss_mask: torch.Tensor,
                      vocab_size: Optional[int] = None, group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """Summed fp32 cross-entropy over the tokens where loss_mask is true.

    group None: logits [b, s, vocab] hold the whole vocabulary. Otherwise logits [b, s, V_local] are columns
    [rank * V_local, (rank + 1) * V_local) of the vocabulary padded to a multiple of the group size, and ids
    >= vocab_size are padding. targets, loss_mask: [b, s] -> scalar fp32.
    """
    if group is None and vocab_size not in (None, logits.shape[-1]):
        raise ValueError(f"cross_entropy_sum: vocab_size {vocab_size} without a group must equal the logits' "
                         f"{logits.shape[-1]} columns")
    if group is not None and vocab_size is None:
        raise ValueError("cross_entropy_sum: vocabulary shards (group given) need vocab_size")
    if library.fused(FWD, logits) and library.fused(BWD, logits):
        return fused_cross_entropy_sum(logits, targets, loss_mask, vocab_size, group)
    if group is None:
        return reference.cross_entropy_sum(logits, targets, loss_mask)
    return reference.vocab_parallel_cross_entropy_sum(logits, targets, loss_mask, vocab_size, group)
