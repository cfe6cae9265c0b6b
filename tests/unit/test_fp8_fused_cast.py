"""FP8 casts fused into RMSNorm and SwiGLU (fp8.fuse_norm_cast, fp8.fuse_swiglu_cast; engine/fp8/fused_cast.py) and
delayed scaling for weights only (fp8.weight_recipe), on CPU against the unfused path: the fused ops' references
against the unfused ops then the cast (bitwise, and opcheck), the device-path autograd functions against the
unfused custom ops (quantized values, gradients and delayed windows bitwise), whole training runs with and without
the switches (losses, parameters and windows bitwise), and the config refusals. The CUDA kernels against these
references: tests/gpu/test_kernel_fp8_fused.py."""

import io
import json

import pytest
import torch

import engine.ops  # noqa: F401  (defines the herd:: ops)
from engine.config import FP8Config
from engine.config_checks import check_fp8_fusion
from engine.errors import ConfigError
from engine.fp8 import check_fp8_config, native
from engine.fp8.fused_cast import NormToFP8, SwiGLUToFP8
from engine.fp8.native import E4M3, Float8Linear

DELAYED = FP8Config(backend="native", recipe="delayed", bf16_first_last_layers=False)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def sample(shape, dtype=torch.bfloat16, seed=0, spread=3.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * spread).to(dtype)


@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("x_dtype,norm_dtype", [(torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32),
                                                (torch.float32, torch.float32)])
def test_norm_cast_op_is_the_unfused_norm_then_the_cast(with_residual, x_dtype, norm_dtype):
    """herd::rms_norm_fp8_fwd = herd::(add_)rms_norm_fwd's output cast by herd::fp8_cast, bit for bit, including
    saturation (scale 256 pushes the largest values past e4m3's 448), the transposed copy and the amax."""
    x, weight = sample((3, 5, 64), x_dtype), sample((64,), torch.float32, seed=1, spread=1.0)
    residual = sample((3, 5, 64), torch.float32, seed=2) if with_residual else None
    scale = torch.tensor(256.0)
    out, out_t, amax, h, rstd = torch.ops.herd.rms_norm_fp8_fwd(x, residual, weight, 1e-5, norm_dtype, scale, E4M3,
                                                               True)
    if residual is None:
        y, rstd_plain = torch.ops.herd.rms_norm_fwd(x, weight, 1e-5, norm_dtype)
        assert h.numel() == 0
    else:
        y, h_plain, rstd_plain = torch.ops.herd.add_rms_norm_fwd(x, residual, weight, 1e-5, norm_dtype)
        assert torch.equal(h, h_plain)
    want, want_t, want_amax = torch.ops.herd.fp8_cast(y.reshape(15, 64), scale, E4M3, True)
    assert same_bits(out, want) and same_bits(out_t, want_t) and torch.equal(amax, want_amax)
    assert torch.equal(rstd, rstd_plain)
    assert (out.float().abs() == 448).any()  # saturated values are in the comparison
    torch.library.opcheck(torch.ops.herd.rms_norm_fp8_fwd, (x, residual, weight, 1e-5, norm_dtype, scale, E4M3, True))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("transpose", [False, True])
def test_swiglu_cast_op_is_the_unfused_swiglu_then_the_cast(dtype, transpose):
    gate, up = sample((2, 7, 48), dtype, seed=3), sample((2, 7, 48), dtype, seed=4)
    scale = torch.tensor(16.0)
    out, out_t, amax = torch.ops.herd.swiglu_fp8_fwd(gate, up, scale, E4M3, transpose)
    s = torch.ops.herd.swiglu_fwd(gate, up)
    want, want_t, want_amax = torch.ops.herd.fp8_cast(s.reshape(14, 48), scale, E4M3, transpose)
    assert same_bits(out, want) and same_bits(out_t, want_t) and torch.equal(amax, want_amax)
    torch.library.opcheck(torch.ops.herd.swiglu_fp8_fwd, (gate, up, scale, E4M3, transpose))


def consumers(count: int, k: int, n: int, seed: int):
    """`count` Float8Linear [n, k] on one InputShare and one delayed input ScalingState whose window holds a step."""
    torch.manual_seed(seed)
    layers = [Float8Linear(k, n, DELAYED) for _ in range(count)]
    for layer in layers:
        torch.nn.init.normal_(layer.weight, std=0.05)
    native._share_input(layers)
    with torch.no_grad():  # one plain step fills every window (the fused path starts from the second)
        for layer in layers:
            layer(torch.randn(16, k) * 2).float().sum()
    return layers


