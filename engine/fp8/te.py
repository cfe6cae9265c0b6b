"""The `te` FP8 backend: herd's transformer block rebuilt from NVIDIA TransformerEngine (TE) modules.

UNVERIFIED ON HARDWARE. TransformerEngine is not installed on the development machine nor on the GPU machine
herd is tested on, so no line of this file has run against the real library. What is tested (on CPU, without TE,
tests/unit/test_fp8_te.py) is everything that does not need TE: the recipe choice, the checkpoint key and shape
mapping (tp = 1 and tensor-parallel shards), the sharding and init rules, the error when TE is missing, and the
block's wiring against a plain-torch stand-in written from TE's documented semantics. The stand-in proves the
adapter matches our understanding of TE, not TE itself: run the block against TransformerBlock on a GPU with TE
before trusting it. This is the only file in herd that imports transformer_engine, and only inside functions.

The block (TEBlock) replaces TransformerBlock (engine/model/llama.py) one for one:
    attn_qkv  te.LayerNormLinear  attention_norm + [wq; wk; wv] (RMSNorm, column parallel)
    RoPE      engine.ops.apply_rope with our cos/sin, on q and k between the projection and attention
    attn_core te.DotProductAttention  GQA, causal or our document mask, on this rank's heads
    attn_out  te.Linear  wo (row parallel)
    mlp       te.LayerNormMLP  ffn_norm + fc1 = [w1; w3] + swiglu + fc2 = w2 (fc1 column, fc2 row parallel)
so h = x + attn_out(attention(rope(attn_qkv(x)))); out = h + mlp(h), as in TransformerBlock (up to rounding:
TE's fused RMSNorm scales by the weight before its cast, herd after).

TE API facts relied on (read in NVIDIA/TransformerEngine, transformer_engine/...; docs at
https://nvidia.github.io/TransformerEngine/api/pytorch.html):
- common/recipe/__init__.py: Format.E4M3 (all e4m3), Format.HYBRID (e4m3 forward, e5m2 backward; E5M2-only is
  rejected); DelayedScaling(fp8_format, amax_history_len, amax_compute_algo "max"|"most_recent", reduce_amax);
  Float8CurrentScaling(fp8_format) is per-tensor current scaling.
- pytorch/module/layernorm_linear.py: LayerNormLinear(in_features, out_features, eps, sequence_parallel,
  tp_group, bias, normalization "RMSNorm", params_dtype, parallel_mode None|"column"|"row", device); parameters
  `layer_norm_weight` and `weight` (no bias parameter with bias=False); column mode divides out_features by
  tp_size; sequence parallelism is on only when tp_size > 1 and it tags layer_norm_weight with
  `.sequence_parallel` for the caller to all-reduce its gradient (TE does not).
- pytorch/module/linear.py: Linear(in_features, out_features, ...same parallel args); parameter `weight`; row mode
  divides in_features by tp_size and all-reduces (SP: reduce-scatters) the output.
- pytorch/module/layernorm_mlp.py: LayerNormMLP(hidden_size, ffn_hidden_size, eps, sequence_parallel, tp_group,
  bias, normalization, activation "swiglu", params_dtype, set_parallel_mode, device); parameters
  `layer_norm_weight`, `fc1_weight` [2 * ffn/tp, hidden] for gated activations, `fc2_weight` [hidden, ffn/tp].
- swiglu takes the FIRST half of fc1's output as the gate: tests/pytorch/test_numerics.py checks LayerNormMLP
  against TorchGLU, which computes act(x[..., :n/2]) * x[..., n/2:] with act = SiLU for "swiglu", fc1 copied
  verbatim. So fc1 = cat(w1 gate, w3 up) per rank.
- pytorch/attention/dot_product_attention/dot_product_attention.py: DotProductAttention(num_attention_heads,
  kv_channels, num_gqa_groups, qkv_format "bshd"|"sbhd"|"thd", attn_mask_type, tp_group, ...); it divides both
  head counts by tp_size (so TP with replicated KV heads needs the local counts and no tp_group, as here);
  forward(query, key, value, attention_mask, attn_mask_type=...); "causal" needs no mask; for "arbitrary" the
  boolean mask broadcasts to [b, h, sq, skv] and True means MASKED OUT (herd's mask: True = may attend, so it is
  inverted); softmax scale defaults to 1/sqrt(kv_channels). GQA groups consecutive query heads
  (UnfusedDotProductAttention repeat_interleaves K/V, backends.py), as torch SDPA's enable_gqa does.
- quantization.py: fp8_autocast(enabled, calibrating, fp8_recipe, fp8_group) (deprecated in the newest TE for
  autocast(enabled, calibrating, recipe, amax_reduction_group)); delayed-scaling amaxes are reduced over the group
  when the outermost region exits; regions nest (the module docstring of dot_product_attention.py nests them).

Precision of the first and last blocks (fp8.bf16_first_last_layers): the training step enters ONE
fp8_autocast_context around the model's forward (one amax reduction per step, at its exit); a TEBlock built with
fp8_enabled=False enters a nested fp8 autocast(enabled=False) inside its own forward, so its GEMMs run in the
ambient (bf16 autocast) precision. As in engine/fp8/native.py they stay bf16 only when the model has more than 2
blocks; here "first/last" are the model's layer ids 0 and n_layers - 1 (not a pipeline stage's ends).

Sequence parallelism: TE's collectives gather/scatter dim 0 of the flattened [tokens, features] input, while
herd's residual stream is [b, s/tp, dim] (split along s, parallel/comm.py). With SP a TEBlock therefore runs its
TE linear layers sequence-first ([s/tp, b, dim] in, [s, b, ...] gathered) and transposes at its ends; RoPE and
attention always see [b, s, heads, d].

Integration needs (engine/parallel side, not done here): convert after apply_tensor_parallel (this reads each
block's already-sharded weights; apply_tensor_parallel cannot walk a TEBlock) and before the optimizer is built;
the TP plan's gradient fixes keyed by herd names do not reach TE names, so sum over tp the grads named by
TEBlock.partial_grad_names (SP norm weights) and, when kv_replicas > 1, the rows kv_rows of attn_qkv.weight over
the ranks sharing a KV head; context parallelism is refused; a model converted on the meta device is initialized
by init_te_blocks after init_weights (which would otherwise init TE names, e.g. norm weights, wrongly).
Unverified TE behaviour this relies on: the "arbitrary" mask path (document masks) may fall back to TE's unfused
attention, which is slow; converting doc_ids to cu_seqlens ("thd", "padding_causal") would be the fast path.
FP8 GEMMs need the token count and feature sizes divisible by 16. TE's `_extra_state` (FP8 scales, amax
history) is not part of herd's checkpoint: a resumed delayed-scaling run starts with fresh windows.
"""

