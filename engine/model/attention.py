"""Attention whose memory grows linearly with the sequence: causal, under document masks, and across context-
parallel shards.

Three cases reach `causal_attention` (the model's `Attention.core`):
- no mask (one causal sequence): SDPA with is_causal, its fused flash / memory-efficient kernels;
- a `DocumentMask` (packed documents, Transformer.attention_mask): the blockwise kernel below;
- a boolean tensor (the KV-cache masks of align/generate.py, [b, 1, s_new, s_cache]): SDPA with that mask.

The blockwise kernel is flash attention's algorithm in plain torch (Dao et al. 2022, Algorithm 1 forward with the
online softmax of Milakov & Gimelshein 2018; Algorithm 2 backward, recomputing each block's probabilities from the
saved log-sum-exp). Queries and keys are cut into blocks of `block` tokens; a (query block, key block) pair is
computed only if some query of it may attend some key of it, and its mask (a [b, block, block] boolean) is built
only if not every query may attend every key. Whether a pair can attend follows from each token's global index
(causal: key index <= query index) and document id (same document): per block the index range is known from its
`Segments` on the host, the document-id range is read once per forward (under the dry run's fake tensors, which
have no values, the plan keeps one pair: `_one_pair`). So nothing of size s x s exists: the largest tensors are
the [b, h, block, block] scores of one pair, and the saved state is q, k, v, the output and one fp32
log-sum-exp per query and head. Matmuls run in the inputs' dtype (bf16 under autocast on a GPU), softmax
statistics and accumulators in fp32, as flash attention does.

Context parallelism (parallel/context_parallel.py) uses the same kernel through this module's core: queries of
one rank against the gathered keys of all (all_gather), or against one source rank's keys at a time with the
partial outputs merged by their log-sum-exp (ring); `Segments` then give each token's global (zigzag) index.

Why this and not FlexAttention (measured on torch 2.13, 2-core CPU, 2026-12): flex_attention on CPU refuses
inputs that require grad ("FlexAttention does not support backward on CPU"), in eager mode and under
torch.compile, so it cannot train on the machines that build and test herd, and no GPU was available to this
change to measure or verify a CUDA flex path. The blockwise kernel is therefore both the reference (tested equal
to the dense-mask SDPA oracle `document_causal_mask`, kept for that) and the path everywhere; a fused CUDA path
(flex_attention with a BlockMask from the same document ids, return_lse for the ring) would be tested equal to it.
Numbers: benchmarks/results/attention_memory_cpu.md.
"""

import math
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

Segments = Tuple[Tuple[int, int], ...]  # global token indices of a tensor's tokens: concatenated [start, stop)
BLOCK = 512  # tokens per query / key block: [b, h, 512, 512] fp32 scores are 32 MiB at h = 32 and b = 1


def document_causal_mask(position_ids: Optional[torch.Tensor], doc_ids: Optional[torch.Tensor]
                         ) -> Optional[torch.Tensor]:
    """The dense reference: causal and same document, bool [b, 1, s, s] (True: query i may attend key j).

    O(s^2) memory (4 GiB at 64K): the test oracle of the blockwise kernel and what TransformerEngine's
    "arbitrary" mask takes (engine/fp8/te.py), never the training path of herd's own attention. None: no docs."""
    if doc_ids is None:
        return None
    s = doc_ids.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool, device=doc_ids.device).tril()
    same_doc = doc_ids.unsqueeze(2) == doc_ids.unsqueeze(1)  # [b, s, s]
    return (same_doc & causal).unsqueeze(1)


def _is_fake(t: torch.Tensor) -> bool:
    """A FakeTensor (the dry run, engine/dry_run.py) has no values to read: plans then skip by index only."""
    from torch._subclasses.fake_tensor import FakeTensor
    return isinstance(t, FakeTensor)


