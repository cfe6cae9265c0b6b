"""Step time of a herd layout: compute from FLOPs over calibrated efficiencies, communication from a latency +
bandwidth model per link class, the pipeline bubble per schedule, the optimizer step.

Per micro-batch and block on one rank (t = mbs S / cp tokens, P_b the block's matmul parameters):
  GEMM       6 P_b t / tp / (gemm_eff x peak)                         (fp8: the fp8 efficiency and peak)
  attention  6 (d / tp) S t / (attn_eff x bf16 peak)                  (causal FLOPs; zigzag cp keeps ranks equal)
  elementwise ew_passes x t (d + f) 2 / tp / copy bandwidth, + 6 P_b / tp / copy bandwidth for the autocast
             weight cast when there is no FSDP (FSDP casts the shard once per gather), + the host gap per block
  checkpointing  + 1/3 of the above per recomputed block (its forward again), with the forward's collectives
The head adds 6 V d t / tp GEMM FLOPs and head_passes x t V 2 / tp bytes on the last stage.

Collectives (ring; Patarasuk & Yuan 2009, NCCL's model): all-gather / reduce-scatter of an N-byte result over n
ranks take (n-1) alpha + (n-1)/n N / B; all-reduce is the smaller of the ring (twice that) and the tree,
2 log2(n) alpha + 2 N / B. B and alpha are NVLink's when the group fits in a node, the network's otherwise.
Which collectives are exposed, per herd's code:
  tp/sp   hooks call all-gather / reduce-scatter synchronously (parallel/comm.py): all exposed, 4 per block
          forward and 4 backward of t d bf16 (all-reduces without sequence parallelism), + embedding and head.
  cp      all_gather attention gathers K and V in one synchronous collective per block forward and
          reduce-scatters their gradients in backward: exposed.
  pp      P2P of the stage output (fp32 residual, sequence-sharded under SP): the fill and drain hops are exposed,
          steady-state transfers overlap with the other direction's compute.
  dp      FSDP2 prefetches the next block's all-gather and runs reduce-scatters on their own stream: exposed is
          the first gather and last reduce of a pass plus any per-block excess of communication over the block's
          compute. Under pp parameters are gathered once per step and reduced once; without pp, with
          reshard_after_forward, every micro-batch gathers twice (forward, backward). HSDP adds an all-reduce of
          the fp32 shard over dp_replicate.
Bubble: c_s x (v_bench / v) x (pp - 1) x T_mb, T_mb the rank's time for one micro-batch through all its stages and
c_s the bubble our benchmark measured for schedule s (benchmarks/results/pipeline_bubble.json) in those units
(theory: 1 for GPipe/1F1B, 1/v interleaved, 1/(3v) interleaved zero bubble, 0 for ZB-V and DualPipe-V).
Optimizer: optim_bytes x local parameters / copy bandwidth; gradient accumulation adds 10 bytes per unsharded
parameter per extra micro-batch (bf16 gradient read, fp32 accumulator read and write).
"""

import json
import math
from dataclasses import dataclass
from typing import Dict

from engine.config import ModelConfig
from engine.flops import flops_per_token
from plan.calibrate import Calibration
from plan.hardware import RESULTS_DIR, Hardware, Link
from plan.layout import Layout, kv_rows, padded_vocab, rank_stages, rank_state, rank_unsharded_params
from plan.memory import block_params, residual_bytes, tokens


@dataclass(frozen=True)
class StepTime:
    total: float  # seconds
    parts: Dict[str, float]  # compute, tp, cp, pp, dp, bubble, optimizer
    tokens_per_s_gpu: float
    tflops_gpu: float
    mfu: float


def bubble_units(path=RESULTS_DIR / "pipeline_bubble.json") -> Dict[str, float]:
    """c_s x v_bench per schedule: measured bubble time / ((pp - 1) x one micro-batch's busy time per rank)."""
    units = {}
    for row in json.loads(path.read_text()):
        per_micro = row["busy_s"] / row["microbatches"]
        units[row["schedule"]] = (row["step_s"] - row["busy_s"]) / ((row["pp"] - 1) * per_micro) \
            * row["virtual_stages"]
    return units