def states(layers):
    return [(s.amax_history.clone(), s.scale.clone(), s.overflows.clone()) for layer in layers
            for s in (layer.input_scaling, layer.weight_scaling, layer.grad_scaling)]


def run_consumers(layers, activation, leaves, extra=None):
    """Each layer on the activation, a loss (+ `extra`), backward: (outputs, grads of `leaves` and of the layers'
    weights)."""
    outs = [layer(activation) for layer in layers]
    loss = sum(o.float().pow(2).sum() for o in outs)
    (loss if extra is None else loss + extra).backward()
    return [o.detach() for o in outs], [t.grad.clone() for t in list(leaves) + [layer.weight for layer in layers]]


def assert_same_run(fused, plain):
    (outs_f, grads_f, states_f), (outs_p, grads_p, states_p) = fused, plain
    assert all(torch.equal(a, b) for a, b in zip(outs_f, outs_p))
    assert all(a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(grads_f, grads_p))
    assert all(torch.equal(a, b) for sf, sp in zip(states_f, states_p) for a, b in zip(sf, sp))


@pytest.mark.parametrize("with_residual", [False, True])
def test_norm_device_path_matches_the_unfused_custom_op_bitwise(with_residual):
    """The autograd function the CUDA path runs (here on CPU tensors: the op's reference, the reference backward)
    against herd::(add_)rms_norm_fwd with its registered autograd and the layers quantizing its output: the same
    outputs, input / residual / norm weight / layer weight gradients and delayed windows; the three siblings read
    one quantization offered by the norm, none quantizes its input."""
    results = {}
    for fused in (True, False):
        layers = consumers(3, 64, 32, seed=5)
        x = sample((2, 8, 64), torch.float32, seed=6).requires_grad_()
        residual = sample((2, 8, 64), torch.float32, seed=7).requires_grad_() if with_residual else None
        weight = (1 + sample((64,), torch.float32, seed=8, spread=0.1)).requires_grad_()
        leaves = [x, weight] + ([residual] if with_residual else [])
        calls, state = [], layers[0].input_scaling  # one state for the three siblings
        original = state.quantize
        state.quantize = lambda t, transpose: (calls.append(1), original(t, transpose))[1]
        if fused:
            made = NormToFP8(layers).device_path(x, weight, 1e-5, residual, force=True)
            activation = made if residual is None else made[0]
            assert native.is_fp8_carrier(activation) and activation.untyped_storage().nbytes() <= 4
        elif residual is None:
            activation = torch.ops.herd.rms_norm_fwd(x, weight, 1e-5, torch.float32)[0]
        else:
            activation, h, _ = torch.ops.herd.add_rms_norm_fwd(x, residual, weight, 1e-5, torch.float32)
        extra = None  # the residual path's gradient joins the norm's
        if residual is not None:
            extra = (made[1] if fused else h).float().pow(3).sum()
        results[fused] = run_consumers(layers, activation, leaves, extra) + (states(layers),)
        assert len(calls) == (0 if fused else 1)
    assert_same_run(results[True], results[False])


def test_swiglu_device_path_matches_the_unfused_custom_op_bitwise():
    results = {}
    for fused in (True, False):
        (w2,) = consumers(1, 48, 32, seed=9)
        gate = sample((2, 8, 48), torch.float32, seed=10).requires_grad_()
        up = sample((2, 8, 48), torch.float32, seed=11).requires_grad_()
        if fused:
            activation = SwiGLUToFP8([w2]).device_path(gate, up, force=True)
            assert native.is_fp8_carrier(activation)
        else:
            activation = torch.ops.herd.swiglu_fwd(gate, up)
        results[fused] = run_consumers([w2], activation, [gate, up]) + (states([w2]),)
    assert_same_run(results[True], results[False])


def windows(model):
    return {f"{name}.{role}": (s.amax_history.clone(), s.scale.clone(), s.overflows.clone())
            for name, m in model.named_modules() if isinstance(m, Float8Linear)
            for role, s in (("input", m.input_scaling), ("weight", m.weight_scaling), ("grad", m.grad_scaling))}


