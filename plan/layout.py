"""A 4D layout of herd, the exact bytes of parameters, gradients and optimizer state it leaves on each rank, and the
config overrides that run it.

State bytes follow herd's implementation (parallel/parallelize.py, tensor_parallel.py, data_parallel.py,
engine/optim.py):
- parameters are fp32 master weights whatever train.dtype is (bf16 is FSDP's compute copy and autocast, not
  storage); gradients are fp32 (FSDP2 reduce_dtype fp32; plain .grad has the parameter's dtype); AdamW holds
  exp_avg and exp_avg_sq in fp32 and a 0-d fp32 `step` per parameter tensor (fused on CUDA, foreach on CPU);
- tensor parallelism cuts wq/wk/wv/w1/w3 by rows, wo/w2 by columns, the embedding and head by vocabulary rows
  zero-padded to a multiple of tp (tensor_parallel.padded_vocab_size); KV projections with tp > n_kv_heads hold
  one head (head_dim rows) shared by tp / n_kv_heads ranks; norms are replicated. tp = 1 applies nothing;
- FSDP2 shards every tensor's dim 0 over dp_shard x cp (HSDP: replicated over dp_replicate) with torch.chunk:
  chunks of ceil(rows / W) rows, so shard i holds clamp(rows - i ceil(rows/W), 0, ceil(rows/W)) rows (the local
  tensor; FSDP2 pads its own flat storage to the full chunk). Without dp x cp > 1 nothing is sharded;
- pipeline stage s holds parallel.pipeline_parallel.split_layers' layers, the embedding on stage 0 and the final
  norm + head on the last stage, and sits on rank s mod pp (loop) or in a V (ZB-V, DualPipe-V); every stage is a
  copy of the model, so each holds its own RoPE cos/sin buffers (max_seq_len x head_dim/2 fp32, twice).
"""

from dataclasses import dataclass
from functools import lru_cache
from typing import Dict, List, Tuple

from engine.config import ModelConfig

LOOP_SCHEDULES = ("GPipe", "1F1B", "Interleaved1F1B", "InterleavedZeroBubble")
V_SCHEDULES = ("ZBVZeroBubble", "DualPipeV")


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    cp: int = 1
    pp: int = 1
    vpp: int = 1  # parallel.pp_virtual_stages
    schedule: str = "1F1B"
    dp_shard: int = 1
    dp_replicate: int = 1
    mbs: int = 1  # data.micro_batch_size (sequences)
    ac: str = "none"  # none | selective | full
    ac_every: int = 2
    sequence_parallel: bool = True
    fp8: bool = False
    dtype: str = "bf16"
    reshard_after_forward: bool = True
    document_mask: bool = True  # data.document_mask (herd's default): attention runs under a boolean mask

    @property
    def world(self) -> int:
        return self.tp * self.cp * self.pp * self.dp_shard * self.dp_replicate

    @property
    def dp(self) -> int:
        return self.dp_shard * self.dp_replicate

    @property
    def fsdp_shards(self) -> int:
        """Ranks a parameter is sharded over (dp_shard x cp); 1 means whole tensors on every rank."""
        return self.dp_shard * self.cp

    @property
    def fsdp(self) -> bool:
        """herd applies FSDP when more than one rank holds different tokens (dp x cp > 1)."""
        return self.dp * self.cp > 1

    @property
    def sp(self) -> bool:
        return self.sequence_parallel and self.tp > 1

    def describe(self) -> str:
        sched = f" {self.schedule}" + (f" v{self.vpp}" if self.vpp > 1 else "") if self.pp > 1 else ""
        ac = "" if self.ac == "none" else f" ac={self.ac}" + (f"/{self.ac_every}" if self.ac == "selective" else "")
        return (f"tp{self.tp} cp{self.cp} pp{self.pp}{sched} dp{self.dp_shard}"
                + (f"x{self.dp_replicate}r" if self.dp_replicate > 1 else "") + f" mbs{self.mbs}{ac}")