def ring(link: Link, n: int, size: float) -> float:
    """All-gather or reduce-scatter with an N-byte result over n ranks."""
    if n <= 1:
        return 0.0
    return (n - 1) * link.latency_us * 1e-6 + (n - 1) / n * size / (link.bandwidth_gbs * 1e9)


def all_reduce(link: Link, n: int, size: float) -> float:
    if n <= 1:
        return 0.0
    tree = 2 * math.log2(n) * link.latency_us * 1e-6 + 2 * size / (link.bandwidth_gbs * 1e9)
    return min(2 * ring(link, n, size), tree)


def links(hw: Hardware, layout: Layout) -> Dict[str, Link]:
    """Link class of each group, from the mesh order (dp_replicate, dp_shard, pp, cp, tp; tp innermost)."""
    g = hw.gpus_per_node
    span = {"tp": layout.tp, "cp": layout.tp * layout.cp, "pp": layout.tp * layout.cp * layout.pp,
            "fsdp": layout.tp * layout.cp * (layout.pp * layout.dp_shard if layout.dp_shard > 1 else 1),
            "replicate": layout.world}
    return {k: (hw.nvlink if v <= g else hw.network) for k, v in span.items()}


def _block_times(cfg: ModelConfig, layout: Layout, seq_len: int, hw: Hardware, cal: Calibration) -> Dict[str, float]:
    """Seconds one block costs one micro-batch on a rank, by kind (compute, tp, cp)."""
    t, tp, bw = tokens(layout, seq_len), layout.tp, hw.copy_gbs * 1e9
    prec = "fp8" if layout.fp8 else "bf16"
    mm_params = block_params(cfg, tp) - 2 * cfg.dim
    gemm = 6 * mm_params * t / (cal.gemm_eff[prec] * hw.peak_tflops[prec] * 1e12)
    attention = 6 * (cfg.dim / tp) * seq_len * t / (cal.attn_eff * hw.peak_tflops["bf16"] * 1e12)
    ew = cal.ew_passes[prec] * t * (cfg.dim + cfg.ffn_dim) * 2 / tp / bw
    cast = 6 * mm_params / bw if not layout.fsdp and layout.dtype == "bf16" and not layout.fp8 else 0.0
    compute = gemm + attention + ew + cast + cal.gap_block_ms * 1e-3
    lk = links(hw, layout)
    act = t * cfg.dim * 2  # the gathered [t, d] bf16 tensor
    if tp > 1 and layout.sp:
        tp_fwd = 4 * ring(lk["tp"], tp, act)
    else:
        tp_fwd = 2 * all_reduce(lk["tp"], tp, act) if tp > 1 else 0.0
    kv = 2 * layout.mbs * seq_len * kv_rows(cfg, tp) * 2  # K and V of the whole sequence, bf16
    cp_fwd = ring(lk["cp"], layout.cp, kv) if layout.cp > 1 else 0.0
    share = {"none": 0.0, "full": 1.0, "selective": 1.0 / layout.ac_every}[layout.ac]
    return {"compute": compute * (1 + share / 3), "tp": tp_fwd * (2 + share), "cp": cp_fwd * (2 + share)}


def _head_times(cfg: ModelConfig, layout: Layout, seq_len: int, hw: Hardware, cal: Calibration) -> Dict[str, float]:
    t, tp = tokens(layout, seq_len), layout.tp
    vocab = padded_vocab(cfg.vocab_size, tp) if tp > 1 else cfg.vocab_size
    gemm = 6 * vocab * cfg.dim * t / tp / (cal.gemm_eff["bf16"] * hw.peak_tflops["bf16"] * 1e12)
    ew = cal.head_passes * t * vocab * 2 / tp / (hw.copy_gbs * 1e9)
    comm = 4 * ring(links(hw, layout)["tp"], tp, t * cfg.dim * 2) if tp > 1 else 0.0  # head + embedding
    return {"compute": gemm + ew, "tp": comm}