def _segment_indices(segments: Segments, device) -> torch.Tensor:
    """[sum of segment lengths] global index of each token."""
    return torch.cat([torch.arange(start, stop, device=device) for start, stop in segments])


def _block_index_ranges(segments: Segments, block: int) -> List[Tuple[int, int]]:
    """(min, max) global index of each block of `block` consecutive tokens, on the host."""
    ranges, offset, total = [], 0, sum(stop - start for start, stop in segments)
    spans = []  # (local start, local stop, global start) per segment
    for start, stop in segments:
        spans.append((offset, offset + stop - start, start))
        offset += stop - start
    for lo in range(0, total, block):
        hi = min(lo + block, total)
        inside = [(g + max(lo, a) - a, g + min(hi, b) - 1 - a) for a, b, g in spans if a < hi and b > lo]
        ranges.append((min(r[0] for r in inside), max(r[1] for r in inside)))
    return ranges


def _doc_ranges(doc: torch.Tensor, block: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per batch row and block: smallest and largest document id. doc [b, L] -> ([b, n], [b, n])"""
    b, length = doc.shape
    n = -(-length // block)
    padded = torch.cat([doc, doc[:, -1:].expand(b, n * block - length)], dim=1).view(b, n, block)
    return padded.amin(-1), padded.amax(-1)


def _one_pair(rows: list) -> list:
    """The dry run's plan (FakeTensorMode): one pair, a masked one where there is one. Fake tensors carry no values,
    and every pair allocates the same block-sized temporaries, freed before the next, on top of the full-size
    output, log-sum-exp and gradient buffers allocated before the loop: one pair gives the same peak memory as
    all of them, without thousands of fake operators per layer at 128K (the dry run stepped for minutes)."""
    for row_slice, pairs in rows:
        for cols, masked in pairs:
            if masked:
                return [(row_slice, [(cols, masked)])]
    return [(rows[0][0], rows[0][1][:1])] if rows else []


class BlockPlan:
    """Which (query block, key block) pairs can attend, and which of them need a mask; built once per forward.

    rows: per query block, (query slice, [(key slice, needs_mask), ...]); a query block with no pair is absent."""

    def __init__(self, q_segments: Segments, k_segments: Segments, q_doc: Optional[torch.Tensor],
                 k_doc: Optional[torch.Tensor], block: int, device):
        self.q_index = _segment_indices(q_segments, device)  # [Lq]
        self.k_index = _segment_indices(k_segments, device)  # [Lk]
        self.q_doc, self.k_doc = q_doc, k_doc  # [b, Lq], [b, Lk] or None
        q_ranges, k_ranges = _block_index_ranges(q_segments, block), _block_index_ranges(k_segments, block)
        overlap = single = None  # [nq][nk] host lists: some row shares a document / every row one same document
        if q_doc is not None and not (_is_fake(q_doc) or _is_fake(k_doc)):
            q_lo, q_hi = _doc_ranges(q_doc, block)  # [b, nq]
            k_lo, k_hi = _doc_ranges(k_doc, block)  # [b, nk]
            meets = (q_lo.unsqueeze(2) <= k_hi.unsqueeze(1)) & (k_lo.unsqueeze(1) <= q_hi.unsqueeze(2))  # [b, nq, nk]
            one = (q_lo == q_hi).unsqueeze(2) & (k_lo == k_hi).unsqueeze(1) & (q_lo.unsqueeze(2) == k_lo.unsqueeze(1))
            overlap, single = meets.any(0).tolist(), one.all(0).tolist()  # the one host read of a forward
        self.rows: List[Tuple[slice, List[Tuple[slice, bool]]]] = []
        for i, (q_min, q_max) in enumerate(q_ranges):
            pairs = []
            for j, (k_min, k_max) in enumerate(k_ranges):
                if k_min > q_max or (overlap is not None and not overlap[i][j]):
                    continue  # every key after every query, or no document in common
                whole = k_max <= q_min and (q_doc is None or (single is not None and single[i][j]))
                pairs.append((slice(j * block, (j + 1) * block), not whole))
            if pairs:
                self.rows.append((slice(i * block, (i + 1) * block), pairs))
        if _is_fake(self.q_index):
            self.rows = _one_pair(self.rows)

    def allowed(self, rows: slice, cols: slice) -> torch.Tensor:
        """bool [b or 1, 1, 1, |rows|, |cols|] for scores [b, kv, g, |rows|, |cols|]: causal and same document."""
        mask = (self.k_index[cols].unsqueeze(0) <= self.q_index[rows].unsqueeze(1)).unsqueeze(0)  # [1, q, k]
        if self.q_doc is not None:
            mask = mask & (self.q_doc[:, rows].unsqueeze(2) == self.k_doc[:, cols].unsqueeze(1))  # [b, q, k]
        return mask[:, None, None]

    def pairs(self) -> int:
        return sum(len(pairs) for _, pairs in self.rows)


def _accumulator_dtype(q: torch.Tensor) -> torch.dtype:
    """Softmax statistics and accumulators: fp32 for bf16/fp16/fp32 inputs, fp64 for fp64 ones (the oracle tests)."""
    return torch.promote_types(q.dtype, torch.float32)


def _grouped(q: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """[b, h, L, d] -> [b, kv, g, L, d]: the g = h / kv query heads that share each K/V head (GQA)."""
    b, h, length, d = q.shape
    return q.reshape(b, kv_heads, h // kv_heads, length, d)


def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: BlockPlan
                      ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Blockwise attention forward (no autograd). q [b, h, Lq, d], k/v [b, kv, Lk, d] -> (out [b, h, Lq, d],
    lse [b, h, Lq]) in the accumulator dtype (fp32); a query that may attend no key gets out 0 and lse -inf."""
    b, h, lq, d = q.shape
    kv_heads, scale, acc_dtype = k.shape[1], 1.0 / math.sqrt(d), _accumulator_dtype(q)
    qg = _grouped(q, kv_heads)  # [b, kv, g, Lq, d]
    out = torch.zeros(qg.shape, dtype=acc_dtype, device=q.device)
    lse = torch.full(qg.shape[:-1], -math.inf, dtype=acc_dtype, device=q.device)  # [b, kv, g, Lq]
    for rows, pairs in plan.rows:
        q_block = qg[..., rows, :]
        row_max = torch.full(q_block.shape[:-1], -math.inf, dtype=acc_dtype, device=q.device)
        row_sum = torch.zeros_like(row_max)  # softmax denominators relative to row_max
        acc = torch.zeros(q_block.shape, dtype=acc_dtype, device=q.device)
        for cols, needs_mask in pairs:
            scores = torch.einsum("bkgqd,bknd->bkgqn", q_block, k[:, :, cols]).to(acc_dtype) * scale
            if needs_mask:
                scores = scores.masked_fill(~plan.allowed(rows, cols), -math.inf)
            new_max = torch.maximum(row_max, scores.amax(-1))
            shift = new_max.masked_fill(new_max == -math.inf, 0.0)  # rows with no key yet: exp(-inf) = 0, not nan
            probs = torch.exp(scores - shift.unsqueeze(-1))
            rescale = torch.exp(row_max - shift)
            row_sum = row_sum * rescale + probs.sum(-1)
            acc = acc * rescale.unsqueeze(-1) + torch.einsum(
                "bkgqn,bknd->bkgqd", probs.to(v.dtype), v[:, :, cols]).to(acc_dtype)
            row_max = new_max
        seen = row_sum > 0
        out[..., rows, :] = acc / torch.where(seen, row_sum, 1.0).unsqueeze(-1)
        lse[..., rows] = torch.where(seen, row_max + torch.log(row_sum), -math.inf)
    return out.view(b, h, lq, d), lse.view(b, h, lq)


def attention_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grad_out: torch.Tensor,
                       lse: torch.Tensor, delta: torch.Tensor, plan: BlockPlan
                       ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Blockwise backward for the keys of `plan` given the FINAL log-sum-exp and delta = rowsum(dO * O) of each
    query (over all keys, so the ring passes the merged ones). q, grad_out [b, h, Lq, d]; k, v [b, kv, Lk, d];
    lse, delta [b, h, Lq] -> (dq [b, h, Lq, d], dk, dv [b, kv, Lk, d]) in the accumulator dtype (fp32)."""
    b, h, lq, d = q.shape
    kv_heads, scale, acc_dtype = k.shape[1], 1.0 / math.sqrt(d), _accumulator_dtype(q)
    qg, dog = _grouped(q, kv_heads), _grouped(grad_out, kv_heads)  # [b, kv, g, Lq, d]
    lse_g = _grouped(lse.unsqueeze(-1), kv_heads).squeeze(-1)  # [b, kv, g, Lq]
    lse_g = lse_g.masked_fill(lse_g == -math.inf, 0.0)  # a query with no key: its scores are -inf, probs 0
    delta_g = _grouped(delta.unsqueeze(-1), kv_heads).squeeze(-1)
    dq = torch.zeros(qg.shape, dtype=acc_dtype, device=q.device)
    dk = torch.zeros(k.shape, dtype=acc_dtype, device=q.device)
    dv = torch.zeros(v.shape, dtype=acc_dtype, device=q.device)
    for rows, pairs in plan.rows:
        q_block, do_block = qg[..., rows, :], dog[..., rows, :]
        dq_block = torch.zeros(q_block.shape, dtype=acc_dtype, device=q.device)
        for cols, needs_mask in pairs:
            keys, values = k[:, :, cols], v[:, :, cols]
            scores = torch.einsum("bkgqd,bknd->bkgqn", q_block, keys).to(acc_dtype) * scale
            if needs_mask:
                scores = scores.masked_fill(~plan.allowed(rows, cols), -math.inf)
            probs = torch.exp(scores - lse_g[..., rows].unsqueeze(-1))  # the final softmax, recomputed
            dv[:, :, cols] += torch.einsum("bkgqn,bkgqd->bknd", probs.to(do_block.dtype), do_block).to(acc_dtype)
            d_probs = torch.einsum("bkgqd,bknd->bkgqn", do_block, values).to(acc_dtype)
            d_scores = (probs * (d_probs - delta_g[..., rows].unsqueeze(-1)) * scale).to(q.dtype)
            dq_block += torch.einsum("bkgqn,bknd->bkgqd", d_scores, keys).to(acc_dtype)
            dk[:, :, cols] += torch.einsum("bkgqn,bkgqd->bknd", d_scores, q_block).to(acc_dtype)
        dq[..., rows, :] = dq_block
    return dq.view(b, h, lq, d), dk, dv


class _BlockwiseAttention(torch.autograd.Function):
    """Autograd of the blockwise kernel: saves q, k, v, the output and its log-sum-exp, never a block's scores."""

    @staticmethod
    def forward(ctx, q, k, v, plan: BlockPlan):
        out, lse = attention_forward(q, k, v, plan)  # [b, h, Lq, d], [b, h, Lq] fp32
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan = plan
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        acc_dtype = _accumulator_dtype(q)
        delta = (grad_out.to(acc_dtype) * out.to(acc_dtype)).sum(-1)  # [b, h, Lq]
        dq, dk, dv = attention_backward(q, k, v, grad_out.to(q.dtype), lse, delta, ctx.plan)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None


@torch.compiler.disable  # a per-forward plan and host loops: traced, every plan would be a new, unrolled graph
def blockwise_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: BlockPlan) -> torch.Tensor:
    """q [b, h, Lq, d], k/v [b, kv, Lk, d] -> [b, h, Lq, d] in q's dtype; autocast off inside (dtypes explicit)."""
    with torch.autocast(q.device.type, enabled=False):
        return _BlockwiseAttention.apply(q, k, v, plan)


