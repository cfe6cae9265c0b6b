"""Context parallelism: each sequence split over the cp ranks, attention exact across the split.

Sharding (load-balanced "zigzag", Llama 3 section 3.3.2): a sequence of S tokens is cut into 2*cp chunks and cp
rank r holds chunks r and 2*cp-1-r, so under the causal mask every rank does the same attention work. Everything
outside attention is per token, so only attention needs the other ranks. Two variants:

- all_gather (Llama 3's choice): all-gather K and V over cp (cheap with 8 KV heads), then attend the local
  queries to the whole sequence under a mask built from global token indices (and document ids). Backward
  reduce-scatters the K/V gradients.
- ring: K and V travel around the cp ranks (P2P, the next block's transfer overlapped with the current block's
  compute); each block gives a partial output and its log-sum-exp, merged exactly (Liu et al. 2023, Ring
  Attention). The backward passes K, V around the ring again (overlapped with the block's gradients) and the
  gradient accumulators after them. With zigzag chunks
  an off-diagonal block needs only half of itself: all queries against the source's first chunk (source before
  this rank) or this rank's second query chunk against all its keys (source after it).

RoPE needs nothing: the loader shards position ids with the tokens. The loss sums over cp like over dp.
"""

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from parallel import comm


def zigzag_indices(seq_len: int, cp: int, rank: int) -> torch.Tensor:
    """Global token positions held by cp rank `rank`: chunks rank and 2*cp-1-rank of 2*cp. -> [seq_len / cp]"""
    chunk = seq_len // (2 * cp)
    first = torch.arange(rank * chunk, (rank + 1) * chunk)
    second = torch.arange((2 * cp - 1 - rank) * chunk, (2 * cp - rank) * chunk)
    return torch.cat([first, second])


class MaskCache:
    """The masks one forward built, shared by every copy of its CPMask. A plain object on purpose: FSDP2 casts a
    block's inputs with torch.distributed.utils._apply_to_tensors, which rebuilds dataclasses and dicts field by
    field but passes other objects through, so a dict field would be copied empty into every block and each layer
    would build (and, saved for backward, keep) its own [L, S] mask: 1 GiB per layer and micro-batch in flight at
    128K context with cp=16 (found by `herd train --dry-run`, docs/scale.md)."""

    def __init__(self):
        self.masks: Dict[tuple, torch.Tensor] = {}


@dataclass
class CPMask:
    """What the attention core needs to mask a rank's queries against keys of other ranks."""

    rank: int
    cp: int
    chunk: int  # tokens per zigzag chunk
    doc_ids: Optional[List[torch.Tensor]]  # per cp rank: [b, 2*chunk] document ids (None: no document mask)
    _cache: MaskCache = field(default_factory=MaskCache)

    def indices(self, rank: int, device: torch.device) -> torch.Tensor:
        return zigzag_indices(2 * self.chunk * self.cp, self.cp, rank).to(device)

    def allowed(self, q_rank: int, q_rows: slice, k_rank: int, k_cols: slice, device) -> torch.Tensor:
        """bool [b or 1, 1, len(q_rows), len(k_cols)]: key at or before the query, and in its document. Built
        once per forward: every layer (and the recomputation under activation checkpointing) reuses it."""
        key = (q_rank, q_rows.start, q_rows.stop, k_rank, k_cols.start, k_cols.stop)
        masks = self._cache.masks
        if key not in masks:
            masks[key] = self._allowed(q_rank, q_rows, k_rank, k_cols, device)
        return masks[key]

    def additive(self, q_rank: int, q_rows: slice, k_rank: int, k_cols: slice, device,
                 dtype: torch.dtype) -> torch.Tensor:
        """`allowed` as SDPA's additive form in the queries' dtype: 0 where allowed, -inf elsewhere, built once
        per forward. SDPA turns a boolean mask into exactly this on every call and saves it for backward, so
        passing the boolean one costs a [L, S] copy per layer and micro-batch in flight (2 GiB each at 128K with
        cp=16 in bf16: the dry run of 405B's 128K layout held 112 of them at its peak). Same arithmetic: outputs
        and gradients are bitwise those of the boolean mask."""
        key = ("additive", dtype, q_rank, q_rows.start, q_rows.stop, k_rank, k_cols.start, k_cols.stop)
        masks = self._cache.masks
        if key not in masks:
            allowed = self._allowed(q_rank, q_rows, k_rank, k_cols, device)
            masks[key] = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, -math.inf)
        return masks[key]

    def _allowed(self, q_rank: int, q_rows: slice, k_rank: int, k_cols: slice, device) -> torch.Tensor:
        if k_rank == -1:  # keys of every rank, in rank order (the all-gathered K/V)
            return torch.cat([self._allowed(q_rank, q_rows, r, k_cols, device) for r in range(self.cp)], dim=-1)
        q_index = self.indices(q_rank, device)[q_rows]
        k_index = self.indices(k_rank, device)[k_cols]
        allowed = (k_index.unsqueeze(0) <= q_index.unsqueeze(1)).unsqueeze(0)  # [1, q, k]
        if self.doc_ids is not None:
            same = self.doc_ids[q_rank][:, q_rows].unsqueeze(2) == self.doc_ids[k_rank][:, k_cols].unsqueeze(1)
            allowed = allowed & same
        return allowed.unsqueeze(1)