import contextlib
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from engine import ops
from engine.config import FP8Config, ModelConfig
from engine.errors import ConfigError
from engine.model.init import parameter_init
from engine.model.llama import causal_attention

# herd's block-relative parameter names -> TEBlock's (TE module attribute . TE parameter name)
NORM_QKV, QKV, WO = "attn_qkv.layer_norm_weight", "attn_qkv.weight", "attn_out.weight"
NORM_MLP, FC1, FC2 = "mlp.layer_norm_weight", "mlp.fc1_weight", "mlp.fc2_weight"
TE_KEYS = (NORM_QKV, QKV, WO, NORM_MLP, FC1, FC2)
HERD_KEYS = ("attention_norm.weight", "attention.wq.weight", "attention.wk.weight", "attention.wv.weight",
             "attention.wo.weight", "ffn_norm.weight", "feed_forward.w1.weight", "feed_forward.w2.weight",
             "feed_forward.w3.weight")
_FORMATS = {"e5m2": "HYBRID", "e4m3": "E4M3"}  # grad_dtype -> TE Format member (forward is e4m3 in both)
_RECIPE_CACHE: Dict[tuple, object] = {}


# ---------------------------------------------------------------------------------------------- import

def available() -> bool:
    """True when transformer_engine.pytorch imports (never raises)."""
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # ImportError, or OSError/RuntimeError from a broken CUDA build of TE
        return False
    return True


def require_te():
    """transformer_engine.pytorch, or a one-line ConfigError saying how to get it."""
    try:
        import transformer_engine.pytorch as te
    except Exception as e:  # noqa: BLE001  (any failure to import is the same user-facing problem)
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        error = ConfigError("", "fp8.backend=te needs transformer_engine (pip install transformer-engine[pytorch]); "
                                f"it is not importable: {reason}")
        error.key = "fp8.backend"
        raise error from None
    return te


# ---------------------------------------------------------------------------------------------- recipe

