"""Gradient-accumulation fusion (engine/ops/accum_linear.py, train.grad_accum_fusion): weight gradients are added
into the fp32 `weight.grad` inside backward instead of a per-micro-batch gradient that autograd casts and adds.

In fp32 the fused layer does what autograd does (the same GEMM, then the same add), so gradients and whole training
runs are bitwise unchanged. Under bf16 autocast it skips the rounding of every micro-batch's weight gradient to
bf16: its gradient equals the fp32 sum of the exact bf16 x bf16 products (an fp64 oracle, within fp32 rounding),
which a plain nn.Linear under autocast does not.
"""

import io

import pytest
import torch
from torch import nn

from engine.config import load_config
from engine.errors import ConfigError
from engine.ops.accum_linear import MainGradLinear, check_fused_accumulation, use_fused_accumulation
from engine.run import build_trainer
from tests.distributed import ranks
from tests.helpers import make_corpus, parity_config

MICRO_BATCHES = 4


def _pair(out_features=48, in_features=32):
    torch.manual_seed(0)
    plain = nn.Linear(in_features, out_features, bias=False)
    fused = nn.Linear(in_features, out_features, bias=False)
    fused.load_state_dict(plain.state_dict())
    use_fused_accumulation(fused_holder := nn.Sequential(fused))
    return plain, fused_holder[0]


def _accumulate(layer, inputs, output_grads, autocast: bool):
    """Forward and backward each micro-batch through `layer`; returns the input gradients."""
    input_grads = []
    for x, g in zip(inputs, output_grads):
        x = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = layer(x)  # [b, s, out]
        (y.float() * g).sum().backward()
        input_grads.append(x.grad)
    return input_grads


def _micro_batches(in_features=32, out_features=48):
    g = torch.Generator().manual_seed(1)
    inputs = [torch.randn(2, 16, in_features, generator=g) for _ in range(MICRO_BATCHES)]
    grads = [torch.randn(2, 16, out_features, generator=g) for _ in range(MICRO_BATCHES)]
    return inputs, grads


def test_layer_is_swapped_in_place_and_keeps_its_parameter():
    plain, fused = _pair()
    assert type(fused) is MainGradLinear and type(plain) is nn.Linear
    assert torch.equal(plain.weight, fused.weight)
    model = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 4), nn.Embedding(3, 4))
    names = [n for n, _ in model.named_parameters()]
    assert use_fused_accumulation(model) == 1  # the bias-free linear only
    assert [n for n, _ in model.named_parameters()] == names


def test_fp32_gradients_are_bitwise_the_plain_linear_s():
    plain, fused = _pair()
    inputs, grads = _micro_batches()
    dx_plain = _accumulate(plain, inputs, grads, autocast=False)
    dx_fused = _accumulate(fused, inputs, grads, autocast=False)
    assert all(torch.equal(a, b) for a, b in zip(dx_plain, dx_fused))
    assert fused.weight.grad.dtype == torch.float32
    assert torch.equal(plain.weight.grad, fused.weight.grad)


def test_bf16_weight_gradient_is_the_fp32_sum_of_exact_products():
    plain, fused = _pair()
    inputs, grads = _micro_batches()
    _accumulate(plain, inputs, grads, autocast=True)
    _accumulate(fused, inputs, grads, autocast=True)
    # the oracle in fp64 from the operands the GEMM sees: bf16 input and bf16 output gradient
    oracle = sum(g.to(torch.bfloat16).double().reshape(-1, 48).t() @ x.to(torch.bfloat16).double().reshape(-1, 32)
                 for x, g in zip(inputs, grads))
    scale = oracle.abs().max().item()
    fused_err = (fused.weight.grad.double() - oracle).abs().max().item() / scale
    plain_err = (plain.weight.grad.double() - oracle).abs().max().item() / scale
    print(f"max |grad - fp64 oracle| / max |oracle|: fused {fused_err:.1e}, plain nn.Linear under autocast "
          f"{plain_err:.1e}")
    assert fused.weight.grad.dtype == torch.float32
    assert fused_err < 1e-6  # fp32 sums of exact products
    assert plain_err > 1e-4  # each micro-batch's gradient rounded to bf16 (8 significant bits)


