"""Rank function of test_cp_attention.py (module-level so spawned processes can import it)."""

import torch
import torch.distributed as dist

from engine.model.attention import causal_attention
from parallel.context_parallel import (AllGatherAttention, ContextParallelMask, RingAttention, shard_sequence)


def cp_attention_grads(rank: int, world_size: int, cases: dict, block: int) -> dict:
    """Every cp variant on this rank's zigzag share of each case's inputs (q, k, v, grad [b, S, heads, d], docs
    [b, S] or None), for cp = world_size and cp = 2 (pairs of ranks): this rank's output and q, k, v gradients."""
    pairs = [dist.new_group([r, r + 1]) for r in range(0, world_size, 2)]  # every rank creates every group
    groups = {world_size: dist.group.WORLD, 2: pairs[rank // 2]}
    return {(case, *key): value for case, inputs in cases.items()
            for key, value in _variants(rank, groups, inputs, block).items()}


def _variants(rank: int, groups: dict, inputs: dict, block: int) -> dict:
    results = {}
    for cp, group in groups.items():
        cp_rank = dist.get_rank(group)
        local = {name: shard_sequence(t, cp, cp_rank) if t is not None else None for name, t in inputs.items()}
        positions = torch.arange(local["q"].shape[1]).expand(local["q"].shape[:2])
        for variant, core in (("all_gather", AllGatherAttention), ("ring", RingAttention)):
            mask = ContextParallelMask(group, block)(positions, local["docs"])
            q, k, v = (local[name].clone().requires_grad_() for name in ("q", "k", "v"))
            out = core(group, causal_attention)(q, k, v, mask)
            grads = torch.autograd.grad(out, (q, k, v), local["grad"])
            results[(cp, variant)] = [out.detach(), *grads]
    return results
