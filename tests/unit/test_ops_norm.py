"""The RMSNorm custom ops' glue on CPU (engine/ops/norm.py): the CPU kernels of herd::rms_norm_fwd,
herd::add_rms_norm_fwd and herd::rms_norm_bwd against engine/ops/reference.py `rms_norm` and its autograd, gradcheck
in float64 through the registered autograd, torch.library.opcheck, and the public functions equal to the reference
exactly. The CUDA kernels are checked in tests/gpu/test_kernel_rms_norm.py."""

import pytest
import torch

import engine.ops as ops
from engine.ops import norm, reference

EPS = 1e-5
DTYPES = [torch.float32, torch.bfloat16]


def _inputs(shape, x_dtype, w_dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=gen) * 3).to(x_dtype)
    weight = (1 + 0.1 * torch.randn(shape[-1], generator=gen)).to(w_dtype)
    return x, weight


@pytest.mark.parametrize("x_dtype", DTYPES)
@pytest.mark.parametrize("w_dtype", DTYPES)
def test_forward_ops_equal_the_reference_bitwise(x_dtype, w_dtype):
    x, weight = _inputs((2, 7, 48), x_dtype, w_dtype)
    res = (torch.randn(2, 7, 48) * 2).to(x_dtype)
    out_dtype = torch.promote_types(x_dtype, w_dtype)
    y, rstd = torch.ops.herd.rms_norm_fwd(x, weight, EPS, out_dtype)
    assert torch.equal(y, reference.rms_norm(x, weight, EPS)) and y.dtype == out_dtype
    assert rstd.shape == (14,) and rstd.dtype == torch.float32
    torch.testing.assert_close(rstd, x.float().pow(2).mean(-1).add(EPS).rsqrt().flatten(), rtol=0, atol=0)
    y, h, rstd = torch.ops.herd.add_rms_norm_fwd(x, res, weight, EPS, out_dtype)
    assert torch.equal(h, res + x) and torch.equal(y, reference.rms_norm(res + x, weight, EPS))


def test_forward_op_casts_to_out_dtype_and_add_keeps_residual_dtype():
    x, weight = _inputs((5, 32), torch.bfloat16, torch.float32)
    residual = torch.randn(5, 32)  # fp32 stream, bf16 branch output: the model under autocast
    y, h, rstd = torch.ops.herd.add_rms_norm_fwd(x, residual, weight, EPS, torch.bfloat16)
    assert y.dtype == torch.bfloat16 and h.dtype == torch.float32 and rstd.dtype == torch.float32
    assert torch.equal(h, residual + x.float())
    assert torch.equal(y, reference.rms_norm(h, weight, EPS).to(torch.bfloat16))


def _fwd_y(x, weight):
    return torch.ops.herd.rms_norm_fwd(x, weight, EPS, x.dtype)[0]


def _add_fwd_y_h(x, residual, weight):
    y, h, _ = torch.ops.herd.add_rms_norm_fwd(x, residual, weight, EPS, x.dtype)
    return y, h


def test_gradcheck_rms_norm_fwd_float64():
    x, weight = _inputs((3, 4, 16), torch.float64, torch.float64)
    assert torch.autograd.gradcheck(_fwd_y, (x.requires_grad_(), weight.requires_grad_()))


def test_gradcheck_add_rms_norm_fwd_float64_both_outputs():
    """Gradients reach x and residual through y (the norm) and through h (the residual path, dh_extra)."""
    x, weight = _inputs((3, 16), torch.float64, torch.float64)
    residual = torch.randn(3, 16, dtype=torch.float64)
    assert torch.autograd.gradcheck(_add_fwd_y_h, (x.requires_grad_(), residual.requires_grad_(),
                                                   weight.requires_grad_()))


