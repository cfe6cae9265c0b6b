"""engine/fp8/te.py without TransformerEngine: recipe choice, checkpoint key mapping (whole and TP shards), the
missing-TE error, import hygiene, and the block's wiring against a plain-torch stand-in for TE.

The stand-in (`fake_te`) implements only what engine/fp8/te.py's docstring cites from TE's sources: parameter
names and shapes, RMSNorm, swiglu gating with the FIRST half of fc1 (TE's tests/pytorch/test_numerics.py
TorchGLU), GQA by repeat_interleave of K/V, and the boolean mask meaning True = masked out. A pass here shows the
adapter agrees with that reading of TE; it says nothing about TE's kernels, which were never run.
"""

import ast
import contextlib
import enum
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import engine.fp8.te as te_adapter
from engine.config import FP8Config, ModelConfig
from engine.errors import ConfigError
from engine.model import build_meta_model, build_model, init_weights
from engine.model.llama import TransformerBlock

ROOT = Path(__file__).resolve().parents[2]
DEBUG = ModelConfig()  # the debug preset: dim 256, 4 layers, 8 query / 4 KV heads, ffn 768
SMALL = ModelConfig(dim=64, n_layers=4, n_heads=8, n_kv_heads=4, ffn_dim=160, vocab_size=300, max_seq_len=64)
MISSING = "fp8.backend=te needs transformer_engine (pip install transformer-engine[pytorch]); it is not importable: "


# ---------------------------------------------------------------------------------------------- the stand-in

def _rms(x, weight, eps):
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)


def _param(*shape, device, dtype, fill=None):
    t = torch.empty(*shape, device=device, dtype=dtype)
    if t.device.type != "meta":  # TE defers init on meta too
        if fill is None:
            t.normal_(0.0, 0.023)  # TE's default init_method
        else:
            t.fill_(fill)
    return nn.Parameter(t)


class FakeLayerNormLinear(nn.Module):
    def __init__(self, in_features, out_features, eps=1e-5, sequence_parallel=False, tp_group=None, bias=True,
                 normalization="LayerNorm", params_dtype=None, parallel_mode=None, device="cuda"):
        super().__init__()
        assert normalization == "RMSNorm" and not bias and parallel_mode == "column" and tp_group is None
        self.eps = eps
        self.layer_norm_weight = _param(in_features, device=device, dtype=params_dtype, fill=1.0)
        self.weight = _param(out_features, in_features, device=device, dtype=params_dtype)

    def forward(self, x):
        return F.linear(_rms(x, self.layer_norm_weight, self.eps), self.weight)


class FakeLinear(nn.Module):
    def __init__(self, in_features, out_features, sequence_parallel=False, tp_group=None, bias=True,
                 params_dtype=None, parallel_mode=None, device="cuda"):
        super().__init__()
        assert not bias and parallel_mode == "row" and tp_group is None
        self.weight = _param(out_features, in_features, device=device, dtype=params_dtype)

    def forward(self, x):
        return F.linear(x, self.weight)


