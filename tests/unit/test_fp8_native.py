"""The native FP8 path (engine/fp8/native.py) on CPU, where torch._scaled_mm runs too: a Float8Linear's output
and gradients against the high-precision linear, delayed scaling's state step by step, the model conversion, the
per-step weight cache, and a short FP8 training run against the bf16 one."""

import io

import pytest
import torch

from engine.config import FP8Config, ModelConfig
from engine.errors import ConfigError
from engine.fp8 import apply_fp8, check_fp8_config
from engine.fp8 import native
from engine.fp8.native import E4M3, E5M2, Float8Linear, ScalingState, weight_cache
from engine.model import build_model

# Normwise relative error of an FP8 GEMM against the fp32 one, with unit-scale random operands of K = 256: e4m3
# keeps 3 mantissa bits (rounding error up to 2^-4 per element, about 3.7% normwise measured), e5m2 keeps 2
# (about 5.9%). The bounds leave some room over those measurements.
TOL_E4M3, TOL_E5M2 = 0.05, 0.08


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def run_linear(cfg: FP8Config, steps: int = 2, seed: int = 0):
    torch.manual_seed(seed)
    layer = Float8Linear(256, 512, cfg)
    torch.nn.init.normal_(layer.weight, std=0.02)
    for _ in range(steps):  # the second step runs on the delayed recipe's window
        layer.weight.grad = None
        x = torch.randn(8, 64, 256, requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x)
        grad = torch.randn(y.shape)
        y.backward(grad.to(y.dtype))
    x_ref, w_ref = x.detach().clone().requires_grad_(), layer.weight.detach().clone().requires_grad_()
    y_ref = x_ref @ w_ref.t()
    y_ref.backward(grad)
    return layer, x, y, x_ref, w_ref, y_ref


@pytest.mark.parametrize("recipe", ["tensorwise", "delayed"])
@pytest.mark.parametrize("grad_dtype", ["e5m2", "e4m3"])
def test_fp8_linear_output_and_gradients_match_fp32_within_fp8_error(recipe, grad_dtype):
    layer, x, y, x_ref, w_ref, y_ref = run_linear(FP8Config(backend="native", recipe=recipe,
                                                            grad_dtype=grad_dtype))
    grad_tol = TOL_E5M2 if grad_dtype == "e5m2" else TOL_E4M3
    assert y.dtype == torch.bfloat16 and y.shape == y_ref.shape
    assert rel(y, y_ref) < TOL_E4M3
    assert x.grad.dtype == torch.float32 and rel(x.grad, x_ref.grad) < grad_tol
    assert layer.weight.grad.dtype == torch.float32 and rel(layer.weight.grad, w_ref.grad) < grad_tol
    # and it really is quantized: far from the fp32 result compared with bf16 rounding alone
    assert rel(y, y_ref) > 5e-3


def test_tensorwise_scale_maps_amax_to_the_format_max():
    state = ScalingState(E4M3, "tensorwise", 4)
    t = torch.randn(32, 48) * 3
    out, out_t, inv = state.quantize(t, transpose=True)
    assert out.dtype == E4M3 and out_t.shape == (48, 32) and torch.equal(out_t.float(), out.float().t())
    assert out.float().abs().max().item() == 448.0
    assert inv.item() == pytest.approx(t.abs().max().item() / 448.0, rel=1e-6)


def test_delayed_scaling_window_step_by_step():
    state = ScalingState(E4M3, "delayed", history_len=2)
    t1 = torch.full((4, 16), 2.0)
    state.quantize(t1, transpose=False)  # fresh window: this step scales by its own amax
    assert state.filled and state.amax_history.tolist() == [2.0, 0.0]
    assert state.scale.item() == pytest.approx(448 / 2.0) and state.overflows.item() == 0

    t2 = torch.full((4, 16), 8.0)  # 4x larger than the window knows: saturates at 448 instead of overflowing
    out, _, inv = state.quantize(t2, transpose=False)
    assert inv.item() == pytest.approx(2.0 / 448)  # the scale used was the delayed one
    assert out.float().max().item() == 448.0 and torch.isfinite(out.float()).all()
    assert state.overflows.item() == 1
    assert state.amax_history.tolist() == [8.0, 2.0] and state.scale.item() == pytest.approx(448 / 8.0)

    state.quantize(torch.full((4, 16), 1.0), transpose=False)
    assert state.amax_history.tolist() == [1.0, 8.0]  # oldest amax (2.0) left the window of 2
    state.quantize(torch.full((4, 16), 0.5), transpose=False)
    assert state.amax_history.tolist() == [0.5, 1.0] and state.scale.item() == pytest.approx(448 / 1.0)


