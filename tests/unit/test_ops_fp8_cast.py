"""herd::fp8_amax / herd::fp8_cast / herd::fp8_delayed_update glue on CPU: the custom ops (CPU kernel = reference)
give the reference's values, their fake impls agree (opcheck), and the public functions on CPU are exactly the
reference (leading dims flattened); delayed scaling's update against steps worked out by hand. The CUDA kernels
themselves are checked in tests/gpu/test_kernel_fp8_cast.py."""

import sys

import pytest
import torch

import engine.ops  # noqa: F401  (defines the herd:: ops)
from engine.ops import reference
from engine.ops.reference import FP8_MAX

public = sys.modules["engine.ops.fp8_cast"]  # engine.ops re-exports the function fp8_cast under the module's name
FP8_DTYPES = [torch.float8_e4m3fn, torch.float8_e5m2]


def sample(shape, dtype, seed=0):
    """Values over many binades (some beyond both formats' range at scale 1) plus +-inf."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.exp(torch.empty(shape).uniform_(-8, 12, generator=g))
    flat = x.view(-1)
    if flat.numel() > 4:
        flat[:2] = torch.tensor([float("inf"), -float("inf")])
    return x.to(dtype)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(1,), (7, 5), (3, 4, 33)])
def test_amax_op_matches_reference(dtype, shape):
    x = sample(shape, dtype)
    got = torch.ops.herd.fp8_amax(x)
    assert got.dtype == torch.float32 and got.dim() == 0
    assert torch.equal(got, reference.fp8_amax(x))
    assert torch.equal(public.fp8_amax(x), reference.fp8_amax(x))


def test_amax_propagates_nan():
    x = torch.tensor([1.0, float("nan"), -3.0])
    assert torch.isnan(torch.ops.herd.fp8_amax(x)) and torch.isnan(public.fp8_amax(x))


@pytest.mark.parametrize("fp8", FP8_DTYPES)
@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cast_op_matches_reference(fp8, transpose, dtype):
    x = sample((37, 20), dtype, seed=1)
    scale = torch.tensor([0.37])
    out, out_t, amax = torch.ops.herd.fp8_cast(x, scale, fp8, transpose)
    ref_out, ref_t, ref_amax = reference.fp8_cast(x, scale, fp8, transpose)
    assert same_bits(out, ref_out) and same_bits(out_t, ref_t) and torch.equal(amax, ref_amax)
    assert out_t.shape == ((20, 37) if transpose else (0,))


@pytest.mark.parametrize("fp8", FP8_DTYPES)
def test_cast_saturates_to_the_largest_finite_value(fp8):
    limit = FP8_MAX[fp8]
    x = torch.tensor([[float("inf"), -float("inf"), 10 * limit, -10 * limit, limit, 0.5]])
    out, _, _ = public.fp8_cast(x, torch.tensor(1.0), fp8, False)
    assert out.float().tolist() == [[limit, -limit, limit, -limit, limit, 0.5]]


@pytest.mark.parametrize("transpose", [False, True])
def test_public_cast_flattens_leading_dims_and_equals_reference(transpose):
    x = sample((2, 3, 16), torch.bfloat16, seed=2)
    scale = torch.tensor([2.5])
    out, out_t, amax = public.fp8_cast(x, scale, torch.float8_e4m3fn, transpose)
    ref_out, ref_t, ref_amax = reference.fp8_cast(x.reshape(6, 16), scale, torch.float8_e4m3fn, transpose)
    assert same_bits(out, ref_out.view(2, 3, 16)) and same_bits(out_t, ref_t) and torch.equal(amax, ref_amax)
    assert out.shape == (2, 3, 16) and out_t.shape == ((16, 6) if transpose else (0,))


def test_only_the_three_public_names_are_exported():
    assert public.__all__ == ["fp8_amax", "fp8_cast", "fp8_delayed_update"]
    assert engine.ops.fp8_amax is public.fp8_amax and engine.ops.fp8_cast is public.fp8_cast
    assert engine.ops.fp8_delayed_update is public.fp8_delayed_update


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_opcheck_amax(dtype):
    torch.library.opcheck(torch.ops.herd.fp8_amax.default, (sample((5, 9), dtype),))


@pytest.mark.parametrize("fp8", FP8_DTYPES)
@pytest.mark.parametrize("transpose", [False, True])
def test_opcheck_cast(fp8, transpose):
    args = (sample((6, 10), torch.bfloat16, seed=3), torch.tensor([0.5]), fp8, transpose)
    torch.library.opcheck(torch.ops.herd.fp8_cast.default, args)


def test_fake_cast_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        x = torch.empty(12, 40, dtype=torch.bfloat16)
        out, out_t, amax = torch.ops.herd.fp8_cast(x, torch.empty(1), torch.float8_e5m2, True)
    assert out.shape == (12, 40) and out_t.shape == (40, 12) and amax.shape == ()
    assert out.dtype == out_t.dtype == torch.float8_e5m2 and amax.dtype == torch.float32


def delayed_state(window, scale, overflows=0):
    return (torch.tensor(window, dtype=torch.float32), torch.tensor(scale, dtype=torch.float32),
            torch.tensor(overflows, dtype=torch.int64))


# (window before, scale used, amax) -> (window after, next scale, overflows added), worked out by hand for e4m3
DELAYED_CASES = [
    ([2.0, 0.0, 0.0], 224.0, 8.0, [8.0, 2.0, 0.0], 448 / 8.0, 1),    # 8 * 224 > 448: the cast saturated
    ([2.0, 1.0, 4.0], 112.0, 1.0, [1.0, 2.0, 1.0], 448 / 2.0, 0),    # 4.0 left the window
    ([2.0, 1.0, 4.0], 112.0, float("inf"), [2.0, 1.0, 4.0], 112.0, 0),  # not recorded, scale unchanged
    ([2.0, 1.0, 4.0], 112.0, float("nan"), [2.0, 1.0, 4.0], 112.0, 0),
    ([0.0, 0.0], 3.0, 0.0, [0.0, 0.0], 3.0, 0),                      # nothing above 0 yet: scale unchanged
    ([0.0], 3.0, 1e-30, [1e-30], 448 / 1e-12, 0),                     # a tiny amax: clamped at 1e-12
]


@pytest.mark.parametrize("before,used,amax,after,next_scale,added", DELAYED_CASES)
def test_delayed_update_step_by_hand(before, used, amax, after, next_scale, added):
    for update in (public.fp8_delayed_update, torch.ops.herd.fp8_delayed_update):  # the function and the op
        history, scale, overflows = delayed_state(before, used, overflows=5)
        inv = update(history, scale, overflows, torch.tensor(amax), FP8_MAX[torch.float8_e4m3fn])
        assert inv.item() == pytest.approx(1 / used, rel=1e-7)
        assert history.tolist() == pytest.approx(after, rel=1e-7)
        assert scale.item() == pytest.approx(next_scale, rel=1e-6) and overflows.item() == 5 + added


def test_delayed_update_returns_a_new_tensor_not_the_scale():
    history, scale, overflows = delayed_state([1.0, 0.0], 448.0)
    inv = public.fp8_delayed_update(history, scale, overflows, torch.tensor(2.0), 448.0)
    assert inv.item() == pytest.approx(1 / 448) and scale.item() == pytest.approx(224.0)  # scale moved, inv did not


def test_opcheck_delayed_update():
    history, scale, overflows = delayed_state([3.0, 1.0, 0.5, 0.0], 100.0)
    torch.library.opcheck(torch.ops.herd.fp8_delayed_update.default,
                          (history, scale, overflows, torch.tensor(7.0), 57344.0))
