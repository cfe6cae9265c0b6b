"""Megatron-style tensor parallelism (+ sequence parallelism) applied to a plain Llama module from outside.

Shoeybi et al. 2019, section 3: in attention the query/key/value projections are split by heads (column
parallel: each rank computes its heads) and the output projection by its input rows (row parallel: partial sums
all-reduced); in the MLP, w1/w3 are column parallel and w2 row parallel. The embedding and the output head are
split along the vocabulary; the cross-entropy works on vocabulary shards and never gathers full logits.
With sequence parallelism (Korthikanti et al. 2022) the residual stream, norms included, is split along the
sequence between the tensor-parallel regions: all-gather before them, reduce-scatter after.

The model's modules keep their names and classes; their weights are replaced by this rank's shard, and hooks
put the collectives at the region boundaries, so parameter names (checkpoint keys) do not change.
A fused projection (wqkv: rows [q; k; v], w13: rows [gate; up]; engine/model/llama.py fused_linear) is cut part
by part, so each rank's shard is [q chunk; k chunk; v chunk]: whole query heads with the KV heads they use, and
matching gate and up columns (not a chunk of the concatenation).
"""

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from parallel import comm


@dataclass
class ShardInfo:
    """How a parameter's full tensor maps to this rank's: split along `dim` into tp chunks (None: replicated)."""

    dim: Optional[int]
    full_shape: tuple = ()  # the whole parameter's shape (unpadded)
    replicas: int = 1  # consecutive tp ranks holding the same chunk (KV heads when tp > n_kv_heads)
    padded_size: int = 0  # rows after zero-padding (vocabulary rows), 0 when not padded
    # a fused projection (wqkv, w13): its parts in row order as (name, full rows, replicas); each part is cut into
    # tp chunks on its own, so a rank's shard is [part_0 chunk; part_1 chunk; ...], whole heads of each
    parts: Tuple[Tuple[str, int, int], ...] = ()

    @property
    def full_size(self) -> int:
        return self.full_shape[self.dim]

    def part_rows(self, tp: int) -> List[int]:
        """Rows of each part in one rank's shard of a fused projection."""
        return [rows // (tp // replicas) for _, rows, replicas in self.parts]


def tp_local(full: torch.Tensor, info: ShardInfo, group: dist.ProcessGroup) -> torch.Tensor:
    """This rank's part of a parameter's full tensor (works on the meta device too).

    Rows or columns are cut into tp equal chunks; vocabulary rows are zero-padded first to a multiple of tp; a KV
    projection shared by `replicas` ranks gives each of them the rows of the one KV head their queries use.
    """
    tp, rank = dist.get_world_size(group), dist.get_rank(group)
    if info.parts:  # [q; k; v] -> [q chunk; k chunk; v chunk] of this rank (not a chunk of the concatenation)
        pieces = full.split([rows for _, rows, _ in info.parts], dim=info.dim)
        return torch.cat([piece.chunk(tp // replicas, dim=info.dim)[rank // replicas]
                          for piece, (_, _, replicas) in zip(pieces, info.parts)], dim=info.dim)
    if info.padded_size > full.shape[0]:
        full = torch.cat([full, full.new_zeros(info.padded_size - full.shape[0], *full.shape[1:])])
    chunks, index = (tp // info.replicas, rank // info.replicas) if info.replicas > 1 else (tp, rank)
    return full.chunk(chunks, dim=info.dim)[index].clone()


@dataclass
class TPPlan:
    group: dist.ProcessGroup
    sequence_parallel: bool
    shards: Dict[str, ShardInfo] = field(default_factory=dict)  # parameter name -> how it is split
    # SP norm weights, by name (FSDP later swaps the Parameter objects): their grads are summed over tp
    partial_grad_names: List[str] = field(default_factory=list)

    def merge(self, other: "TPPlan") -> "TPPlan":
        """One plan for several pipeline stages of this rank (their parameter names are disjoint)."""
        self.shards.update(other.shards)
        self.partial_grad_names += other.partial_grad_names
        return self


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

    def __init__(self, embedding: nn.Embedding, plan: TPPlan, info: ShardInfo):
        super().__init__()
        self.plan = plan
        self.weight = nn.Parameter(tp_local(embedding.weight.detach(), info, plan.group))
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


def _shard(plan: TPPlan, module: nn.Module, key: str, info: ShardInfo) -> None:
    """Replace module.weight by this rank's part, and remember how it was cut (for init, gathers and grads)."""
    info.full_shape = tuple(module.weight.shape)
    plan.shards[key] = info
    _set_weight(module, tp_local(module.weight.detach(), info, plan.group))


def _shard_fused(plan: TPPlan, module: nn.Module, key: str, kv_replicas: int) -> None:
    """A fused column-parallel projection (module.fused_parts: wqkv, w13): every part split by rows on its own
    (K and V rows shared like wk/wv's), and module.split_sizes set to the rows of each part in this rank's shard,
    so the model splits the GEMM's output into this rank's q/k/v (or gate/up) columns."""
    parts = tuple((name, rows, kv_replicas if name in ("wk", "wv") else 1) for name, rows in module.fused_parts)
    info = ShardInfo(0, parts=parts)
    _shard(plan, module, key, info)
    module.split_sizes = info.part_rows(dist.get_world_size(plan.group))


def apply_tensor_parallel(model: nn.Module, group: dist.ProcessGroup, sequence_parallel: bool) -> TPPlan:
    """Shard a Llama `model` or pipeline stage (materialized or on the meta device) in place over `group`; returns
    what was split, for initialization, gathers and gradients."""
    plan = TPPlan(group=group, sequence_parallel=sequence_parallel)
    tp = dist.get_world_size(group)
    padded_vocab = padded_vocab_size(model.cfg.vocab_size, tp)
    kv_replicas = max(1, tp // model.cfg.n_kv_heads)
    if model.tok_embeddings is not None:
        vocab_rows = ShardInfo(0, full_shape=tuple(model.tok_embeddings.weight.shape), padded_size=padded_vocab)
        plan.shards["tok_embeddings.weight"] = vocab_rows
        model.tok_embeddings = VocabParallelEmbedding(model.tok_embeddings, plan, vocab_rows)
    for name, block in model.layers.items():
        prefix = f"layers.{name}"
        for region_name, column, row in (("attention", ("wq", "wk", "wv"), "wo"),
                                         ("feed_forward", ("w1", "w3"), "w2")):
            region = getattr(block, region_name)
            for proj, module in region.named_children():
                if getattr(module, "fused_parts", None):  # wqkv or w13: one GEMM for the column projections
                    _shard_fused(plan, module, f"{prefix}.{region_name}.{proj}.weight", kv_replicas)
            for proj in (p for p in column if hasattr(region, p)):
                replicas = kv_replicas if proj in ("wk", "wv") else 1
                _shard(plan, getattr(region, proj), f"{prefix}.{region_name}.{proj}.weight",
                       ShardInfo(0, replicas=replicas))
            _shard(plan, getattr(region, row), f"{prefix}.{region_name}.{row}.weight", ShardInfo(1))
            region.register_forward_pre_hook(_enter_region(plan))
            getattr(region, row).register_forward_hook(_leave_region(plan))
        if sequence_parallel:
            plan.partial_grad_names += [f"{prefix}.attention_norm.weight", f"{prefix}.ffn_norm.weight"]
    if model.output is not None:
        # the head's rows are the vocabulary, or one row for a reward model's scalar head (align/reward.py): either
        # way they are zero-padded to a multiple of tp and split, and the padding columns carry no loss
        head_rows = padded_vocab_size(model.output.out_features, tp)
        _shard(plan, model.output, "output.weight", ShardInfo(0, padded_size=head_rows))
        model.output.register_forward_pre_hook(_enter_region(plan))
        if sequence_parallel:
            plan.partial_grad_names.append("norm.weight")
    return plan