def test_delayed_scaling_ignores_a_non_finite_amax():
    state = ScalingState(E5M2, "delayed", history_len=3)
    state.quantize(torch.full((2, 16), 4.0), transpose=False)
    history, scale = state.amax_history.clone(), state.scale.clone()
    bad = torch.full((2, 16), 1.0)
    bad[0, 0] = float("inf")
    state.quantize(bad, transpose=False)
    assert torch.equal(state.amax_history, history) and torch.equal(state.scale, scale)
    assert state.overflows.item() == 0
    state.reset_tables()
    assert not state.filled and state.amax_history.abs().sum().item() == 0 and state.scale.item() == 1.0


def debug_model(n_layers=4):
    cfg = ModelConfig(dim=64, n_layers=n_layers, n_heads=4, n_kv_heads=2, ffn_dim=128, vocab_size=256,
                      max_seq_len=64)
    return build_model(cfg, torch.device("cpu"), seed=3)


def test_convert_keeps_names_head_and_first_last_blocks():
    model = debug_model()
    names_before = [n for n, _ in model.named_parameters()]
    weight = model.layers["1"].attention.wq.weight
    converted = apply_fp8(model, FP8Config(backend="native"))
    assert [n for n, _ in model.named_parameters()] == names_before  # checkpoint keys unchanged
    assert model.layers["1"].attention.wq.weight is weight
    assert len(converted) == 2 * 7 and all(n.startswith(("layers.1.", "layers.2.")) for n in converted)
    assert type(model.layers["0"].attention.wq) is torch.nn.Linear and type(model.output) is torch.nn.Linear
    assert isinstance(model.layers["2"].feed_forward.w2, Float8Linear)
    every = apply_fp8(debug_model(), FP8Config(backend="native", bf16_first_last_layers=False))
    assert len(every) == 4 * 7


@pytest.mark.parametrize("key,value,message", [("backend", "fp4", "fp8.backend: 'fp4'"),
                                               ("recipe", "rowwise", "fp8.recipe: 'rowwise'"),
                                               ("grad_dtype", "e3m4", "fp8.grad_dtype: 'e3m4'"),
                                               ("amax_history_len", 0, "fp8.amax_history_len: 0")])
def test_bad_fp8_settings_fail_in_one_line_naming_the_key(key, value, message):
    cfg = FP8Config(backend="native")
    setattr(cfg, key, value)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        check_fp8_config(cfg, torch.device("cpu"))


def test_fp8_training_run_tracks_the_bf16_run(tmp_path):
    from engine.run import train
    from tests.helpers import make_corpus, tiny_config
    corpus = make_corpus(tmp_path / "c")
    runs = {}
    for backend in ("none", "native"):
        trainer = train(tiny_config(corpus, tmp_path / backend, ["train.steps=30", "train.dtype=bf16",
                                                                f"fp8.backend={backend}",
                                                                "fp8.bf16_first_last_layers=false"]),
                        stream=io.StringIO())
        runs[backend] = trainer
    fp8, bf16 = runs["native"], runs["none"]
    assert any(isinstance(m, Float8Linear) for m in fp8.module.model.modules())
    assert fp8.last_metrics["val_loss"] < fp8.initial_val_loss - 0.5  # it learns
    # FP8 rounding moves the loss a little, not the trajectory: within 2% of the bf16 run after 30 steps
    assert abs(fp8.last_metrics["val_loss"] - bf16.last_metrics["val_loss"]) < 0.02 * bf16.last_metrics["val_loss"]


def test_step_scope_is_the_weight_cache_only_for_native_unsharded_weights():
    from engine.fp8 import fp8_step_context
    parts = [torch.nn.Sequential(Float8Linear(32, 32, FP8Config(backend="native")))]
    with fp8_step_context(FP8Config(backend="native"), parts)():
        assert parts[0][0].caching
    assert not parts[0][0].caching
    for cfg, sharded in ((FP8Config(backend="native"), True), (FP8Config(backend="native", cache_weights=False), False),
                         (FP8Config(backend="none"), False)):
        with fp8_step_context(cfg, parts, weights_sharded=sharded)():
            assert not parts[0][0].caching  # FSDP (whole FP8 weights kept all step), turned off, or no native FP8