@pytest.mark.parametrize("fused_projections,checkpointing", [(False, "none"), (True, "full")])
def test_training_with_fused_casts_is_bitwise_the_unfused_run(tmp_path, monkeypatch, fused_projections,
                                                             checkpointing):
    """4 steps of 2 micro-batches, bf16 autocast, delayed recipe (separate or fused projections; without or with
    full activation checkpointing, whose backward recomputes each block): with fuse_norm_cast and fuse_swiglu_cast
    every step's loss, every parameter and every delayed window equal the unfused run's, while the FP8 layers
    quantize only wo's input themselves once the windows hold a step (the norms and SwiGLU quantize the other
    three)."""
    from engine.run import train
    from tests.helpers import make_corpus, record_quantizations, tiny_config
    corpus = make_corpus(tmp_path / "c")
    roles, runs, input_casts = record_quantizations(monkeypatch), {}, {}
    for fused in ("true", "false"):
        start = len(roles)
        runs[fused] = train(tiny_config(corpus, tmp_path / fused, [
            "train.steps=4", "train.dtype=bf16", "train.eval_every=0", "fp8.backend=native", "fp8.recipe=delayed",
            "data.valid=[]", "fp8.bf16_first_last_layers=false", f"fp8.fuse_norm_cast={fused}",
            f"fp8.fuse_swiglu_cast={fused}",
            f"train.fused_projections={str(fused_projections).lower()}",
            f"parallel.activation_checkpointing={checkpointing}"]), stream=io.StringIO())
        input_casts[fused] = roles[start:].count("input")
    losses = {k: [json.loads(line)["loss"] for line in (tmp_path / k / "t" / "metrics.jsonl").read_text().splitlines()
                  if "loss" in json.loads(line)] for k in runs}
    assert len(losses["true"]) == 4 and losses["true"] == losses["false"], losses
    on, off = runs["true"].module.model, runs["false"].module.model
    params_off = dict(off.named_parameters())
    assert all(torch.equal(p, params_off[name]) for name, p in on.named_parameters())
    win_on, win_off = windows(on), windows(off)
    assert win_on.keys() == win_off.keys() and all(
        torch.equal(a, b) for k in win_on for a, b in zip(win_on[k], win_off[k]))
    inputs_per_forward = 4  # qkv, wo, gate/up, w2 (shared or fused projections: one quantization each)
    forwards, blocks = 4 * 2 * (2 if checkpointing == "full" else 1), 2  # steps x micro-batches (x recompute)
    assert input_casts["false"] == forwards * blocks * inputs_per_forward
    unfused = 2 if checkpointing == "full" else 1  # the first forward fills the windows; its recomputation
    #                                                 takes the path it took (engine/fp8 recompute_contexts)
    assert input_casts["true"] == blocks * (unfused * inputs_per_forward + (forwards - unfused) * 1)


def test_inference_and_unfilled_windows_take_the_unfused_path_with_the_same_numbers():
    from tests.unit.test_fp8_native import debug_model
    tokens = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    logits = {}
    for fused in (True, False):
        model = debug_model(n_layers=2)
        native.convert(model, FP8Config(backend="native", recipe="delayed", bf16_first_last_layers=False,
                                        fuse_norm_cast=fused, fuse_swiglu_cast=fused))
        with torch.no_grad():
            first = model(tokens)  # fills the windows (unfused in both)
            second = model(tokens)  # fused where switched on
        with torch.inference_mode():
            third = model(tokens)
        logits[fused] = (first, second, third)
    assert all(torch.equal(a, b) for a, b in zip(logits[True], logits[False]))


def test_a_carrier_read_by_a_layer_it_was_not_offered_to_fails_loudly():
    (layer,) = consumers(1, 32, 16, seed=12)
    carrier = native.fp8_carrier(torch.zeros(1), (4, 32), torch.float32)
    with pytest.raises(RuntimeError, match="FP8-only activation"):
        layer(carrier)