class ContextParallelMask:
    """Replaces Transformer.attention_mask: gathers the (small) document ids of every cp rank once per forward."""

    def __init__(self, group: dist.ProcessGroup):
        self.group = group

    def __call__(self, position_ids: torch.Tensor, doc_ids: Optional[torch.Tensor]) -> CPMask:
        cp, rank = dist.get_world_size(self.group), dist.get_rank(self.group)
        gathered = None
        if doc_ids is not None:
            gathered = [torch.empty_like(doc_ids) for _ in range(cp)]
            dist.all_gather(gathered, doc_ids.contiguous(), group=self.group)
        return CPMask(rank, cp, position_ids.shape[1] // 2, gathered)


class AllGatherAttention:
    """Attention core: K/V all-gathered over cp (autograd: reduce-scatter backward), local queries attend all.

    The mask: a stored block (`additive`) gets the forward's one additive mask, which every stored block's SDPA
    keeps for backward instead of its own converted copy. A recomputed block (activation checkpointing) gets the
    boolean one, half the size, which is what the forward's cache then holds while its micro-batch is in flight;
    SDPA's converted copy lives only while that block is recomputed (dry run of 405B at 128K, cp=16: 53 GiB with
    the additive mask under full checkpointing, 40 GiB with the boolean one; docs/scale.md)."""

    def __init__(self, group: dist.ProcessGroup, additive: bool = True):
        self.group, self.additive = group, additive

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: CPMask) -> torch.Tensor:
        # q: [b, L, h, d]; k, v: [b, L, kv, d] with L = S / cp -> out [b, L, h, d]
        kv = comm.gather_from_sp(torch.cat([k, v], dim=2), self.group)  # one collective: [b, S, 2*kv, d]
        k_all, v_all = kv.chunk(2, dim=2)  # [b, S, kv, d] each, rank r's tokens at [r*L, (r+1)*L)
        everything = slice(None)
        bias = mask.additive(mask.rank, everything, -1, everything, q.device, q.dtype) if self.additive else \
            mask.allowed(mask.rank, everything, -1, everything, q.device)  # [b or 1, 1, L, S]
        out = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k_all.transpose(1, 2), v_all.transpose(1, 2), attn_mask=bias, enable_gqa=True)
        return out.transpose(1, 2)


class RingAttention:
    """Attention core: ring attention over cp (see the module docstring)."""

    def __init__(self, group: dist.ProcessGroup):
        self.group = group

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: CPMask) -> torch.Tensor:
        # [b, L, heads, d] -> [b, heads, L, d] for the block math
        out = _RingAttention.apply(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask, self.group)
        return out.transpose(1, 2)


