"""Peak memory per GPU of a herd layout (what torch's allocator would report as max_memory_allocated).

Persistent state comes exact from layout.rank_state. Everything else is a formula of herd's block (RMSNorm, GQA
with RoPE, SwiGLU; parallel/*, engine/model/llama.py), per micro-batch of t = mbs x S / cp tokens on a rank and
t_sp = t / tp outside the tensor-parallel regions when sequence parallelism is on (Korthikanti et al. 2022, with
herd's dtypes: the residual stream is fp32, autocast gives bf16 matmul outputs, the fused norms save fp32 inputs):

  saved per block = r d t_sp (block input, kept by the attention norm; r = 4 bytes (fp32) without FSDP, 2 with
                    FSDP's bf16 weights) + 4 t_sp (its rstd)
                  + 2 d t (norm output, gathered over tp: the q/k/v projections' input)
                  + 2 (d/tp) t + 2 x 2 kv t' (q, and K, V after RoPE; t' = mbs S when cp > 1: the all-gathered K/V)
                  + 2 (d/tp) t + 4 (h/tp) t (attention output and its log-sum-exp)
                  + r d t_sp + 4 t_sp (h = x + attention, kept by the fused add-norm)
                  + 2 d t (second norm output, gathered) + 3 x 2 (f/tp) t (w1 out, w3 out, SwiGLU out)
  FP8 (native): the linears keep FP8 transposed copies of their inputs (1 byte) instead of bf16 ones, and an FP8
  transposed weight per micro-batch in flight (1 byte per block parameter) under FSDP.
  Activation checkpointing: a recomputed block keeps only its input (r d t_sp); in backward one block's full
  activations exist again (the transient below).
  Per forward of a stage: RoPE cos/sin (4 hd t) and, when document masks are on or cp > 1, the attention kernel's
  block plan (engine/model/attention.py: global indices and document ids, int64, at most 3 per token of the
  sequence: 24 mbs S bytes; no S^2 mask exists); the last stage keeps bf16 logits [t, V/tp] and fp32
  log-sum-exp per micro-batch in flight, and creates their gradient in backward.

Micro-batches in flight on pp rank r (torch.distributed.pipelining's schedules, units of one chunk of L/(pp v)
layers): GPipe all m; 1F1B min(m, pp - r); Interleaved1F1B (v-1) k + 2 (pp-1-r) + 1 and InterleavedZeroBubble
(v-1) k + (pp-1-r) + 1 chunks, k = microbatches per round (torch's _get_warmup_ops), at most m v; ZB-V and
DualPipe-V about 2 (pp - r) half-stage chunks (an estimate: their warm-up is not closed-form in torch).

Working copies: FSDP2 gathers bf16 parameters (fp32 when train.dtype=fp32): all of the rank's under pp (herd keeps
them gathered across micro-batches) or with reshard_after_forward=false, else the root (embedding, head) and two
blocks (the current one and the prefetched one). Without FSDP, autocast keeps a bf16 copy of every weight. With
gradient accumulation (m > 1) FSDP2 keeps fp32 unsharded gradients of all the rank's parameters between micro-
batches (FSDPParam.unsharded_accumulated_grad); without FSDP the .grad tensors live through the step.
"""

from dataclasses import dataclass
from typing import Dict

from engine.config import ModelConfig
from plan.layout import Layout, block_tensors, kv_rows, padded_vocab, rank_stages, rank_state, rank_unsharded_params


@dataclass(frozen=True)
class Memory:
    total: int
    parts: Dict[str, int]


def tokens(layout: Layout, seq_len: int) -> int:
    return layout.mbs * seq_len // layout.cp


def block_params(cfg: ModelConfig, tp: int) -> int:
    total = 0
    for _, shape in block_tensors(cfg, tp):
        n = 1
        for s in shape:
            n *= s
        total += n
    return total


def residual_bytes(layout: Layout) -> int:
    """The residual stream's dtype: bf16 when FSDP gathers bf16 weights (the embedding output is bf16), fp32
    when autocast runs over fp32 weights (the embedding lookup is not autocast)."""
    return 2 if layout.fsdp and layout.dtype == "bf16" else 4