def padded_vocab(vocab: int, tp: int) -> int:
    return -(-vocab // tp) * tp  # as parallel/tensor_parallel.py padded_vocab_size


def kv_rows(cfg: ModelConfig, tp: int) -> int:
    """Local rows of wk / wv: kv/tp heads, or one head shared by tp/kv ranks."""
    hd = cfg.dim // cfg.n_heads
    return (cfg.n_kv_heads // tp if cfg.n_kv_heads % tp == 0 else 1) * hd


def block_tensors(cfg: ModelConfig, tp: int) -> List[Tuple[str, Tuple[int, ...]]]:
    """(name, tensor-parallel local shape) of one transformer block's parameters."""
    d, hd, f = cfg.dim, cfg.dim // cfg.n_heads, cfg.ffn_dim
    q = cfg.n_heads * hd // tp
    return [("attention_norm.weight", (d,)), ("attention.wq.weight", (q, d)),
            ("attention.wk.weight", (kv_rows(cfg, tp), d)), ("attention.wv.weight", (kv_rows(cfg, tp), d)),
            ("attention.wo.weight", (d, q)), ("ffn_norm.weight", (d,)), ("feed_forward.w1.weight", (f // tp, d)),
            ("feed_forward.w2.weight", (d, f // tp)), ("feed_forward.w3.weight", (f // tp, d))]


def stage_tensors(cfg: ModelConfig, tp: int, layers: List[int], first: bool,
                  last: bool) -> List[Tuple[str, Tuple[int, ...]]]:
    vocab = padded_vocab(cfg.vocab_size, tp) // tp if tp > 1 else cfg.vocab_size
    out = [("tok_embeddings.weight", (vocab, cfg.dim))] if first else []
    for i in layers:
        out += [(f"layers.{i}.{name}", shape) for name, shape in block_tensors(cfg, tp)]
    if last:
        out += [("norm.weight", (cfg.dim,)), ("output.weight", (vocab, cfg.dim))]
    return out


def shard_numel(shape: Tuple[int, ...], shards: int, index: int) -> int:
    """Elements of FSDP2 shard `index` of `shards` (torch.chunk along dim 0)."""
    rest = 1
    for n in shape[1:]:
        rest *= n
    if shards == 1:
        return shape[0] * rest
    chunk = -(-shape[0] // shards)
    return max(0, min(chunk, shape[0] - index * chunk)) * rest


def split_layers(n_layers: int, n_stages: int) -> List[List[int]]:
    """herd's default split (parallel/pipeline_parallel.py split_layers with the embedding and the head weighing
    one layer each), restated without torch so planning never imports it; tests compare the two."""
    total, bounds = n_layers + 2.0, [0]
    for stage in range(1, n_stages):
        ideal = int(stage * total / n_stages - 1.0 + 0.5)
        bounds.append(min(max(ideal, bounds[-1] + 1), n_layers - (n_stages - stage)))
    bounds.append(n_layers)
    return [list(range(a, b)) for a, b in zip(bounds, bounds[1:])]


def stage_ranks(n_stages: int, pp: int, schedule: str) -> List[int]:
    if schedule in V_SCHEDULES:
        return [s if s < pp else 2 * pp - 1 - s for s in range(n_stages)]
    return [s % pp for s in range(n_stages)]


@lru_cache(maxsize=4096)
def rank_stages(n_layers: int, pp: int, vpp: int, schedule: str) -> Tuple[Tuple[Tuple[Tuple[int, ...], bool, bool],
                                                                                ...], ...]:
    """Per pp rank (index): its stages as (layers, first, last)."""
    n_stages = pp * vpp
    layers = split_layers(n_layers, n_stages) if pp > 1 else [list(range(n_layers))]
    ranks = stage_ranks(n_stages, pp, schedule) if pp > 1 else [0]
    return tuple(tuple((tuple(layers[s]), s == 0, s == n_stages - 1) for s in range(n_stages) if ranks[s] == r)
                 for r in range(pp))


@dataclass(frozen=True)
class StateBytes:
    params: int
    grads: int
    optimizer: int  # exp_avg + exp_avg_sq + one 0-d step per tensor
    buffers: int  # RoPE tables
    tensors: int

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.buffers


def rank_state(cfg: ModelConfig, layout: Layout, pp_rank: int = 0, shard_index: int = 0) -> StateBytes:
    """Exact persistent bytes on one rank after an optimizer step (every tensor's local shard). Blocks share one
    shape, so a stage costs n_layers x one block plus its embedding / head (stage_tensors lists the same tensors
    one by one; tests/unit/test_plan_memory.py checks both against torch)."""
    shards = layout.fsdp_shards if layout.fsdp else 1
    numel, tensors = _rank_numel(_model_key(cfg), layout.tp, layout.pp, layout.vpp, layout.schedule, shards,
                                 shard_index, pp_rank)
    stages = len(rank_stages(cfg.n_layers, layout.pp, layout.vpp, layout.schedule)[pp_rank])
    hd = cfg.dim // cfg.n_heads
    return StateBytes(params=4 * numel, grads=4 * numel, optimizer=8 * numel + 4 * tensors,
                      buffers=stages * 2 * cfg.max_seq_len * (hd // 2) * 4, tensors=tensors)


def _model_key(cfg: ModelConfig) -> tuple:
    return (cfg.dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.ffn_dim, cfg.vocab_size)


@lru_cache(maxsize=65536)
def _rank_numel(key: tuple, tp: int, pp: int, vpp: int, schedule: str, shards: int, index: int,
                pp_rank: int) -> Tuple[int, int]:
    dim, n_layers, n_heads, n_kv_heads, ffn_dim, vocab_size = key
    cfg = ModelConfig(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads, ffn_dim=ffn_dim,
                      vocab_size=vocab_size)
    block = sum(shard_numel(shape, shards, index) for _, shape in block_tensors(cfg, tp))
    ends = {name: shard_numel(shape, shards, index) for name, shape in stage_tensors(cfg, tp, [], True, True)}
    numel = tensors = 0
    for layers, first, last in rank_stages(n_layers, pp, vpp, schedule)[pp_rank]:
        numel += len(layers) * block + (ends["tok_embeddings.weight"] if first else 0) \
            + (ends["norm.weight"] + ends["output.weight"] if last else 0)
        tensors += 9 * len(layers) + int(first) + 2 * int(last)
    return numel, tensors


def rank_unsharded_params(cfg: ModelConfig, layout: Layout, pp_rank: int) -> int:
    """Parameters of this pp rank after tensor parallelism, before FSDP (what FSDP gathers)."""
    return _rank_numel(_model_key(cfg), layout.tp, layout.pp, layout.vpp, layout.schedule, 1, 0, pp_rank)[0]


def overrides(layout: Layout, seq_len: int, global_batch: int, gpus_per_node: int) -> Dict[str, object]:
    """The config keys (engine/config_schema.py) that run this layout; herd train / launch accept them as is."""
    nodes = max(1, layout.world // gpus_per_node)
    return {"parallel.tp": layout.tp, "parallel.cp": layout.cp, "parallel.pp": layout.pp,
            "parallel.dp_shard": layout.dp_shard, "parallel.dp_replicate": layout.dp_replicate,
            "parallel.pp_schedule": layout.schedule, "parallel.pp_virtual_stages": layout.vpp,
            "parallel.sequence_parallel": layout.sequence_parallel,
            "parallel.activation_checkpointing": layout.ac, "parallel.ac_every": layout.ac_every,
            "parallel.reshard_after_forward": layout.reshard_after_forward, "parallel.cp_attention": "all_gather",
            "data.seq_len": seq_len, "data.document_mask": layout.document_mask, "data.micro_batch_size": layout.mbs,
            "data.global_batch_size": global_batch,
            "train.dtype": layout.dtype, "fp8.backend": "native" if layout.fp8 else "none",
            "slurm.nodes": nodes, "slurm.gpus_per_node": min(gpus_per_node, layout.world)}
