"""Tensor/sequence-parallel collectives as autograd functions, named after Megatron-LM's operators.

Shoeybi et al. 2019 (Megatron-LM, section 3) call the identity-forward / all-reduce-backward operator `f` and its
conjugate `g`; Korthikanti et al. 2022 (sequence parallelism) replace them by all-gather / reduce-scatter along
the sequence. Each function takes the group explicitly. Sequence dim is 1 ([b, s, ...] tensors).
"""

import torch
import torch.distributed as dist
from torch.autograd import Function



def _all_gather_flat(out: torch.Tensor, x: torch.Tensor, group: dist.ProcessGroup) -> None:
    # torch 2.13 renamed the flat-tensor collectives (the old names warn on every call); 2.11 has only the old
    # ones. Looked up at call time so a benchmark can count them.
    (getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor)(out, x, group=group)


def _reduce_scatter_flat(out: torch.Tensor, x: torch.Tensor, group: dist.ProcessGroup) -> None:
    (getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor)(out, x, group=group)


def _all_reduce(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    x = x.contiguous()
    dist.all_reduce(x, group=group)
    return x


def _gather_seq(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """[b, s/n, ...] on each rank -> [b, s, ...], rank order along s."""
    n = dist.get_world_size(group)
    seq_first = x.transpose(0, 1).contiguous()  # [s/n, b, ...]
    out = seq_first.new_empty((seq_first.shape[0] * n, *seq_first.shape[1:]))
    _all_gather_flat(out, seq_first, group=group)
    return out.transpose(0, 1).contiguous()


def _reduce_scatter_seq(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """[b, s, ...] partial sums on each rank -> [b, s/n, ...] of the total, rank r holding chunk r."""
    n = dist.get_world_size(group)
    seq_first = x.transpose(0, 1).contiguous()  # [s, b, ...]
    out = seq_first.new_empty((seq_first.shape[0] // n, *seq_first.shape[1:]))
    _reduce_scatter_flat(out, seq_first, group=group)
    return out.transpose(0, 1).contiguous()


def _identity(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    return x


class _Conjugate(Function):
    """One collective forward and its conjugate on the gradient backward; the operators below are pairs of it."""

    @staticmethod
    def forward(ctx, x, group, forward_op, backward_op):
        ctx.group, ctx.backward_op = group, backward_op
        return forward_op(x, group)

    @staticmethod
    def backward(ctx, grad):
        return ctx.backward_op(grad, ctx.group), None, None, None


def copy_to_tp(x, group):
    """f: identity forward, all-reduce of the gradient backward (input of a column-parallel region)."""
    return _Conjugate.apply(x, group, _identity, _all_reduce)


def reduce_from_tp(x, group):
    """g: all-reduce forward, identity backward (output of a row-parallel region)."""
    return _Conjugate.apply(x, group, _all_reduce, _identity)


def gather_from_sp(x, group):
    """Sequence-parallel f: all-gather along the sequence forward, reduce-scatter of the gradient backward."""
    return _Conjugate.apply(x, group, _gather_seq, _reduce_scatter_seq)


def reduce_scatter_to_sp(x, group):
    """Sequence-parallel g: reduce-scatter along the sequence forward, all-gather of the gradient backward."""
    return _Conjugate.apply(x, group, _reduce_scatter_seq, _gather_seq)