class DocumentMask:
    """Transformer.attention_mask's answer for packed documents: the doc ids [b, s] and the block plan built from
    them once per forward (every layer, and each recomputation under activation checkpointing, reuses it).

    A plain object on purpose: FSDP2 rebuilds dataclass and dict inputs of each block field by field (see
    parallel/context_parallel.py MaskCache), which would give every block an empty cache and its own plan."""

    def __init__(self, doc_ids: torch.Tensor, block: int = BLOCK):
        self.doc_ids, self.block = doc_ids, block
        self._plans: Dict[tuple, BlockPlan] = {}

    def plan(self, device) -> BlockPlan:
        key = (str(device),)
        if key not in self._plans:
            whole: Segments = ((0, self.doc_ids.shape[1]),)
            self._plans[key] = BlockPlan(whole, whole, self.doc_ids, self.doc_ids, self.block, device)
        return self._plans[key]

    def dense(self) -> torch.Tensor:
        """The same mask as the dense reference, bool [b, 1, s, s] (for TransformerEngine's arbitrary mask)."""
        return document_causal_mask(None, self.doc_ids)

    def dense_cached(self) -> torch.Tensor:
        """dense(), built once per forward and shared by every layer (the GPU path of short sequences)."""
        if "dense" not in self._plans:
            self._plans["dense"] = self.dense()
        return self._plans["dense"]


