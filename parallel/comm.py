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


def _split_seq(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    n, r = dist.get_world_size(group), dist.get_rank(group)
    return x.chunk(n, dim=1)[r].contiguous()


class CopyToTP(Function):
    """f: identity forward, all-reduce of the gradient backward (input of a column-parallel region)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group), None


class ReduceFromTP(Function):
    """g: all-reduce forward, identity backward (output of a row-parallel region)."""

    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class GatherFromSP(Function):
    """Sequence-parallel f: all-gather along the sequence forward, reduce-scatter of the gradient backward."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _gather_seq(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter_seq(grad, ctx.group), None


class ReduceScatterToSP(Function):
    """Sequence-parallel g: reduce-scatter along the sequence forward, all-gather of the gradient backward."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _reduce_scatter_seq(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather_seq(grad, ctx.group), None


class SplitToSP(Function):
    """Keep this rank's sequence chunk forward; all-gather of the gradient backward."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split_seq(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather_seq(grad, ctx.group), None


def copy_to_tp(x, group):
    return CopyToTP.apply(x, group)


def reduce_from_tp(x, group):
    return ReduceFromTP.apply(x, group)


def gather_from_sp(x, group):
    return GatherFromSP.apply(x, group)


def reduce_scatter_to_sp(x, group):
    return ReduceScatterToSP.apply(x, group)


def split_to_sp(x, group):
    return SplitToSP.apply(x, group)