def block_activations(cfg: ModelConfig, layout: Layout, seq_len: int) -> int:
    """Bytes one block saves for backward per micro-batch (no checkpointing)."""
    d, tp, f = cfg.dim, layout.tp, cfg.ffn_dim
    res = residual_bytes(layout)
    t = tokens(layout, seq_len)
    t_sp = t // tp if layout.sp else t
    kv_t = layout.mbs * seq_len if layout.cp > 1 else t
    lin = 1 if layout.fp8 else 2  # bytes of the saved linear inputs
    norms = 2 * (res * d * t_sp + 4 * t_sp)
    attention = lin * d * t + 2 * (d // tp) * t + 2 * 2 * kv_rows(cfg, tp) * kv_t + 2 * (d // tp) * t \
        + 4 * (cfg.n_heads // tp) * t + (d // tp * t if layout.fp8 else 0)
    mlp = lin * d * t + 2 * 2 * (f // tp) * t + lin * (f // tp) * t
    return norms + attention + mlp


def in_flight(layout: Layout, m: int, pp_rank: int) -> int:
    """Chunks of activations rank `pp_rank` holds at its peak (see the module docstring)."""
    pp, v, s = layout.pp, layout.vpp, layout.schedule
    if pp == 1:
        return 1
    if s == "GPipe":
        return m
    if s == "1F1B":
        return min(m, pp - pp_rank)
    if s in ("Interleaved1F1B", "InterleavedZeroBubble"):
        rounds = max(1, m // pp)
        per_round = m // rounds
        factor = 2 if s == "Interleaved1F1B" else 1
        return min(m * v, (v - 1) * per_round + factor * (pp - 1 - pp_rank) + 1)
    return min(2 * m, 2 * (pp - pp_rank))


def _stage_memory(cfg: ModelConfig, layout: Layout, seq_len: int, m: int, pp_rank: int) -> Dict[str, int]:
    stages = rank_stages(cfg.n_layers, layout.pp, layout.vpp, layout.schedule)[pp_rank]
    n_layers = sum(len(layers) for layers, _, _ in stages)
    first = any(f for _, f, _ in stages)
    last = any(lst for _, _, lst in stages)
    t = tokens(layout, seq_len)
    t_sp = t // layout.tp if layout.sp else t
    full = block_activations(cfg, layout, seq_len)
    kept = residual_bytes(layout) * cfg.dim * t_sp
    if layout.ac == "full":
        per_layer, recompute = kept, full
    elif layout.ac == "selective":
        share = 1.0 / layout.ac_every
        per_layer, recompute = int(share * kept + (1 - share) * full), full
    else:
        per_layer, recompute = full, 0
    chunks = in_flight(layout, m, pp_rank)
    chunk_layers = n_layers / len(stages)
    hd = cfg.dim // cfg.n_heads
    masked = layout.cp > 1 or layout.document_mask
    per_forward = 4 * hd * t + (24 * layout.mbs * seq_len if masked else 0)
    acts = int(chunks * (chunk_layers * per_layer + per_forward))
    if layout.fp8 and layout.fsdp:
        acts += chunks * int(chunk_layers) * block_params(cfg, layout.tp)  # FP8 weight copies per micro-batch
    vocab = padded_vocab(cfg.vocab_size, layout.tp) // layout.tp if layout.tp > 1 else cfg.vocab_size
    logits_held = (m if layout.schedule == "GPipe" and layout.pp > 1 else 1) if last else 0
    logits = logits_held * (2 * t * vocab + 4 * t)
    backward = recompute + (2 * t * vocab if last else 0)
    return {"activations": acts, "logits": logits, "backward_transient": backward,
            "first": int(first), "layers": n_layers}


def _working_copies(cfg: ModelConfig, layout: Layout, m: int, pp_rank: int) -> Dict[str, int]:
    unsharded = rank_unsharded_params(cfg, layout, pp_rank)
    width = 2 if layout.dtype == "bf16" else 4
    blk = block_params(cfg, layout.tp)
    if not layout.fsdp:
        gathered = unsharded * 2 if layout.dtype == "bf16" else 0
        accum = 0
    else:
        if layout.pp > 1 or not layout.reshard_after_forward:
            gathered = width * unsharded
        else:
            root = unsharded - cfg.n_layers * blk
            gathered = width * (root + 2 * blk)
        accum = 4 * unsharded if m > 1 else 0
    reduce_buffers = (width + 4) * blk if layout.fsdp else 0  # a block's unsharded grad, cast for reduce-scatter
    return {"gathered_params": gathered, "accumulated_grads": accum, "reduce_buffers": reduce_buffers}


def peak_memory(cfg: ModelConfig, layout: Layout, seq_len: int, m: int, pp_rank: int = 0) -> Memory:
    """Allocator peak on pp rank `pp_rank`, shard 0 (the largest FSDP shard): the larger of the end of the last
    forward plus the first backward transients, and the optimizer step (all state present)."""
    state = rank_state(cfg, layout, pp_rank, 0)
    stage = _stage_memory(cfg, layout, seq_len, m, pp_rank)
    work = _working_copies(cfg, layout, m, pp_rank)
    grads_in_forward = state.grads if (not layout.fsdp and m > 1) else 0
    forward_end = (state.params + state.optimizer + state.buffers + grads_in_forward + work["gathered_params"]
                   + work["accumulated_grads"] + stage["activations"] + stage["logits"])
    backward = forward_end + stage["backward_transient"] + work["reduce_buffers"]
    optimizer = state.total + (work["gathered_params"] if layout.pp > 1 else 0)
    parts = {"params": state.params, "grads": state.grads, "optimizer": state.optimizer, "buffers": state.buffers,
             **{k: v for k, v in work.items()}, "activations": stage["activations"], "logits": stage["logits"],
             "backward_transient": stage["backward_transient"]}
    return Memory(total=max(backward, optimizer), parts=parts)


def worst_peak(cfg: ModelConfig, layout: Layout, seq_len: int, m: int) -> Memory:
    """The largest peak over the pp ranks that can hold it: the first (most micro-batches in flight), the second
    (a full stage with almost as many) and the last (logits)."""
    ranks = sorted({0, min(1, layout.pp - 1), layout.pp - 1})
    return max((peak_memory(cfg, layout, seq_len, m, r) for r in ranks), key=lambda mem: mem.total)