def document_mask(position_ids: torch.Tensor, doc_ids: Optional[torch.Tensor], block: int = BLOCK
                  ) -> Optional[DocumentMask]:
    """Transformer.attention_mask: None (plain causal, SDPA's fused path) or a DocumentMask. doc_ids [b, s]."""
    return None if doc_ids is None else DocumentMask(doc_ids, block)


# On a GPU, up to this many keys a document mask goes to SDPA as a dense boolean mask (its fused memory-efficient
# kernel; 256 MiB of mask per micro-batch at 16K), as herd did before the blockwise kernel: the pure-torch kernel
# launches a few kernels per block pair, and its GPU speed is not measured yet (no GPU was lent to the change).
# Longer sequences, where the dense mask would dominate memory (4 GiB at 64K), and every CPU run take the
# blockwise kernel. To be replaced by a fused CUDA path (FlexAttention) once one is measured on a GPU.
GPU_DENSE_MASK_MAX_KEYS = 16384


def dense_mask_on(device: torch.device, keys: int) -> bool:
    return device.type == "cuda" and keys <= GPU_DENSE_MASK_MAX_KEYS


@torch.compiler.disable  # the plan reads document ids on the host once per forward (see blockwise_attention)
def _document_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: DocumentMask) -> torch.Tensor:
    if dense_mask_on(q.device, k.shape[2]):  # q/k/v [b, heads, s, d]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.dense_cached(), enable_gqa=True)
    return blockwise_attention(q, k, v, mask.plan(q.device))


class CausalAttention:
    """The model's attention core (module docstring). q [b, s, h, d], k/v [b, s, kv, d] -> [b, s, h, d].

    Also the kernel context parallelism wraps: `plan` and `attend` (queries and keys at any global indices, with
    an autograd) and `forward_blocks` / `backward_blocks` (the ring's per-source partials, merged outside)."""

    block = BLOCK
    plan = BlockPlan
    forward_blocks = staticmethod(attention_forward)
    backward_blocks = staticmethod(attention_backward)
    attend = staticmethod(blockwise_attention)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask) -> torch.Tensor:
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [b, heads, s, d]
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        elif isinstance(mask, DocumentMask):
            out = _document_attention(q, k, v, mask)
        else:  # an explicit boolean mask (KV-cache decoding): [b, 1, s, s_keys], small
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        return out.transpose(1, 2)


causal_attention = CausalAttention()

