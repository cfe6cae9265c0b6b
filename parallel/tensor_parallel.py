"""Megatron-style tensor parallelism (+ sequence parallelism) applied to a plain Llama module from outside.

Shoeybi et al. 2019, section 3: in attention the query/key/value projections are split by heads (column
parallel: each rank computes its heads) and the output projection by its input rows (row parallel: partial sums
all-reduced); in the MLP, w1/w3 are column parallel and w2 row parallel. The embedding and the output head are
split along the vocabulary; the cross-entropy works on vocabulary shards and never gathers full logits.
With sequence parallelism (Korthikanti et al. 2022) the residual stream, norms included, is split along the
sequence between the tensor-parallel regions: all-gather before them, reduce-scatter after.

The model's modules keep their names and classes; their weights are replaced by this rank's shard, and hooks
put the collectives at the region boundaries, so parameter names (checkpoint keys) do not change.
"""

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from parallel import comm


@dataclass
class ShardInfo:
    """How a parameter's full tensor maps to this rank's: split along `dim` into tp chunks (None: replicated)."""

    dim: Optional[int]
    full_size: int = 0  # the unpadded size along `dim`
    replicas: int = 1  # consecutive tp ranks holding the same chunk (KV heads when tp > n_kv_heads)


@dataclass
class TPPlan:
    group: dist.ProcessGroup
    sequence_parallel: bool
    shards: Dict[str, ShardInfo] = field(default_factory=dict)  # parameter name -> how it is split
    # SP norm weights, by name (FSDP later swaps the Parameter objects): their grads are summed over tp
    partial_grad_names: List[str] = field(default_factory=list)


def _shard_rows(weight: torch.Tensor, group: dist.ProcessGroup, padded_rows: int = 0) -> torch.Tensor:
    """This rank's chunk of the rows (dim 0), after zero-padding to `padded_rows` when given."""
    if padded_rows > weight.shape[0]:
        weight = torch.cat([weight, weight.new_zeros(padded_rows - weight.shape[0], *weight.shape[1:])])
    return weight.chunk(dist.get_world_size(group), dim=0)[dist.get_rank(group)].clone()


def _shard_kv_rows(weight: torch.Tensor, group: dist.ProcessGroup, n_kv_heads: int) -> torch.Tensor:
    """K or V projection rows for this rank's query heads. With tp > n_kv_heads, tp / n_kv_heads consecutive
    ranks share one KV head (their query heads form its group), each holding a copy of its rows."""
    tp, rank = dist.get_world_size(group), dist.get_rank(group)
    if tp <= n_kv_heads:
        return _shard_rows(weight, group)
    return weight.chunk(n_kv_heads, dim=0)[rank // (tp // n_kv_heads)].clone()


def _shard_cols(weight: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    return weight.chunk(dist.get_world_size(group), dim=1)[dist.get_rank(group)].clone()


def _set_weight(module: nn.Module, weight: torch.Tensor) -> None:
    module.weight = nn.Parameter(weight, requires_grad=module.weight.requires_grad)


def _enter_region(plan: TPPlan) -> Callable:
    """Forward pre-hook on a module whose first projections are column parallel: f, or all-gather for SP."""
    op = comm.gather_from_sp if plan.sequence_parallel else comm.copy_to_tp

    def hook(module, args):
        return (op(args[0], plan.group), *args[1:])
    return hook


def _leave_region(plan: TPPlan) -> Callable:
    """Forward hook on a row-parallel projection: g (all-reduce), or reduce-scatter along the sequence for SP."""
    op = comm.reduce_scatter_to_sp if plan.sequence_parallel else comm.reduce_from_tp

    def hook(module, args, output):
        return op(output, plan.group)
    return hook


class VocabParallelEmbedding(nn.Module):
    """Rows [start, start + rows) of the (padded) embedding; ids outside give 0, and the sum over tp (all-reduce,
    or reduce-scatter along the sequence for SP) completes every row."""

    def __init__(self, embedding: nn.Embedding, plan: TPPlan, padded_vocab: int):
        super().__init__()
        self.plan = plan
        self.weight = nn.Parameter(_shard_rows(embedding.weight.detach(), plan.group, padded_vocab))
        self.start = dist.get_rank(plan.group) * self.weight.shape[0]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        local = tokens - self.start  # [b, s]
        outside = (local < 0) | (local >= self.weight.shape[0])
        h = F.embedding(local.masked_fill(outside, 0), self.weight)  # [b, s, dim]
        h = h.masked_fill(outside.unsqueeze(-1), 0.0)
        if self.plan.sequence_parallel:
            return comm.reduce_scatter_to_sp(h, self.plan.group)  # [b, s/tp, dim]
        return comm.reduce_from_tp(h, self.plan.group)


def padded_vocab_size(vocab_size: int, tp: int) -> int:
    return -(-vocab_size // tp) * tp


def apply_tensor_parallel(model: nn.Module, group: dist.ProcessGroup, sequence_parallel: bool) -> TPPlan:
    """Shard a materialized Llama `model` in place over `group`; returns what was split, for gathers and grads."""
    plan = TPPlan(group=group, sequence_parallel=sequence_parallel)
    vocab = model.cfg.vocab_size
    padded = padded_vocab_size(vocab, dist.get_world_size(group))
    kv_replicas = max(1, dist.get_world_size(group) // model.cfg.n_kv_heads)
    model.tok_embeddings = VocabParallelEmbedding(model.tok_embeddings, plan, padded)
    plan.shards["tok_embeddings.weight"] = ShardInfo(0, vocab)
    for name, block in model.layers.items():
        prefix = f"layers.{name}"
        for region, column, row in ((block.attention, ("wq", "wk", "wv"), "wo"),
                                    (block.feed_forward, ("w1", "w3"), "w2")):
            region_name = "attention" if region is block.attention else "feed_forward"
            for proj in column:
                linear = getattr(region, proj)
                key = f"{prefix}.{region_name}.{proj}.weight"
                if proj in ("wk", "wv"):
                    plan.shards[key] = ShardInfo(0, linear.weight.shape[0], kv_replicas)
                    _set_weight(linear, _shard_kv_rows(linear.weight.detach(), group, model.cfg.n_kv_heads))
                    continue
                plan.shards[key] = ShardInfo(0, linear.weight.shape[0])
                _set_weight(linear, _shard_rows(linear.weight.detach(), group))
            out = getattr(region, row)
            plan.shards[f"{prefix}.{region_name}.{row}.weight"] = ShardInfo(1, out.weight.shape[1])
            _set_weight(out, _shard_cols(out.weight.detach(), group))
            region.register_forward_pre_hook(_enter_region(plan))
            out.register_forward_hook(_leave_region(plan))
        if sequence_parallel:
            plan.partial_grad_names += [f"{prefix}.attention_norm.weight", f"{prefix}.ffn_norm.weight"]
    _set_weight(model.output, _shard_rows(model.output.weight.detach(), group, padded))
    plan.shards["output.weight"] = ShardInfo(0, vocab)
    model.output.register_forward_pre_hook(_enter_region(plan))
    if sequence_parallel:
        plan.partial_grad_names.append("norm.weight")
    return plan


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
    """Summed cross-entropy over masked tokens. logits: [b, s, V/tp] shard of this rank; targets, mask: [b, s]."""
    vocab_start = dist.get_rank(group) * logits.shape[-1]
    per_token = _VocabParallelCrossEntropy.apply(logits.float().flatten(0, 1), targets.flatten(), vocab_start,
                                                 vocab_size, group)
    return (per_token * loss_mask.flatten().float()).sum()