def test_autograd_grad_leaves_the_gradient_alone_or_returns_it():
    """Only loss.backward() accumulates: torch.autograd.grad for the input (as torch's pipeline schedules run on
    the last stage to infer shapes) must not touch weight.grad, and autograd.grad for the weight gets it back."""
    plain, fused = _pair()
    x = torch.randn(2, 16, 32, requires_grad=True)
    (dx,) = torch.autograd.grad(fused(x).square().sum(), [x])
    assert fused.weight.grad is None
    assert torch.equal(dx, torch.autograd.grad(plain(x).square().sum(), [x])[0])
    (dw,) = torch.autograd.grad(fused(x).square().sum(), [fused.weight])
    assert fused.weight.grad is None
    assert torch.allclose(dw, torch.autograd.grad(plain(x).square().sum(), [plain.weight])[0], rtol=1e-6, atol=0)


@pytest.mark.parametrize("key, overrides", [
    ("parallel.dp_shard", dict(dp_shard=2)), ("parallel.dp_replicate", dict(dp_replicate=2)),
    ("parallel.cp", dict(cp=2)), ("parallel.pp_schedule", dict(pp=2, pp_schedule="ZBVZeroBubble"))])
def test_layouts_it_cannot_run_under_are_refused_naming_the_key(key, overrides):
    parallel = load_config(None, ["train.grad_accum_fusion=true"]).parallel
    for name, value in {"dp_shard": 1, **overrides}.items():
        setattr(parallel, name, value)
    with pytest.raises(ConfigError) as error:
        check_fused_accumulation(True, parallel, compile_blocks=False)
    assert error.value.key == key
    check_fused_accumulation(False, parallel, compile_blocks=True)  # off: nothing to refuse


def test_compile_is_refused():
    parallel = load_config(None, []).parallel
    parallel.dp_shard = 1
    with pytest.raises(ConfigError) as error:
        check_fused_accumulation(True, parallel, compile_blocks=True)
    assert error.value.key == "train.compile"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"))


def _train(corpus, run_dir, overrides):
    trainer = build_trainer(parity_config(corpus, run_dir, overrides), stream=io.StringIO())
    recorder = ranks.Recorder()
    trainer.callbacks.append(recorder)
    trainer.fit()
    return [m["loss"] for m in recorder.steps], trainer.module.parallel.full_parameters()


# bf16: the fused run differs from the plain one only by the bf16 rounding of each micro-batch's weight gradient
# (2**-9 relative) that it skips; over 5 steps of 16 micro-batches the losses stay within 1e-3 relative.
BF16_TOLERANCE = 1e-3


def test_fp32_training_with_micro_batches_is_bitwise_unchanged(corpus, tmp_path):
    """One process, 5 steps of 16 micro-batches (parity config): losses and parameters bitwise the plain run's."""
    plain = _train(corpus, tmp_path / "plain", [])
    fused = _train(corpus, tmp_path / "fused", ["train.grad_accum_fusion=true"])
    assert fused[0] == plain[0]
    assert all(torch.equal(fused[1][k], v) for k, v in plain[1].items())


@pytest.mark.slow
def test_bf16_training_with_micro_batches_within_tolerance(corpus, tmp_path):
    plain16 = _train(corpus, tmp_path / "plain16", ["train.dtype=bf16"])
    fused16 = _train(corpus, tmp_path / "fused16", ["train.dtype=bf16", "train.grad_accum_fusion=true"])
    err = max(abs(a - b) / abs(b) for a, b in zip(fused16[0], plain16[0]))
    print(f"bf16, 5 steps x 16 micro-batches: fused vs plain accumulation, max relative loss difference {err:.1e}")
    assert 0 < err < BF16_TOLERANCE  # it changed the numerics (no bf16 rounding), by less than bf16 noise