@pytest.mark.parametrize("x_dtype", DTYPES)
def test_op_gradients_match_the_reference_autograd(x_dtype):
    x, weight = _inputs((4, 9, 40), x_dtype, torch.float32)
    dy = torch.randn(4, 9, 40)
    xr, wr = x.clone().requires_grad_(), weight.clone().requires_grad_()
    reference.rms_norm(xr, wr, EPS).backward(dy)
    xo, wo = x.clone().requires_grad_(), weight.clone().requires_grad_()
    torch.ops.herd.rms_norm_fwd(xo, wo, EPS, torch.float32)[0].backward(dy)
    assert xo.grad.dtype == x_dtype and wo.grad.dtype == torch.float32
    # the reference rounds dL/dnormed to x's dtype before the fp32 chain rule, the op does not
    tol = 1e-5 if x_dtype == torch.float32 else 2e-2
    torch.testing.assert_close(xo.grad.float(), xr.grad.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(wo.grad, wr.grad, rtol=1e-5, atol=1e-5)


def test_add_op_gradients_match_the_reference_autograd():
    x, weight = _inputs((6, 24), torch.bfloat16, torch.float32)
    residual = torch.randn(6, 24)
    dy, dh = torch.randn(6, 24, dtype=torch.bfloat16), torch.randn(6, 24)
    ref = [t.clone().requires_grad_() for t in (x, residual, weight)]
    h = ref[1] + ref[0]
    torch.autograd.backward([reference.rms_norm(h, ref[2], EPS).to(torch.bfloat16), h], [dy, dh])
    got = [t.clone().requires_grad_() for t in (x, residual, weight)]
    y, h, _ = torch.ops.herd.add_rms_norm_fwd(*got, EPS, torch.bfloat16)
    torch.autograd.backward([y, h], [dy, dh])
    assert got[0].grad.dtype == torch.bfloat16 and got[1].grad.dtype == torch.float32
    torch.testing.assert_close(got[1].grad, ref[1].grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[0].grad, ref[0].grad, rtol=1e-2, atol=1e-2)  # bf16 roundings of equal sums
    torch.testing.assert_close(got[2].grad, ref[2].grad, rtol=1e-5, atol=1e-5)


def test_bwd_op_with_and_without_dh_extra():
    x, weight = _inputs((5, 32), torch.float32, torch.float32)
    dy, extra = torch.randn(5, 32), torch.randn(5, 32)
    _, rstd = torch.ops.herd.rms_norm_fwd(x, weight, EPS, torch.float32)
    dx, dw = torch.ops.herd.rms_norm_bwd(dy, x, weight, rstd, None)
    dx2, dw2 = torch.ops.herd.rms_norm_bwd(dy, x, weight, rstd, extra)
    torch.testing.assert_close(dx2, dx + extra, rtol=0, atol=1e-6)
    assert torch.equal(dw, dw2) and dw.shape == (32,)


def test_bwd_op_on_empty_rows():
    dx, dw = torch.ops.herd.rms_norm_bwd(torch.empty(0, 8), torch.empty(0, 8), torch.ones(8), torch.empty(0), None)
    assert dx.shape == (0, 8) and torch.equal(dw, torch.zeros(8))


OPCHECK_DTYPES = [(torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16)]


@pytest.mark.parametrize("x_dtype,w_dtype", OPCHECK_DTYPES)
def test_opcheck_forward_ops(x_dtype, w_dtype):
    x, weight = _inputs((3, 5, 16), x_dtype, w_dtype)
    residual = torch.randn(3, 5, 16)
    out = torch.bfloat16
    torch.library.opcheck(torch.ops.herd.rms_norm_fwd.default,
                          (x.requires_grad_(), weight.requires_grad_(), EPS, out))
    torch.library.opcheck(torch.ops.herd.add_rms_norm_fwd.default,
                          (x, residual.requires_grad_(), weight, EPS, out))


def test_opcheck_bwd_op():
    x, weight = _inputs((4, 16), torch.bfloat16, torch.float32)
    _, rstd = torch.ops.herd.rms_norm_fwd(x, weight, EPS, torch.bfloat16)
    dy = torch.randn(4, 16, dtype=torch.bfloat16)
    torch.library.opcheck(torch.ops.herd.rms_norm_bwd.default, (dy, x, weight, rstd, None))
    torch.library.opcheck(torch.ops.herd.rms_norm_bwd.default, (dy, x, weight, rstd, torch.randn(4, 16)))


@pytest.mark.parametrize("x_dtype", DTYPES)
@pytest.mark.parametrize("w_dtype", DTYPES)
def test_public_functions_on_cpu_are_the_reference_exactly(x_dtype, w_dtype):
    x, weight = _inputs((2, 3, 24), x_dtype, w_dtype)
    residual = torch.randn(2, 3, 24).to(x_dtype)
    dy = torch.randn(2, 3, 24)
    for fn in (ops.rms_norm, reference.rms_norm):
        xi, wi = x.clone().requires_grad_(), weight.clone().requires_grad_()
        y = fn(xi, wi, EPS)
        y.backward(dy.to(y.dtype))
        if fn is ops.rms_norm:
            got = (y, xi.grad, wi.grad)
        else:
            assert all(torch.equal(a, b) for a, b in zip(got, (y, xi.grad, wi.grad)))
    y, h = ops.add_rms_norm(x, residual, weight, EPS)
    assert torch.equal(h, residual + x) and torch.equal(y, reference.rms_norm(residual + x, weight, EPS))


def test_out_dtype_follows_cuda_autocast_else_promotion(monkeypatch):
    x, weight = torch.randn(2, 8), torch.randn(8, dtype=torch.bfloat16)
    assert norm._out_dtype(x, weight) == torch.float32
    assert norm._out_dtype(x.bfloat16(), weight) == torch.bfloat16
    monkeypatch.setattr(torch, "is_autocast_enabled", lambda device=None: device == "cuda")
    monkeypatch.setattr(torch, "get_autocast_dtype", lambda device: torch.bfloat16)
    assert norm._out_dtype(x, weight.float()) == torch.bfloat16


def test_kernel_choice(monkeypatch):
    x, weight = torch.randn(2, 8), torch.randn(8)
    assert not norm._kernel_applies("rms_norm_fwd", torch.float32, x, weight)  # CPU: always the reference
    monkeypatch.setattr(norm.library, "fused", lambda name, tensor: True)  # as on CUDA with the kernel built
    assert norm._kernel_applies("rms_norm_fwd", torch.bfloat16, x, weight)
    assert norm._kernel_applies("add_rms_norm_fwd", torch.float32, x.bfloat16(), weight, x)
    assert not norm._kernel_applies("rms_norm_fwd", torch.float16, x, weight)  # out dtype (fp16 autocast)
    assert not norm._kernel_applies("rms_norm_fwd", torch.float32, x.half(), weight)
    assert not norm._kernel_applies("rms_norm_fwd", torch.float32, x, weight[:4])
    wide = torch.randn(2, norm.MAX_DIM + 8)
    assert not norm._kernel_applies("rms_norm_fwd", torch.float32, wide, torch.randn(norm.MAX_DIM + 8))
    assert norm.MAX_DIM == 16384