def recipe_spec(cfg: FP8Config) -> dict:
    """The TE recipe for our config as data: {"class": name in transformer_engine.common.recipe, "kwargs": {...}};
    "fp8_format" names a recipe.Format member. delayed -> DelayedScaling (amax window, max over it);
    tensorwise -> Float8CurrentScaling. grad_dtype e5m2 -> HYBRID (e4m3 forward, e5m2 gradients), e4m3 -> E4M3."""
    if cfg.grad_dtype not in _FORMATS:
        raise ConfigError("fp8.grad_dtype", f"{cfg.grad_dtype!r}: expected one of {', '.join(_FORMATS)}")
    fmt = _FORMATS[cfg.grad_dtype]
    if cfg.recipe == "delayed":
        return {"class": "DelayedScaling", "kwargs": {"fp8_format": fmt, "amax_history_len": cfg.amax_history_len,
                                                      "amax_compute_algo": "max"}}
    if cfg.recipe == "tensorwise":
        return {"class": "Float8CurrentScaling", "kwargs": {"fp8_format": fmt}}
    raise ConfigError("fp8.recipe", f"{cfg.recipe!r}: expected tensorwise or delayed")


def te_recipe(cfg: FP8Config):
    """The TE recipe object for `cfg` (one object per distinct spec, reused across steps)."""
    spec = recipe_spec(cfg)
    key = (spec["class"], *sorted(spec["kwargs"].items()))
    if key not in _RECIPE_CACHE:
        require_te()
        from transformer_engine.common import recipe
        kwargs = dict(spec["kwargs"], fp8_format=getattr(recipe.Format, spec["kwargs"]["fp8_format"]))
        _RECIPE_CACHE[key] = getattr(recipe, spec["class"])(**kwargs)
    return _RECIPE_CACHE[key]


def _autocast(te, enabled: bool, recipe=None, group=None):
    """te.fp8_autocast (stable in TE 1.x-2.x), or its successor te.autocast where only that exists."""
    if hasattr(te, "fp8_autocast"):
        return te.fp8_autocast(enabled=enabled, fp8_recipe=recipe, fp8_group=group)
    return te.autocast(enabled=enabled, recipe=recipe, amax_reduction_group=group)


def fp8_autocast_context(fp8_cfg: FP8Config, amax_group: Optional[dist.ProcessGroup] = None):
    """The FP8 region to enter around the model's forward each step (backward needs none); amaxes are reduced
    over `amax_group` when it exits (TE: fp8_group)."""
    return _autocast(require_te(), True, te_recipe(fp8_cfg), amax_group)


# ---------------------------------------------------------------------------------------------- shapes

def local_sizes(cfg: ModelConfig, tp: int) -> Tuple[int, int, int]:
    """(query heads, KV heads, ffn width) one tensor-parallel rank holds, by parallel/tensor_parallel.py's rules:
    heads and ffn split over tp; KV heads split too, or replicated (one per rank) when tp > n_kv_heads."""
    bad = cfg.n_heads % tp or cfg.ffn_dim % tp or (cfg.n_kv_heads % tp if tp <= cfg.n_kv_heads
                                                     else tp % cfg.n_kv_heads)
    if bad:
        raise ValueError(f"tp={tp} does not divide n_heads={cfg.n_heads}, n_kv_heads={cfg.n_kv_heads} "
                         f"(or is not a multiple of it) and ffn_dim={cfg.ffn_dim}")
    return cfg.n_heads // tp, max(1, cfg.n_kv_heads // tp), cfg.ffn_dim // tp