def test_delayed_weights_keep_tensorwise_inputs_and_skip_the_weight_amax_pass(monkeypatch):
    """weight_recipe=delayed under recipe tensorwise: the weight is quantized exactly as under the delayed recipe
    (same FP8 weight, 1/scale and window at every step, as the weight changes), the input exactly as under
    tensorwise, and after the first step no amax pass reads the weight (delayed scaling measures it in the cast)."""
    amax_reads = []
    fp8_amax = native.fp8_amax
    monkeypatch.setattr(native, "fp8_amax", lambda t: (amax_reads.append(isinstance(t, torch.nn.Parameter)),
                                                       fp8_amax(t))[1])
    cfgs = {"mixed": FP8Config(backend="native", weight_recipe="delayed"),
            "delayed": FP8Config(backend="native", recipe="delayed"), "tensorwise": FP8Config(backend="native")}
    layers = {}
    for name, cfg in cfgs.items():
        torch.manual_seed(13)
        layers[name] = Float8Linear(64, 32, cfg)
        torch.nn.init.normal_(layers[name].weight, std=0.05)
    x = sample((16, 64), torch.float32, seed=14)
    weight_reads, like_tensorwise = [], []
    for step in range(3):
        start = len(amax_reads)
        quantized = {name: layer.quantized_weight() for name, layer in layers.items()}
        inputs = {name: layer.quantized_input(x, x, transpose=True) for name, layer in layers.items()}
        weight_reads.append(amax_reads[start:])
        assert all(same_bits(a, b) for a, b in zip(quantized["mixed"][:2], quantized["delayed"][:2]))
        assert torch.equal(quantized["mixed"][2], quantized["delayed"][2])
        assert all(same_bits(a, b) for a, b in zip(inputs["mixed"][:2], inputs["tensorwise"][:2]))
        assert torch.equal(layers["mixed"].weight_scaling.amax_history, layers["delayed"].weight_scaling.amax_history)
        like_tensorwise.append(torch.equal(quantized["mixed"][2], quantized["tensorwise"][2]))
        with torch.no_grad():
            for layer in layers.values():
                layer.weight.mul_(1.5)  # the weights grow: the delayed scale lags behind, so the runs' scales differ
    assert like_tensorwise == [True, False, False]  # the first step scales by the current amax, then the window
    # per step: the weight amax reads of (mixed, delayed, tensorwise): the first step fills the windows
    assert [reads.count(True) for reads in weight_reads] == [3, 1, 1]


@pytest.mark.parametrize("changes,key,message", [
    ({"backend": "none", "fuse_norm_cast": True}, "fp8.fuse_norm_cast", "needs fp8.backend=native"),
    ({"backend": "te", "fuse_swiglu_cast": True}, "fp8.fuse_swiglu_cast", "needs fp8.backend=native"),
    ({"fuse_norm_cast": True}, "fp8.fuse_norm_cast", "needs fp8.recipe=delayed"),
    ({"recipe": "delayed", "fuse_swiglu_cast": True, "tp": 2}, "fp8.fuse_swiglu_cast", "needs parallel.tp=1"),
    ({"recipe": "delayed", "fuse_norm_cast": True, "compile": True}, "fp8.fuse_norm_cast", "train.compile"),
    ({"weight_recipe": "rowwise"}, "fp8.weight_recipe", "'rowwise' is not one of same, tensorwise, delayed"),
    ({"backend": "none", "weight_recipe": "delayed"}, "fp8.weight_recipe", "needs fp8.backend=native"),
    ({"backend": "te", "weight_recipe": "tensorwise"}, "fp8.weight_recipe", "needs fp8.backend=native"),
])
def test_fusion_settings_that_cannot_run_are_refused_in_one_line(changes, key, message):
    changes = dict(changes)
    tp, compile_ = changes.pop("tp", 1), changes.pop("compile", False)
    cfg = FP8Config(**{"backend": "native", **changes})
    with pytest.raises(ConfigError) as err:
        check_fp8_fusion(cfg, tp, compile_)
    assert str(err.value).startswith(f"{key}: ") and message in str(err.value) and "\n" not in str(err.value)
    if not compile_ and cfg.backend != "te":  # the build-time check covers configs built in code (te: not installed)
        from engine.config import ParallelConfig
        with pytest.raises(ConfigError, match=key):
            check_fp8_config(cfg, torch.device("cpu"), ParallelConfig(tp=tp))


def test_config_loading_refuses_a_fused_cast_under_tensorwise(tmp_path):
    from tests.helpers import make_corpus, tiny_config
    corpus = make_corpus(tmp_path / "c")
    with pytest.raises(ConfigError, match="fp8.fuse_swiglu_cast: needs fp8.recipe=delayed"):
        tiny_config(corpus, tmp_path / "r", ["fp8.backend=native", "fp8.fuse_swiglu_cast=true"])
    tiny_config(corpus, tmp_path / "r", ["fp8.backend=native", "fp8.recipe=delayed", "fp8.fuse_swiglu_cast=true",
                                         "fp8.weight_recipe=tensorwise"])  # accepted