def _micro_batch(cfg: ModelConfig, layout: Layout, seq_len: int, hw: Hardware, cal: Calibration) -> Dict[str, float]:
    """One micro-batch through the busiest pp rank's stages (the pipeline runs at its pace)."""
    per_rank = rank_stages(cfg.n_layers, layout.pp, layout.vpp, layout.schedule)
    block = _block_times(cfg, layout, seq_len, hw, cal)
    head = _head_times(cfg, layout, seq_len, hw, cal)
    best = None
    for stages in per_rank if layout.pp <= 4 else (per_rank[0], per_rank[min(1, layout.pp - 1)], per_rank[-1]):
        n = sum(len(layers) for layers, _, _ in stages)
        last = any(lst for _, _, lst in stages)
        times = {k: n * block[k] + (head.get(k, 0.0) if last else 0.0) for k in ("compute", "tp", "cp")}
        if best is None or sum(times.values()) > sum(best.values()):
            best = times
    return best


def _fsdp_exposed(cfg: ModelConfig, layout: Layout, m: int, hw: Hardware, block_compute: float) -> float:
    if not layout.fsdp:
        return 0.0
    lk = links(hw, layout)
    width = 2 if layout.dtype == "bf16" else 4
    blk = block_params(cfg, layout.tp)
    n = layout.fsdp_shards
    gather = ring(lk["fsdp"], n, width * blk)
    reduce = ring(lk["fsdp"], n, 4 * blk) + all_reduce(lk["replicate"], layout.dp_replicate, 4 * blk / max(n, 1))
    gathers = 1 if layout.pp > 1 else (2 * m if layout.reshard_after_forward else m)
    layers = max(sum(len(ls) for ls, _, _ in st) for st in rank_stages(cfg.n_layers, layout.pp, layout.vpp,
                                                                        layout.schedule))
    per_gather_pass = gather + max(0.0, gather - block_compute / 3) * (layers - 1)
    per_reduce_pass = reduce + max(0.0, reduce - 2 * block_compute / 3) * (layers - 1)
    return gathers * per_gather_pass + per_reduce_pass


def step_time(cfg: ModelConfig, layout: Layout, seq_len: int, global_tokens: int, hw: Hardware,
              cal: Calibration, units: Dict[str, float]) -> StepTime:
    m = global_tokens // seq_len // (layout.mbs * layout.dp)
    micro = _micro_batch(cfg, layout, seq_len, hw, cal)
    t_mb = sum(micro.values())
    parts = {"compute": m * micro["compute"], "tp": m * micro["tp"], "cp": m * micro["cp"]}
    block = _block_times(cfg, layout, seq_len, hw, cal)["compute"]
    parts["dp"] = _fsdp_exposed(cfg, layout, m, hw, block)
    parts["bubble"], parts["pp"] = 0.0, 0.0
    if layout.pp > 1:
        parts["bubble"] = units[layout.schedule] / layout.vpp * (layout.pp - 1) * t_mb
        t = tokens(layout, seq_len) // (layout.tp if layout.sp else 1)
        parts["pp"] = 2 * (layout.pp - 1) * ring(links(hw, layout)["pp"], 2, 2 * t * cfg.dim * residual_bytes(layout))
    bw = hw.copy_gbs * 1e9
    state = rank_state(cfg, layout, 0, 0)
    unsharded = rank_unsharded_params(cfg, layout, 0)
    parts["optimizer"] = cal.optim_bytes * state.params / 4 / bw + (m - 1) * 10 * unsharded / bw \
        + cal.gap_fixed_ms * 1e-3
    total = sum(parts.values())
    tok = global_tokens / total / layout.world
    tflops = flops_per_token(cfg, seq_len) * tok / 1e12
    return StepTime(total=total, parts=parts, tokens_per_s_gpu=tok, tflops_gpu=tflops,
                    mfu=tflops / hw.peak_tflops["bf16"])