def _block(mask: CPMask, src: int) -> Tuple[slice, slice]:
    """The query rows and key columns of the block (this rank's queries, rank src's keys) that can attend."""
    everything, c = slice(None), mask.chunk
    if src == mask.rank:
        return everything, everything
    if src < mask.rank:  # src's first chunk precedes both query chunks; its second follows both
        return everything, slice(0, c)
    return slice(c, 2 * c), everything  # only the second query chunk follows src's chunks


def _scores(q, k, scale):
    """q [b, h, Lq, d], k [b, kv, Lk, d] -> fp32 scores [b, kv, g, Lq, Lk] (g = h / kv query heads per KV)."""
    b, h, lq, d = q.shape
    kv = k.shape[1]
    return torch.einsum("bkgqd,bkld->bkgql", q.float().view(b, kv, h // kv, lq, d), k.float()) * scale


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask: CPMask, group):
        # q: [b, h, L, d]; k, v: [b, kv, L, d]
        b, h, length, d = q.shape
        kv_heads, scale = k.shape[1], 1.0 / math.sqrt(d)
        out = torch.zeros(b, kv_heads, h // kv_heads, length, d, dtype=torch.float32, device=q.device)
        lse = torch.full((b, kv_heads, h // kv_heads, length), float("-inf"), device=q.device)
        current = torch.stack([k, v])  # [2, b, kv, L, d]
        for step in range(mask.cp):
            src = (mask.rank - step) % mask.cp
            pending = _ring_shift(current, group) if step < mask.cp - 1 else None  # overlaps the block below
            rows, cols = _block(mask, src)
            scores = _scores(q[:, :, rows], current[0][:, :, cols], scale)
            allowed = mask.allowed(mask.rank, rows, src, cols, q.device).unsqueeze(1)  # [b|1, 1, 1, q, k]
            scores = scores.masked_fill(~allowed, float("-inf"))
            block_lse = torch.logsumexp(scores, dim=-1)  # [b, kv, g, q]
            probs = torch.exp(scores - block_lse.unsqueeze(-1)).nan_to_num(0.0)  # rows with no key give 0
            block_out = torch.einsum("bkgql,bkld->bkgqd", probs, current[1][:, :, cols].float())
            merged = torch.logaddexp(lse[..., rows], block_lse)
            old_weight = torch.exp(lse[..., rows] - merged).nan_to_num(0.0).unsqueeze(-1)
            new_weight = torch.exp(block_lse - merged).nan_to_num(0.0).unsqueeze(-1)
            out[..., rows, :] = out[..., rows, :] * old_weight + block_out * new_weight
            lse[..., rows] = merged
            if pending is not None:
                current = pending.wait()
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.mask, ctx.group = mask, group
        return out.view(b, h, length, d).to(q.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        mask, group = ctx.mask, ctx.group
        b, h, length, d = q.shape
        scale = 1.0 / math.sqrt(d)
        grad_out = grad_out.float().reshape(out.shape)  # [b, kv, g, L, d]
        delta = (grad_out * out).sum(-1)  # [b, kv, g, L]: rowsum(dO * O) of the softmax backward
        qf = q.float().view(out.shape)
        grad_q = torch.zeros_like(qf)
        current = torch.stack([k, v]).float()  # K, V of rank src, travelling with their gradient accumulators
        grads = torch.zeros_like(current)
        for step in range(mask.cp):
            src = (mask.rank - step) % mask.cp
            incoming = _ring_shift(current, group) if step < mask.cp - 1 else None  # K, V move on during compute
            rows, cols = _block(mask, src)
            keys, values = current[0][:, :, cols], current[1][:, :, cols]  # [b, kv, n, d]
            scores = torch.einsum("bkgqd,bknd->bkgqn", qf[..., rows, :], keys) * scale
            allowed = mask.allowed(mask.rank, rows, src, cols, q.device).unsqueeze(1)
            probs = torch.exp(scores - lse[..., rows].unsqueeze(-1)).masked_fill(~allowed, 0.0)
            d_out = grad_out[..., rows, :]
            grads[1][:, :, cols] += torch.einsum("bkgqn,bkgqd->bknd", probs, d_out)
            d_probs = torch.einsum("bkgqd,bknd->bkgqn", d_out, values)
            d_scores = probs * (d_probs - delta[..., rows].unsqueeze(-1)) * scale
            grad_q[..., rows, :] += torch.einsum("bkgqn,bknd->bkgqd", d_scores, keys)
            grads[0][:, :, cols] += torch.einsum("bkgqn,bkgqd->bknd", d_scores, qf[..., rows, :])
            if incoming is not None:  # their gradient accumulators follow once this block has added to them
                grads = _ring_shift(grads, group).wait()
                current = incoming.wait()
        # the accumulators now hold every rank's contribution for the K/V of rank+1: one last hop brings them home
        grads = _ring_shift(grads, group).wait()
        return (grad_q.view(b, h, length, d).to(q.dtype), grads[0].to(k.dtype), grads[1].to(v.dtype), None, None)


class _Shift:
    """A tensor in flight from the previous cp rank; `wait` returns it."""

    def __init__(self, works, buffer):
        self.works, self.buffer = works, buffer

    def wait(self) -> torch.Tensor:
        for work in self.works:
            work.wait()
        return self.buffer


def _ring_shift(x: torch.Tensor, group: dist.ProcessGroup) -> _Shift:
    """Send x to the next cp rank and receive the previous rank's tensor of the same shape (non-blocking)."""
    cp, rank = dist.get_world_size(group), dist.get_rank(group)
    x = x.contiguous()
    buffer = torch.empty_like(x)
    ops = [dist.P2POp(dist.isend, x, dist.get_global_rank(group, (rank + 1) % cp), group),
           dist.P2POp(dist.irecv, buffer, dist.get_global_rank(group, (rank - 1) % cp), group)]
    return _Shift(dist.batch_isend_irecv(ops), buffer)


def apply_context_parallel(model: nn.Module, group: dist.ProcessGroup, variant: str,
                           recomputed: Callable[[int], bool] = lambda index: False) -> None:
    """Swap the model's mask builder and every attention core for the cp ones (names and parameters unchanged).
    `recomputed(layer index)`: whether activation checkpointing recomputes that block (AllGatherAttention's mask)."""
    model.attention_mask = ContextParallelMask(group)
    for index, block in model.layers.items():
        block.attention.core = AllGatherAttention(group, additive=not recomputed(int(index))) \
            if variant == "all_gather" else RingAttention(group)


def shard_sequence(tensor: torch.Tensor, cp: int, rank: int) -> torch.Tensor:
    """This cp rank's zigzag share of a [b, S, ...] tensor -> [b, S / cp, ...]."""
    return tensor.index_select(1, zigzag_indices(tensor.shape[1], cp, rank).to(tensor.device))


def cp_bytes_per_layer(variant: str, cp: int, batch: int, seq_len: int, kv_heads: int, head_dim: int,
                       bytes_per_element: int) -> dict:
    """Analytic bytes one rank sends per layer (forward, backward) for a [batch, seq_len] sequence split over cp.

    all_gather: K and V of S/cp tokens go to cp-1 peers (ring all-gather: (cp-1)/cp of the full K/V), and the
    backward reduce-scatters the same volume. ring: K and V make cp-1 hops forward; backward K, V and their two
    gradient accumulators make cp-1 hops and the accumulators one more.
    """
    kv_local = 2 * batch * (seq_len // cp) * kv_heads * head_dim * bytes_per_element
    if variant == "all_gather":
        return {"forward": (cp - 1) * kv_local, "backward": (cp - 1) * kv_local}
    return {"forward": (cp - 1) * kv_local, "backward": (cp - 1) * 2 * kv_local + kv_local}