def full_block_shapes(cfg: ModelConfig) -> Dict[str, Tuple[int, ...]]:
    """herd block-relative parameter name -> its whole (unsharded) shape."""
    q, kv = cfg.n_heads * (cfg.dim // cfg.n_heads), cfg.n_kv_heads * (cfg.dim // cfg.n_heads)
    return {"attention_norm.weight": (cfg.dim,), "attention.wq.weight": (q, cfg.dim),
            "attention.wk.weight": (kv, cfg.dim), "attention.wv.weight": (kv, cfg.dim),
            "attention.wo.weight": (cfg.dim, q), "ffn_norm.weight": (cfg.dim,),
            "feed_forward.w1.weight": (cfg.ffn_dim, cfg.dim), "feed_forward.w2.weight": (cfg.dim, cfg.ffn_dim),
            "feed_forward.w3.weight": (cfg.ffn_dim, cfg.dim)}


def shard_block_state(full: Dict[str, torch.Tensor], cfg: ModelConfig, tp: int, rank: int) -> Dict[str, torch.Tensor]:
    """Rank `rank`'s part of one block's whole tensors, as parallel/tensor_parallel.tp_local cuts them: column
    projections (wq wk wv w1 w3) by rows, row projections (wo w2) by columns, norms whole; with tp > n_kv_heads,
    `replicas` consecutive ranks share the rows of one KV head."""
    replicas = max(1, tp // cfg.n_kv_heads)
    out = {}
    for key, value in full.items():
        if key.endswith("norm.weight"):
            out[key] = value
        elif key.endswith(("wo.weight", "w2.weight")):
            out[key] = value.chunk(tp, dim=1)[rank]
        elif key.endswith(("wk.weight", "wv.weight")) and replicas > 1:
            out[key] = value.chunk(tp // replicas, dim=0)[rank // replicas]
        else:
            out[key] = value.chunk(tp, dim=0)[rank]
    return out


# ---------------------------------------------------------------------------------------------- key mapping

def _head_dim(cfg: ModelConfig) -> int:
    return cfg.dim // cfg.n_heads


def _check_keys(got, expected, what: str) -> None:
    if set(got) != set(expected):
        raise KeyError(f"{what}: missing {sorted(set(expected) - set(got))}, unexpected "
                       f"{sorted(set(got) - set(expected))}")


@torch.no_grad()
def herd_to_te_block_state(block_state: Dict[str, torch.Tensor], cfg: ModelConfig) -> Dict[str, torch.Tensor]:
    """One block's herd tensors (names relative to the block; whole, or one TP rank's shard) -> TEBlock's.

    Fused qkv = cat(wq, wk, wv) along rows: the rows of attn_qkv's output are this rank's q heads, then its k
    heads, then its v heads, which is how TEBlock.forward splits it. fc1 = cat(w1, w3): TE's swiglu gates with
    the first half (silu(x w1) * x w3, see the module docstring)."""
    _check_keys(block_state, HERD_KEYS, "herd block state")
    d, s = _head_dim(cfg), block_state
    wq, wk, wv = s["attention.wq.weight"], s["attention.wk.weight"], s["attention.wv.weight"]
    w1, w3, w2 = s["feed_forward.w1.weight"], s["feed_forward.w3.weight"], s["feed_forward.w2.weight"]
    if wq.shape[1] != cfg.dim or wq.shape[0] % d or wk.shape != wv.shape or wk.shape[0] % d or w1.shape != w3.shape:
        raise ValueError(f"block shapes wq {tuple(wq.shape)}, wk {tuple(wk.shape)}, wv {tuple(wv.shape)}, "
                         f"w1 {tuple(w1.shape)}, w3 {tuple(w3.shape)} do not fit dim={cfg.dim}, head_dim={d}")
    return {NORM_QKV: s["attention_norm.weight"], QKV: torch.cat([wq, wk, wv], dim=0),
            WO: s["attention.wo.weight"], NORM_MLP: s["ffn_norm.weight"],
            FC1: torch.cat([w1, w3], dim=0), FC2: w2}


@torch.no_grad()
def te_to_herd_block_state(te_state: Dict[str, torch.Tensor], cfg: ModelConfig) -> Dict[str, torch.Tensor]:
    """Inverse of herd_to_te_block_state (exact). TE's `_extra_state` entries (FP8 scaling state) are dropped.
    Local head counts come from the shapes (wo's columns are this rank's q heads), so shards need no tp."""
    te_state = {k: v for k, v in te_state.items() if not k.endswith("_extra_state")}
    _check_keys(te_state, TE_KEYS, "TE block state")
    d, qkv, fc1, wo = _head_dim(cfg), te_state[QKV], te_state[FC1], te_state[WO]
    q_rows = wo.shape[1]
    kv_rows = (qkv.shape[0] - q_rows) // 2
    if q_rows % d or kv_rows <= 0 or kv_rows % d or q_rows + 2 * kv_rows != qkv.shape[0] or fc1.shape[0] % 2:
        raise ValueError(f"TE shapes qkv {tuple(qkv.shape)}, wo {tuple(wo.shape)}, fc1 {tuple(fc1.shape)} "
                         f"are not a fused [q; k; v] / [gate; up] of head_dim={d}")
    wq, wk, wv = (t.clone() for t in qkv.split([q_rows, kv_rows, kv_rows], dim=0))  # own storage: saved alone
    w1, w3 = (t.clone() for t in fc1.chunk(2, dim=0))
    return {"attention_norm.weight": te_state[NORM_QKV], "attention.wq.weight": wq, "attention.wk.weight": wk,
            "attention.wv.weight": wv, "attention.wo.weight": wo, "ffn_norm.weight": te_state[NORM_MLP],
            "feed_forward.w1.weight": w1, "feed_forward.w3.weight": w3, "feed_forward.w2.weight": te_state[FC2]}


# ---------------------------------------------------------------------------------------------- the block

class TEBlock(nn.Module):
    """TransformerBlock from TE modules (see the module docstring); forward(x, cos, sin, mask) like it.

    With tp > 1 every TE module gets `tp_group` and holds this rank's shard; attn_core gets the local head
    counts and no group. fp8_enabled=False keeps the block out of the step's FP8 region (bf16 first/last).
    """

    def __init__(self, cfg: ModelConfig, layer_id: int, tp_group: Optional[dist.ProcessGroup] = None,
                 sequence_parallel: bool = False, fp8_enabled: bool = True, device=None,
                 params_dtype: Optional[torch.dtype] = None):
        super().__init__()
        te = require_te()
        self._te, self.cfg, self.layer_id, self.fp8_enabled = te, cfg, layer_id, fp8_enabled
        self.tp = dist.get_world_size(tp_group) if tp_group is not None else 1
        self.tp_rank = dist.get_rank(tp_group) if tp_group is not None else 0
        self.seq_first = sequence_parallel and self.tp > 1  # TE turns SP on only for tp > 1
        heads, kv_heads, ffn = local_sizes(cfg, self.tp)
        d = self.head_dim = _head_dim(cfg)
        self.qkv_split = [heads * d, kv_heads * d, kv_heads * d]  # rows of attn_qkv's output on this rank
        # engine-side gradient fixes (module docstring): SP norm weights saw s/tp tokens each; replicated KV rows
        self.partial_grad_names = [NORM_QKV, NORM_MLP] if self.seq_first else []
        self.kv_replicas = max(1, self.tp // cfg.n_kv_heads)
        self.kv_rows = (heads * d, (heads + 2 * kv_heads) * d)
        group = tp_group if self.tp > 1 else None
        common = dict(eps=cfg.norm_eps, sequence_parallel=self.seq_first, tp_group=group, bias=False,
                      params_dtype=params_dtype, device=device)
        # TE divides the out (column) / in (row) features by tp: pass tp * this rank's width
        self.attn_qkv = te.LayerNormLinear(cfg.dim, self.tp * sum(self.qkv_split), normalization="RMSNorm",
                                           parallel_mode="column", **common)
        self.attn_core = te.DotProductAttention(heads, d, num_gqa_groups=kv_heads, qkv_format="bshd",
                                                attn_mask_type="causal", attention_dropout=0.0)
        linear_args = {k: v for k, v in common.items() if k != "eps"}
        self.attn_out = te.Linear(self.tp * heads * d, cfg.dim, parallel_mode="row", **linear_args)
        self.mlp = te.LayerNormMLP(cfg.dim, self.tp * ffn, normalization="RMSNorm", activation="swiglu",
                                   set_parallel_mode=True, **common)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask) -> torch.Tensor:
        """x: [b, s, dim] ([b, s/tp, dim] with SP); cos, sin: [b, s, 1, d/2]; mask: None (causal) or a
        DocumentMask (engine/model/attention.py) -> same shape as x."""
        region = contextlib.nullcontext() if self.fp8_enabled else _autocast(self._te, False)
        with region:
            if self.seq_first:  # TE's SP collectives work on dim 0: run the TE layers sequence-first
                x = x.transpose(0, 1).contiguous()  # [s/tp, b, dim]
            h = x + self._attention(x, cos, sin, mask)
            out = h + self.mlp(h)
            return out.transpose(0, 1).contiguous() if self.seq_first else out

    def _attention(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask) -> torch.Tensor:
        qkv = self.attn_qkv(x)  # [b, s, W] ([s, b, W] gathered with SP), W = (h + 2 kv) * d on this rank
        if self.seq_first:
            qkv = qkv.transpose(0, 1)  # [b, s, W] view
        b, s = qkv.shape[:2]
        q, k, v = qkv.split(self.qkv_split, dim=-1)
        q = ops.apply_rope(q.reshape(b, s, -1, self.head_dim), cos, sin)  # [b, s, h, d]
        k = ops.apply_rope(k.reshape(b, s, -1, self.head_dim), cos, sin)  # [b, s, kv, d]
        v = v.reshape(b, s, -1, self.head_dim).contiguous()  # [b, s, kv, d]
        if mask is None:
            out = self.attn_core(q, k, v, attn_mask_type="causal")
        else:  # TE's boolean mask marks what is masked OUT; herd's marks what may be attended. A DocumentMask
            # becomes the dense [b, 1, s, s] reference here: the te backend keeps O(s^2) document masks
            out = self.attn_core(q, k, v, attention_mask=torch.logical_not(mask.dense()), attn_mask_type="arbitrary")
        out = out.reshape(b, s, -1)  # [b, s, h*d]
        if self.seq_first:
            out = out.transpose(0, 1).contiguous()  # [s, b, h*d]: the row-parallel layer reduce-scatters dim 0
        return self.attn_out(out)

    @torch.no_grad()
    def load_herd_state(self, block_state: Dict[str, torch.Tensor]) -> None:
        """Copy one herd block's tensors (this rank's shard) into the TE parameters."""
        te_state = herd_to_te_block_state(block_state, self.cfg)
        params = dict(self.named_parameters())
        _check_keys(params, TE_KEYS, f"TEBlock {self.layer_id} parameters")
        for key, value in te_state.items():
            if params[key].shape != value.shape:
                raise ValueError(f"layer {self.layer_id} {key}: TE shape {tuple(params[key].shape)}, "
                                 f"herd gives {tuple(value.shape)} (tp={self.tp})")
            params[key].copy_(value)

    def herd_state(self) -> Dict[str, torch.Tensor]:
        """This block's parameters under herd's names (this rank's shard)."""
        return te_to_herd_block_state({k: p.detach() for k, p in self.named_parameters()}, self.cfg)


# ---------------------------------------------------------------------------------------------- the model

def convert_model_to_te(model: nn.Module, fp8_cfg: FP8Config, tp_group: Optional[dist.ProcessGroup] = None,
                        sequence_parallel: bool = False) -> List[str]:
    """Replace every transformer block of `model` (a Transformer or a pipeline stage of it) by a TEBlock holding
    the same weights (this rank's shards when tp_group is given: call after apply_tensor_parallel); on the meta
    device nothing is copied (use init_te_blocks). The blocks with layer id 0 and n_layers - 1 get
    fp8_enabled=False when fp8.bf16_first_last_layers and n_layers > 2. Returns the replaced names."""
    require_te()
    cfg = model.cfg
    keep = {0, cfg.n_layers - 1} if fp8_cfg.bf16_first_last_layers and cfg.n_layers > 2 else set()
    converted = []
    for name, block in list(model.layers.items()):
        if isinstance(block, TEBlock):
            continue
        if block.attention.core is not causal_attention:
            raise ConfigError("parallel.cp", "fp8.backend=te does not support context parallelism (its blocks "
                                             "attend with TransformerEngine, not herd's context-parallel core)")
        weight = block.attention.wq.weight
        new = TEBlock(cfg, block.layer_id, tp_group, sequence_parallel, fp8_enabled=block.layer_id not in keep,
                      device=weight.device, params_dtype=weight.dtype)
        new.load_herd_state({k: v.detach() for k, v in block.state_dict().items()})
        new.train(block.training)
        model.layers[name] = new
        converted.append(f"layers.{name}")
    return converted


@torch.no_grad()
def init_te_blocks(model: nn.Module, seed: int) -> int:
    """Give every TEBlock of `model` exactly the initial values herd's init_weights gives the TransformerBlock it
    replaces (parameter_init under herd's names, whole shape, then this rank's shard). Call after init_weights
    on a model converted on the meta device. Returns the number of blocks initialized."""
    count = 0
    for name, block in model.layers.items():
        if not isinstance(block, TEBlock):
            continue
        full = {key: parameter_init(f"layers.{name}.{key}", torch.Size(shape), block.cfg, seed)
                for key, shape in full_block_shapes(block.cfg).items()}
        local = shard_block_state(full, block.cfg, block.tp, block.tp_rank)
        block.load_herd_state({k: v.to(block.attn_qkv.weight.device) for k, v in local.items()})
        count += 1
    return count
