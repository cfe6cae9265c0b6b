"""Context parallelism: each sequence split over the cp ranks, attention exact across the split.

Sharding (load-balanced "zigzag", Llama 3 section 3.3.2): a sequence of S tokens is cut into 2*cp chunks and cp
rank r holds chunks r and 2*cp-1-r, so under the causal mask every rank does the same attention work. Everything
outside attention is per token, so only attention needs the other ranks. Two variants:

- all_gather (Llama 3's choice): all-gather K and V over cp (cheap with 8 KV heads), then attend the local
  queries to the whole sequence. Backward reduce-scatters the K/V gradients.
- ring: K and V travel around the cp ranks (P2P, the next block's transfer overlapped with the current block's
  compute); each source rank's keys give a partial output and its log-sum-exp, merged exactly (Liu et al. 2023,
  Ring Attention). The backward passes K, V around the ring again (overlapped with the block's gradients) and
  the gradient accumulators after them; each source's gradients come from the final (merged) log-sum-exp.

Both run the model's blockwise attention kernel (engine/model/attention.py; parallel/ may not import it, so
apply_context_parallel takes it from the model's own core) under a block plan built from each token's global
(zigzag) index and document id: memory is linear in S, no [L, S] mask or score tensor exists, and key blocks
that no local query may attend (later in the sequence, or another document) are never computed. With zigzag
chunks that skips half of every off-diagonal source (all queries against the source's first chunk when it
precedes this rank, only the second query chunk against it when it follows).

RoPE needs nothing: the loader shards position ids with the tokens. The loss sums over cp like over dp.
"""

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

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
    """The block plans one forward built, shared by every copy of its CPMask. A plain object on purpose: FSDP2
    casts a block's inputs with torch.distributed.utils._apply_to_tensors, which rebuilds dataclasses and dicts
    field by field but passes other objects through, so a dict field would be copied empty into every block and
    each layer would build its own plan (and read the document ids on the host again)."""

    def __init__(self):
        self.plans: Dict[tuple, object] = {}


@dataclass
class CPMask:
    """What the attention core needs to mask a rank's queries against keys of other ranks: the zigzag layout,
    every rank's document ids, and the kernel's block size."""

    rank: int
    cp: int
    chunk: int  # tokens per zigzag chunk
    doc_ids: Optional[List[torch.Tensor]]  # per cp rank: [b, 2*chunk] document ids (None: no document mask)
    block: int  # tokens per query / key block of the blockwise kernel
    _cache: MaskCache = field(default_factory=MaskCache)

    def segments(self, rank: int) -> Tuple[Tuple[int, int], ...]:
        """Global [start, stop) index ranges of rank's tokens in their local order; -1: every rank's, rank order
        (the all-gathered K/V)."""
        if rank == -1:
            return tuple(span for r in range(self.cp) for span in self.segments(r))
        c, last = self.chunk, 2 * self.cp - 1 - rank
        return (rank * c, (rank + 1) * c), (last * c, (last + 1) * c)

    def docs(self, rank: int) -> Optional[torch.Tensor]:
        if self.doc_ids is None:
            return None
        return torch.cat(self.doc_ids, dim=1) if rank == -1 else self.doc_ids[rank]  # [b, tokens]

    def plan(self, kernel, k_rank: int, device):
        """The kernel's block plan of this rank's queries against rank k_rank's keys (-1: all), built once per
        forward: every layer (and the recomputation under activation checkpointing) reuses it."""
        key = (k_rank, str(device))
        plans = self._cache.plans
        if key not in plans:
            plans[key] = kernel.plan(self.segments(self.rank), self.segments(k_rank), self.docs(self.rank),
                                     self.docs(k_rank), self.block, device)
        return plans[key]


class ContextParallelMask:
    """Replaces Transformer.attention_mask: gathers the (small) document ids of every cp rank once per forward."""

    def __init__(self, group: dist.ProcessGroup, block: int):
        self.group, self.block = group, block

    def __call__(self, position_ids: torch.Tensor, doc_ids: Optional[torch.Tensor]) -> CPMask:
        cp, rank = dist.get_world_size(self.group), dist.get_rank(self.group)
        gathered = None
        if doc_ids is not None:
            gathered = [torch.empty_like(doc_ids) for _ in range(cp)]
            dist.all_gather(gathered, doc_ids.contiguous(), group=self.group)
        return CPMask(rank, cp, position_ids.shape[1] // 2, gathered, self.block)


class AllGatherAttention:
    """Attention core: K/V all-gathered over cp (autograd: reduce-scatter backward), local queries attend all
    keys through the model's blockwise kernel under a plan from global indices and document ids: no [L, S]
    tensor, only the gathered K/V ([b, S, kv, d], cheap with GQA) and [b, h, block, block] scores."""

    def __init__(self, group: dist.ProcessGroup, kernel):
        self.group, self.kernel = group, kernel

    @torch.compiler.disable  # the kernel's host loops (engine/model/attention.py blockwise_attention)
    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: CPMask) -> torch.Tensor:
        # q: [b, L, h, d]; k, v: [b, L, kv, d] with L = S / cp -> out [b, L, h, d]
        kv = comm.gather_from_sp(torch.cat([k, v], dim=2), self.group)  # one collective: [b, S, 2*kv, d]
        k_all, v_all = kv.chunk(2, dim=2)  # [b, S, kv, d] each, rank r's tokens at [r*L, (r+1)*L)
        plan = mask.plan(self.kernel, -1, q.device)
        out = self.kernel.attend(q.transpose(1, 2), k_all.transpose(1, 2), v_all.transpose(1, 2), plan)
        return out.transpose(1, 2)