class FakeLayerNormMLP(nn.Module):
    def __init__(self, hidden_size, ffn_hidden_size, eps=1e-5, sequence_parallel=False, tp_group=None, bias=True,
                 normalization="LayerNorm", activation="gelu", params_dtype=None, set_parallel_mode=False,
                 device="cuda"):
        super().__init__()
        assert normalization == "RMSNorm" and activation == "swiglu" and not bias and set_parallel_mode
        self.eps = eps
        self.layer_norm_weight = _param(hidden_size, device=device, dtype=params_dtype, fill=1.0)
        self.fc1_weight = _param(2 * ffn_hidden_size, hidden_size, device=device, dtype=params_dtype)
        self.fc2_weight = _param(hidden_size, ffn_hidden_size, device=device, dtype=params_dtype)

    def forward(self, x):
        y = F.linear(_rms(x, self.layer_norm_weight, self.eps), self.fc1_weight)
        n = y.shape[-1]
        return F.linear(F.silu(y[..., : n // 2]) * y[..., n // 2:], self.fc2_weight)  # TorchGLU: act(first half)


class FakeDotProductAttention(nn.Module):
    def __init__(self, num_attention_heads, kv_channels, num_gqa_groups=None, qkv_format="sbhd",
                 attn_mask_type="causal", attention_dropout=0.0, tp_group=None):
        super().__init__()
        self.heads, self.groups, self.qkv_format = num_attention_heads, num_gqa_groups, qkv_format
        assert tp_group is None

    def forward(self, q, k, v, attention_mask=None, attn_mask_type=None):
        assert self.qkv_format == "bshd" and q.shape[2] == self.heads and k.shape[2] == self.groups
        b, s = q.shape[:2]
        k, v = (t.repeat_interleave(self.heads // self.groups, dim=2) for t in (k, v))  # consecutive groups
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [b, h, s, d]
        if attn_mask_type == "causal":
            assert attention_mask is None
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            assert attn_mask_type == "arbitrary" and attention_mask.dtype == torch.bool
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=~attention_mask)  # TE: True = masked out
        return out.transpose(1, 2).reshape(b, s, -1)


class Format(enum.Enum):
    E4M3 = "e4m3"
    E5M2 = "e5m2"
    HYBRID = "hybrid"


class _Recipe:
    def __init__(self, **kwargs):
        self.kwargs = kwargs


@pytest.fixture
def fake_te(monkeypatch):
    log = []

    @contextlib.contextmanager
    def fp8_autocast(enabled=True, calibrating=False, fp8_recipe=None, fp8_group=None):
        log.append(("fp8_autocast", enabled, fp8_recipe, fp8_group))
        yield

    pkg, pt = types.ModuleType("transformer_engine"), types.ModuleType("transformer_engine.pytorch")
    common, recipe = types.ModuleType("transformer_engine.common"), types.ModuleType("transformer_engine.common.recipe")
    pt.LayerNormLinear, pt.Linear, pt.LayerNormMLP = FakeLayerNormLinear, FakeLinear, FakeLayerNormMLP
    pt.DotProductAttention, pt.fp8_autocast = FakeDotProductAttention, fp8_autocast
    recipe.Format = Format
    recipe.DelayedScaling = type("DelayedScaling", (_Recipe,), {})
    recipe.Float8CurrentScaling = type("Float8CurrentScaling", (_Recipe,), {})
    pkg.pytorch, pkg.common, common.recipe = pt, common, recipe
    for name, module in (("transformer_engine", pkg), ("transformer_engine.pytorch", pt),
                         ("transformer_engine.common", common), ("transformer_engine.common.recipe", recipe)):
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(te_adapter, "_RECIPE_CACHE", {})
    return types.SimpleNamespace(module=pt, log=log)


@pytest.fixture
def no_te(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformer_engine", None)  # `import transformer_engine...` now fails
    monkeypatch.setitem(sys.modules, "transformer_engine.pytorch", None)
    monkeypatch.setattr(te_adapter, "_RECIPE_CACHE", {})


# ---------------------------------------------------------------------------------------------- recipes

@pytest.mark.parametrize("recipe, grad, cls, fmt", [
    ("delayed", "e5m2", "DelayedScaling", "HYBRID"), ("delayed", "e4m3", "DelayedScaling", "E4M3"),
    ("tensorwise", "e5m2", "Float8CurrentScaling", "HYBRID"), ("tensorwise", "e4m3", "Float8CurrentScaling", "E4M3")])
def test_recipe_spec(recipe, grad, cls, fmt):
    spec = te_adapter.recipe_spec(FP8Config(backend="te", recipe=recipe, grad_dtype=grad, amax_history_len=7))
    expected = {"fp8_format": fmt}
    if recipe == "delayed":
        expected.update(amax_history_len=7, amax_compute_algo="max")
    assert spec == {"class": cls, "kwargs": expected}


def test_recipe_spec_rejects_unknown_values():
    with pytest.raises(ConfigError, match="fp8.recipe"):
        te_adapter.recipe_spec(FP8Config(recipe="rowwise"))
    with pytest.raises(ConfigError, match="fp8.grad_dtype"):
        te_adapter.recipe_spec(FP8Config(grad_dtype="e3m4"))


def test_te_recipe_and_autocast_use_te_classes(fake_te):
    cfg = FP8Config(backend="te", recipe="delayed", grad_dtype="e5m2", amax_history_len=16)
    recipe = te_adapter.te_recipe(cfg)
    assert type(recipe).__name__ == "DelayedScaling"
    assert recipe.kwargs == {"fp8_format": Format.HYBRID, "amax_history_len": 16, "amax_compute_algo": "max"}
    assert te_adapter.te_recipe(cfg) is recipe  # one object per config, reused every step
    group = object()
    with te_adapter.fp8_autocast_context(cfg, group):
        pass
    assert fake_te.log == [("fp8_autocast", True, recipe, group)]


def test_autocast_falls_back_to_te_autocast(fake_te, monkeypatch):
    calls = []
    monkeypatch.delattr(fake_te.module, "fp8_autocast")
    fake_te.module.autocast = lambda **kw: calls.append(kw) or contextlib.nullcontext()
    cfg = FP8Config(backend="te", recipe="tensorwise", grad_dtype="e4m3")
    with te_adapter.fp8_autocast_context(cfg, None):
        pass
    assert calls == [{"enabled": True, "recipe": te_adapter.te_recipe(cfg), "amax_reduction_group": None}]
    assert calls[0]["recipe"].kwargs == {"fp8_format": Format.E4M3}


# ---------------------------------------------------------------------------------------------- key mapping

@pytest.fixture(scope="module")
def debug_block_state():
    model = build_model(DEBUG, torch.device("cpu"), seed=11)
    return {k: v.detach() for k, v in model.layers["1"].state_dict().items()}


def _shard(state, tp, rank):
    return te_adapter.shard_block_state(state, DEBUG, tp, rank)


@pytest.mark.parametrize("tp", [1, 2, 4, 8])  # tp=8 > n_kv_heads=4: each KV head is held by 2 ranks
def test_mapping_round_trip_is_exact_for_every_shard(debug_block_state, tp):
    heads, kv_heads, ffn = te_adapter.local_sizes(DEBUG, tp)
    d = DEBUG.dim // DEBUG.n_heads
    for rank in range(tp):
        herd = _shard(debug_block_state, tp, rank)
        te_state = te_adapter.herd_to_te_block_state(herd, DEBUG)
        assert set(te_state) == set(te_adapter.TE_KEYS)
        assert te_state[te_adapter.QKV].shape == ((heads + 2 * kv_heads) * d, DEBUG.dim)
        assert te_state[te_adapter.WO].shape == (DEBUG.dim, heads * d)
        assert te_state[te_adapter.FC1].shape == (2 * ffn, DEBUG.dim)
        assert te_state[te_adapter.FC2].shape == (DEBUG.dim, ffn)
        back = te_adapter.te_to_herd_block_state(te_state, DEBUG)
        assert set(back) == set(herd)
        for key in herd:
            assert torch.equal(back[key], herd[key]), (tp, rank, key)


@pytest.mark.parametrize("tp", [1, 2, 8])
def test_fused_qkv_rows_are_q_then_k_then_v(debug_block_state, tp):
    x = torch.randn(5, DEBUG.dim, generator=torch.Generator().manual_seed(0))
    for rank in range(tp):
        herd = _shard(debug_block_state, tp, rank)
        fused = te_adapter.herd_to_te_block_state(herd, DEBUG)[te_adapter.QKV]
        parts = [x @ herd[f"attention.{w}.weight"].T for w in ("wq", "wk", "wv")]
        assert torch.equal(x @ fused.T, torch.cat(parts, dim=-1))


def test_fc1_is_gate_then_up_in_te_swiglu_order(debug_block_state):
    """TE's swiglu gates with the first half of fc1's output (tests/pytorch/test_numerics.py, TorchGLU:
    act(x[..., :n/2]) * x[..., n/2:] with act = SiLU): so fc1 must be cat(w1 gate, w3 up)."""
    x = torch.randn(5, DEBUG.dim, generator=torch.Generator().manual_seed(1))
    fc1 = te_adapter.herd_to_te_block_state(debug_block_state, DEBUG)[te_adapter.FC1]
    y = x @ fc1.T
    te_swiglu = F.silu(y[..., : y.shape[-1] // 2]) * y[..., y.shape[-1] // 2:]
    w1, w3 = debug_block_state["feed_forward.w1.weight"], debug_block_state["feed_forward.w3.weight"]
    assert torch.equal(te_swiglu, F.silu(x @ w1.T) * (x @ w3.T))


def test_te_to_herd_drops_extra_state_and_checks_keys(debug_block_state):
    te_state = te_adapter.herd_to_te_block_state(debug_block_state, DEBUG)
    back = te_adapter.te_to_herd_block_state({**te_state, "attn_qkv._extra_state": b"fp8 meta"}, DEBUG)
    assert set(back) == set(te_adapter.HERD_KEYS)
    with pytest.raises(KeyError, match="mlp.fc2_weight"):
        te_adapter.te_to_herd_block_state({k: v for k, v in te_state.items() if k != te_adapter.FC2}, DEBUG)
    with pytest.raises(KeyError, match="unexpected"):
        te_adapter.herd_to_te_block_state({**debug_block_state, "attention.bias": torch.zeros(1)}, DEBUG)


@pytest.mark.parametrize("tp", [2, 8])
def test_shards_match_parallel_tensor_parallel(debug_block_state, tp, monkeypatch):
    from parallel import tensor_parallel as tpmod
    kv_replicas = max(1, tp // DEBUG.n_kv_heads)
    for rank in range(tp):
        monkeypatch.setattr(tpmod, "dist", types.SimpleNamespace(get_world_size=lambda g: tp,
                                                                 get_rank=lambda g, r=rank: r))
        ours = _shard(debug_block_state, tp, rank)
        for key, full in debug_block_state.items():
            if key.endswith("norm.weight"):
                assert torch.equal(ours[key], full)
                continue
            row = key.endswith(("wo.weight", "w2.weight"))
            replicas = kv_replicas if key.endswith(("wk.weight", "wv.weight")) else 1
            info = tpmod.ShardInfo(1 if row else 0, full_shape=tuple(full.shape), replicas=replicas)
            assert torch.equal(ours[key], tpmod.tp_local(full, info, group=None)), (tp, rank, key)


# ---------------------------------------------------------------------------------------------- TE missing

def test_missing_te_is_one_clear_config_error(no_te):
    assert te_adapter.available() is False
    calls = [te_adapter.require_te, lambda: te_adapter.te_recipe(FP8Config(backend="te")),
             lambda: te_adapter.fp8_autocast_context(FP8Config(backend="te"), None),
             lambda: te_adapter.TEBlock(SMALL, 0, device="cpu"),
             lambda: te_adapter.convert_model_to_te(build_meta_model(SMALL), FP8Config(backend="te"))]
    for call in calls:
        with pytest.raises(ConfigError) as info:
            call()
        message = str(info.value)
        assert message.startswith(MISSING) and len(message) > len(MISSING) and "\n" not in message
        assert info.value.key == "fp8.backend"
    assert te_adapter.recipe_spec(FP8Config(backend="te"))["class"] == "Float8CurrentScaling"  # pure: no TE needed


def test_only_the_adapter_imports_transformer_engine():
    def te_imports(tree):
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            yield from (node for n in names if n.split(".")[0] == "transformer_engine")

    adapter = ROOT / "engine" / "fp8" / "te.py"
    offenders = [str(p.relative_to(ROOT)) for folder in ("engine", "parallel", "launch")
                 for p in (ROOT / folder).rglob("*.py") if p != adapter and any(te_imports(ast.parse(p.read_text())))]
    assert not offenders, offenders
    tree = ast.parse(adapter.read_text())
    top_level = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert not [n for n in top_level if any(te_imports(n))], "transformer_engine must be imported lazily"
    assert any(te_imports(tree))  # ...but it is imported (inside functions)


def test_module_imports_when_te_cannot_be_imported():
    code = ("import sys; sys.modules['transformer_engine'] = None; import engine.fp8.te as t; "
            "assert t.available() is False; print('ok')")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


# ---------------------------------------------------------------------------------------------- the block

def _inputs(cfg, b=2, s=24, docs=False):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(b, s, cfg.dim, generator=g)
    positions = torch.arange(s).expand(b, s)
    doc_ids = None
    if docs:  # two packed documents per row, split at different places
        doc_ids = torch.stack([(torch.arange(s) >= cut).long() for cut in (9, 15)])
        positions = torch.stack([torch.where(d == 0, torch.arange(s), torch.arange(s) - cut)
                                 for d, cut in zip(doc_ids, (9, 15))])
    return x, positions, doc_ids


@pytest.mark.parametrize("docs", [False, True], ids=["causal", "document_mask"])
@pytest.mark.parametrize("seq_first", [False, True], ids=["bshd", "sequence_first"])
def test_te_block_matches_transformer_block(fake_te, docs, seq_first):
    model = build_model(SMALL, torch.device("cpu"), seed=3)
    ref_block: TransformerBlock = model.layers["1"]
    block = te_adapter.TEBlock(SMALL, 1, device=torch.device("cpu"), params_dtype=torch.float32)
    block.load_herd_state({k: v.detach() for k, v in ref_block.state_dict().items()})
    block.seq_first = seq_first  # the sequence-parallel layout, exercised without a process group
    x, positions, doc_ids = _inputs(SMALL, docs=docs)
    cos, sin = model.rope(positions)
    mask = model.attention_mask(positions, doc_ids)
    with torch.no_grad():
        ours, theirs = block(x, cos, sin, mask), ref_block(x, cos, sin, mask)
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    for key, value in block.herd_state().items():
        assert torch.equal(value, ref_block.state_dict()[key])


def test_convert_model_keeps_logits_and_first_last_in_bf16(fake_te):
    model = build_model(SMALL, torch.device("cpu"), seed=4)
    tokens = torch.randint(0, SMALL.vocab_size, (2, 24), generator=torch.Generator().manual_seed(2))
    _, positions, doc_ids = _inputs(SMALL, docs=True)
    with torch.no_grad():
        expected = model(tokens), model(tokens, positions, doc_ids)
    converted = te_adapter.convert_model_to_te(model, FP8Config(backend="te", bf16_first_last_layers=True))
    assert converted == [f"layers.{i}" for i in range(SMALL.n_layers)]
    assert [model.layers[str(i)].fp8_enabled for i in range(4)] == [False, True, True, False]
    with torch.no_grad():
        got = model(tokens), model(tokens, positions, doc_ids)
    for ours, theirs in zip(got, expected):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    # each forward: blocks 0 and 3 left the FP8 region, blocks 1 and 2 stayed in the caller's
    assert fake_te.log == [("fp8_autocast", False, None, None)] * 4
    assert te_adapter.convert_model_to_te(model, FP8Config(backend="te")) == []  # already converted


def test_convert_without_bf16_ends_and_refuses_context_parallel(fake_te):
    model = build_model(SMALL, torch.device("cpu"), seed=4)
    te_adapter.convert_model_to_te(model, FP8Config(backend="te", bf16_first_last_layers=False))
    assert all(block.fp8_enabled for block in model.layers.values())
    other = build_model(SMALL, torch.device("cpu"), seed=4)
    other.layers["2"].attention.core = lambda q, k, v, mask: q
    with pytest.raises(ConfigError, match="context parallelism"):
        te_adapter.convert_model_to_te(other, FP8Config(backend="te"))


def test_meta_conversion_then_init_equals_herd_init(fake_te):
    model = build_meta_model(SMALL)
    te_adapter.convert_model_to_te(model, FP8Config(backend="te"))
    model.to_empty(device=torch.device("cpu"))
    init_weights(model, seed=9)
    assert te_adapter.init_te_blocks(model, seed=9) == SMALL.n_layers
    reference = build_model(SMALL, torch.device("cpu"), seed=9)
    for name, block in model.layers.items():
        expected = reference.layers[name].state_dict()
        for key, value in block.herd_state().items():
            assert torch.equal(value, expected[key]), (name, key)


def test_local_sizes_follow_tensor_parallel_rules():
    assert te_adapter.local_sizes(DEBUG, 1) == (8, 4, 768)
    assert te_adapter.local_sizes(DEBUG, 4) == (2, 1, 192)
    assert te_adapter.local_sizes(DEBUG, 8) == (1, 1, 96)  # KV heads replicated over 2 ranks
    with pytest.raises(ValueError):
        te_adapter.local_sizes(DEBUG, 3)