def test_weight_cache_quantizes_a_weight_once_per_scope_and_drops_it_after():
    torch.manual_seed(0)
    layer = Float8Linear(256, 512, FP8Config(backend="native"))
    torch.nn.init.normal_(layer.weight, std=0.02)
    calls = []
    quantize = layer.weight_scaling.quantize
    layer.weight_scaling.quantize = lambda t, transpose: (calls.append(t.shape), quantize(t, transpose))[1]
    xs = [torch.randn(16, 256) for _ in range(2)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = [layer(x) for x in xs]
        assert len(calls) == 2  # outside the scope: every forward quantizes
        with weight_cache(native.float8_layers([torch.nn.Sequential(layer)])) as covered:
            cached = [layer(x) for x in xs]
        assert covered == 1 and len(calls) == 3  # one quantization serves both micro-batches
        assert not layer.caching and layer._step_weight is None  # dropped when the scope closes
        assert all(torch.equal(a, b) for a, b in zip(plain, cached))
        with torch.no_grad():
            layer.weight.mul_(2)  # what an optimizer step does between two scopes
        with weight_cache([layer]):
            doubled = layer(xs[0])
        assert len(calls) == 4 and rel(doubled, 2 * plain[0].float()) < 1e-2


@pytest.mark.parametrize("checkpointing", ["none", "full"])
def test_weight_cache_leaves_a_run_bitwise_unchanged_and_casts_weights_once_per_step(tmp_path, monkeypatch,
                                                                                    checkpointing):
    """Two micro-batches per step (tiny_config: 8 sequences in micro-batches of 4), tensorwise recipe: the cached
    run's losses and parameters equal the uncached run's exactly, and it quantizes each FP8 weight once per step
    instead of once per micro-batch; with full activation checkpointing the backward's recomputation of each
    micro-batch also takes the step's copy (uncached, it quantizes the weight again: twice per micro-batch)."""
    from engine.run import train
    from tests.helpers import make_corpus, record_quantizations, tiny_config
    corpus = make_corpus(tmp_path / "c")
    roles, weight_casts = record_quantizations(monkeypatch), []
    runs = {}
    for cache in ("true", "false"):
        start = len(roles)
        runs[cache] = train(tiny_config(corpus, tmp_path / cache, [
            "train.steps=4", "train.dtype=bf16", "train.eval_every=0", "fp8.backend=native",
            "fp8.bf16_first_last_layers=false", f"fp8.cache_weights={cache}",
            f"parallel.activation_checkpointing={checkpointing}"]), stream=io.StringIO())
        weight_casts.append(roles[start:].count("weight"))
    on, off = runs["true"], runs["false"]
    fp8_layers = sum(isinstance(m, Float8Linear) for m in on.module.model.modules())
    assert fp8_layers == 14  # 2 blocks x 7 projections
    forwards = 2 if checkpointing == "none" else 4  # per step: 2 micro-batches, each recomputed under full AC
    assert weight_casts[1] - weight_casts[0] == 4 * (forwards - 1) * fp8_layers  # 4 steps, once instead of each
    assert on.last_metrics["loss"] == off.last_metrics["loss"]
    params_on, params_off = dict(on.module.model.named_parameters()), dict(off.module.model.named_parameters())
    assert all(torch.equal(params_on[name], params_off[name]) for name in params_off)


@pytest.mark.parametrize("recipe", ["tensorwise", "delayed"])
def test_siblings_quantize_their_common_input_once_with_the_same_results(recipe, monkeypatch):
    """wq/wk/wv and w1/w3 share one input quantization: over two training steps outputs and gradients are
    bitwise those of separate quantizations, each block quantizes 4 inputs per forward instead of 7, and autograd
    keeps one transposed input copy per group instead of one per layer."""
    cfg = FP8Config(backend="native", recipe=recipe, bf16_first_last_layers=False)
    tokens = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(0))
    from tests.helpers import record_quantizations
    roles, results = record_quantizations(monkeypatch), {}
    for share in (True, False):
        model = debug_model(n_layers=2)
        native.convert(model, cfg, share_inputs=share)
        start, saved = len(roles), {}

        def pack(t):
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        for _ in range(2):  # the second step runs on the delayed recipe's windows
            model.zero_grad()
            saved.clear()  # one step's saved tensors, all alive until its backward: distinct storages
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                    torch.autocast("cpu", dtype=torch.bfloat16):
                logits = model(tokens)
            logits.float().logsumexp(-1).mean().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        results[share] = (logits.detach(), grads, roles[start:].count("input"), sum(saved.values()))
    (logits_s, grads_s, casts_s, saved_s), (logits_p, grads_p, casts_p, saved_p) = results[True], results[False]
    assert torch.equal(logits_s, logits_p)
    assert all(torch.equal(grads_s[n], grads_p[n]) for n in grads_p)
    assert (casts_s, casts_p) == (2 * 2 * 4, 2 * 2 * 7)  # steps x blocks x inputs quantized
    fp8_xt = 2 * 64 * 64  # one [dim, b*s] e4m3 transposed input: saved once instead of 3 times (attention), 2 (MLP)
    assert saved_p - saved_s >= 2 * (2 + 1) * fp8_xt, (saved_p, saved_s)
    with torch.inference_mode():  # inference tensors have no version counter: no sharing there, the same numbers
        inferred = native_model_logits(tokens, cfg, share=True)
    assert torch.equal(inferred, native_model_logits(tokens, cfg, share=True))


def native_model_logits(tokens, cfg, share):
    model = debug_model(n_layers=2)
    native.convert(model, cfg, share_inputs=share)
    with torch.no_grad():
        return model(tokens)