class RingAttention:
    """Attention core: ring attention over cp (see the module docstring), each block through the model's kernel."""

    def __init__(self, group: dist.ProcessGroup, kernel):
        self.group, self.kernel = group, kernel

    @torch.compiler.disable  # P2P and the kernel's host loops
    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: CPMask) -> torch.Tensor:
        # [b, L, heads, d] -> [b, heads, L, d] for the block math; dtypes explicit inside (autocast off)
        with torch.autocast(q.device.type, enabled=False):
            out = _RingAttention.apply(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask, self.group,
                                       self.kernel)
        return out.transpose(1, 2)


def _merge(out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor) -> None:
    """Fold one source's partial softmax into the running one, in place (Liu et al. 2023): out [b, h, L, d] and
    lse [b, h, L] become those over the union of both key sets; -inf lse (no key yet) weighs 0."""
    merged = torch.logaddexp(lse, block_lse)
    old_weight = torch.exp(lse - merged).nan_to_num(0.0).unsqueeze(-1)
    new_weight = torch.exp(block_lse - merged).nan_to_num(0.0).unsqueeze(-1)
    out.mul_(old_weight).add_(block_out * new_weight)
    lse.copy_(merged)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask: CPMask, group, kernel):
        # q: [b, h, L, d]; k, v: [b, kv, L, d]. A source's keys wholly after this rank's queries (the second half
        # of a later rank's, say) are skipped by the kernel's plan: no block of them is computed.
        out, lse = None, None  # [b, h, L, d], [b, h, L] in the kernel's accumulator dtype (fp32)
        current = torch.stack([k, v])  # [2, b, kv, L, d]
        for step in range(mask.cp):
            src = (mask.rank - step) % mask.cp
            pending = _ring_shift(current, group) if step < mask.cp - 1 else None  # overlaps the block below
            block_out, block_lse = kernel.forward_blocks(q, current[0], current[1], mask.plan(kernel, src, q.device))
            if out is None:
                out, lse = block_out, block_lse
            else:
                _merge(out, lse, block_out, block_lse)
            if pending is not None:
                current = pending.wait()
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.mask, ctx.group, ctx.kernel = mask, group, kernel
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        mask, group, kernel = ctx.mask, ctx.group, ctx.kernel
        grad_out = grad_out.to(q.dtype)
        delta = (grad_out.to(out.dtype) * out).sum(-1)  # [b, h, L]: rowsum(dO * O) of the softmax backward
        grad_q = torch.zeros_like(out)
        current = torch.stack([k, v])  # K, V of rank src, travelling with their gradient accumulators
        grads = torch.zeros(current.shape, dtype=out.dtype, device=current.device)
        for step in range(mask.cp):
            src = (mask.rank - step) % mask.cp
            incoming = _ring_shift(current, group) if step < mask.cp - 1 else None  # K, V move on during compute
            dq, dk, dv = kernel.backward_blocks(q, current[0], current[1], grad_out, lse, delta,
                                                mask.plan(kernel, src, q.device))
            grad_q += dq
            grads[0] += dk
            grads[1] += dv
            if incoming is not None:  # their gradient accumulators follow once this block has added to them
                grads = _ring_shift(grads, group).wait()
                current = incoming.wait()
        # the accumulators now hold every rank's contribution for the K/V of rank+1: one last hop brings them home
        grads = _ring_shift(grads, group).wait()
        return grad_q.to(q.dtype), grads[0].to(k.dtype), grads[1].to(v.dtype), None, None, None


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


def apply_context_parallel(model: nn.Module, group: dist.ProcessGroup, variant: str) -> None:
    """Swap the model's mask builder and every attention core for the cp ones (names and parameters unchanged).
    The cp cores wrap the kernel of the model's own core (engine/model/attention.py CausalAttention: `plan`,
    `attend`, `forward_blocks`, `backward_blocks`), which parallel/ may not import."""
    kernels = {index: block.attention.core for index, block in model.layers.items()}
    for index, kernel in kernels.items():
        if not all(hasattr(kernel, name) for name in ("plan", "attend", "forward_blocks", "backward_blocks")):
            raise TypeError(f"layer {index}: context parallelism needs the model's blockwise attention core, "
                            f"found {type(kernel).__name__}")
    block = next(iter(kernels.values())).block if kernels else 0
    model.attention_mask = ContextParallelMask(group, block)
    for index, layer in model.layers.items():
        kernel = kernels[index]
        layer.attention.core = AllGatherAttention(group, kernel) if variant == "all_gather" \
            else RingAttention(group, kernel)


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
