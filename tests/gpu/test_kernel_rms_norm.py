"""The fused RMSNorm CUDA kernels (csrc/rms_norm) against engine/ops/reference.py `rms_norm` computed in float64
from the same inputs (the oracle keeps the reference's rounding of the normalized tensor to h's dtype).

Tolerances, elementwise |out - ref| <= rtol * (|ref| + mean |ref|) (the mean term guards values that cancel; for
dh, the mean size of the terms it is the difference of):
fp32 outputs rtol 1e-5; bf16 outputs rtol 1e-2 (bf16 rounding); dweight of bf16 inputs in an fp32 weight 1e-3
(fp32 accumulation). Every output is allocated over NaN-poisoned memory, so an element left unwritten fails.
"""

import itertools

import pytest
import torch

import engine.ops as ops
from engine.ops import norm, reference

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

OPS = ("rms_norm_fwd", "add_rms_norm_fwd", "rms_norm_bwd")
EPS = 1e-5
F32, BF16 = torch.float32, torch.bfloat16
# Llama-3-8B rows x dim, leading dims, dim % 8 != 0 (scalar path), the 16384 limit, tiny rows
SHAPES = [(8192, 4096), (2, 37, 4096), (3, 4104), (5, 16384), (4, 16383), (7, 4095), (33, 8), (6, 1), (64, 100)]


@pytest.fixture(autouse=True)
def _kernels_are_built():
    status = ops.kernel_status()
    for name in OPS:
        assert status[name] == "cuda kernel", f"{name}: {status[name]}"


def _poison():
    """Fill the caching allocator's free blocks (large and small pools) with 0xFF bytes: NaN in fp32 and bf16."""
    torch.cuda.empty_cache()  # free cached blocks go back, so outputs come from the poisoned ones
    blocks = [torch.empty(1 << 30, dtype=torch.uint8, device="cuda")]
    blocks += [torch.empty(512 << 10, dtype=torch.uint8, device="cuda") for _ in range(16)]
    for block in blocks:
        block.fill_(255)
    del blocks


def _rand(shape, dtype, scale=1.0):
    return (torch.randn(shape, device="cuda") * scale).to(dtype)


def _weight(dim, dtype):
    return (1 + 0.2 * torch.randn(dim, device="cuda")).to(dtype)


def _check(out, ref, rtol, what, scale=None):
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert not out.isnan().any(), f"{what}: NaN (an element left unwritten)"
    ref = ref.double()
    err = (out.double() - ref).abs()
    bound = rtol * (ref.abs() + (ref.abs().mean() if scale is None else scale))
    worst = (err - bound).argmax()
    assert (err <= bound).all(), (f"{what}: |err| {err.flatten()[worst]:.3e} > bound {bound.flatten()[worst]:.3e} "
                                  f"at flat index {worst} (ref {ref.flatten()[worst]:.4e}, max err {err.max():.3e})")


def _rtol(dtype):
    return 1e-5 if dtype == F32 else 1e-2


def _oracle_fwd(h, weight):
    """reference.rms_norm(h, weight) in float64: -> (y [..., D], rstd [rows])."""
    h64 = h.double()
    rstd = torch.rsqrt(h64.pow(2).mean(-1, keepdim=True) + EPS)
    return weight.double() * (h64 * rstd).to(h.dtype).double(), rstd.flatten()


def _oracle_bwd(dy, h, weight, rstd, dh_extra):
    """The reference's autograd in float64 (dL/dnormed not rounded): -> (dh, dweight, scale of dh's terms).
    dh is a difference of terms of size |rstd * g| that cancel where D is small (D = 1: dh ~ eps / h^2), so its
    error is measured against their mean size."""
    r = rstd.double().reshape(h.shape[:-1] + (1,))
    n = h.double() * r
    g = dy.double() * weight.double()
    dh = r * (g - n * (g * n).mean(-1, keepdim=True))
    scale = (r * g).abs().mean() + dh.abs().mean()
    if dh_extra is not None:
        dh = dh + dh_extra.double()
        scale = scale + dh_extra.double().abs().mean()
    dweight = (dy.double() * (h.double() * r).to(h.dtype).double()).reshape(-1, h.shape[-1]).sum(0)
    return dh, dweight, scale


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_rms_norm_fwd(shape):
    for x_dtype, w_dtype, out_dtype in itertools.product((F32, BF16), repeat=3):
        x, weight = _rand(shape, x_dtype, 3.0), _weight(shape[-1], w_dtype)
        _poison()
        y, rstd = torch.ops.herd.rms_norm_fwd(x, weight, EPS, out_dtype)
        what = f"x {x_dtype} w {w_dtype} out {out_dtype}"
        assert y.dtype == out_dtype and rstd.dtype == F32, what
        ref_y, ref_rstd = _oracle_fwd(x, weight)
        _check(rstd, ref_rstd, 1e-5, f"rstd, {what}")
        _check(y, ref_y, max(_rtol(x_dtype), _rtol(out_dtype)), f"y, {what}")  # weight values are exact


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_add_rms_norm_fwd(shape):
    for x_dtype, r_dtype, w_dtype, out_dtype in itertools.product((F32, BF16), repeat=4):
        x, residual = _rand(shape, x_dtype), _rand(shape, r_dtype, 3.0)
        weight = _weight(shape[-1], w_dtype)
        _poison()
        y, h, rstd = torch.ops.herd.add_rms_norm_fwd(x, residual, weight, EPS, out_dtype)
        what = f"x {x_dtype} residual {r_dtype} w {w_dtype} out {out_dtype}"
        assert y.dtype == out_dtype and h.dtype == r_dtype and rstd.dtype == F32, what
        # one fp32 add rounded once to the residual's dtype: exact
        assert torch.equal(h, (residual.float() + x.float()).to(r_dtype)), f"h, {what}"
        ref_y, ref_rstd = _oracle_fwd(h, weight)
        _check(rstd, ref_rstd, 1e-5, f"rstd, {what}")
        _check(y, ref_y, max(_rtol(r_dtype), _rtol(out_dtype)), f"y, {what}")


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_rms_norm_bwd(shape):
    for dy_dtype, h_dtype, w_dtype, extra in itertools.product((F32, BF16), (F32, BF16), (F32, BF16), (False, True)):
        h, weight, dy = _rand(shape, h_dtype, 3.0), _weight(shape[-1], w_dtype), _rand(shape, dy_dtype)
        dh_extra = _rand(shape, h_dtype) if extra else None
        rstd = torch.rsqrt(h.float().pow(2).mean(-1) + EPS).flatten()
        _poison()
        dh, dweight = torch.ops.herd.rms_norm_bwd(dy, h, weight, rstd, dh_extra)
        what = f"dy {dy_dtype} h {h_dtype} w {w_dtype} dh_extra {extra}"
        assert dh.dtype == h_dtype and dweight.dtype == w_dtype, what
        ref_dh, ref_dw, scale = _oracle_bwd(dy, h, weight, rstd, dh_extra)
        _check(dh, ref_dh, _rtol(h_dtype), f"dh, {what}", scale)
        dw_rtol = 1e-2 if w_dtype == BF16 else (1e-5 if h_dtype == dy_dtype == F32 else 1e-3)
        _check(dweight, ref_dw, dw_rtol, f"dweight, {what}")


def test_bwd_dweight_is_deterministic():
    h, weight, dy = _rand((8192, 4096), BF16), _weight(4096, F32), _rand((8192, 4096), BF16)
    rstd = torch.rsqrt(h.float().pow(2).mean(-1) + EPS)
    first = torch.ops.herd.rms_norm_bwd(dy, h, weight, rstd, None)
    second = torch.ops.herd.rms_norm_bwd(dy, h, weight, rstd, None)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_misaligned_and_strided_inputs_take_the_scalar_path(dtype):
    rows, dim = 300, 4096
    flat = _rand(rows * dim + 1, dtype, 2.0)
    x = flat[1:].view(rows, dim)  # data_ptr % 16 != 0 with dim % 8 == 0: the scalar path
    weight = _weight(dim, F32)
    _poison()
    y, rstd = torch.ops.herd.rms_norm_fwd(x, weight, EPS, dtype)
    _check(y, _oracle_fwd(x, weight)[0], _rtol(dtype), "misaligned x")
    dy = _rand(rows * dim + 1, dtype)[1:].view(rows, dim)
    dh, dweight = torch.ops.herd.rms_norm_bwd(dy, x, weight, rstd, None)
    ref_dh, ref_dw, scale = _oracle_bwd(dy, x, weight, rstd, None)
    _check(dh, ref_dh, _rtol(dtype), "misaligned dh", scale)
    _check(dweight, ref_dw, 1e-5 if dtype == F32 else 1e-3, "misaligned dweight")
    xt = _rand((dim, 64), dtype).t()  # [64, dim], not contiguous: the binding copies it
    w = _weight(dim, dtype)
    _check(torch.ops.herd.rms_norm_fwd(xt, w, EPS, dtype)[0], _oracle_fwd(xt, w)[0], _rtol(dtype), "strided x")


def test_public_autograd_under_autocast_matches_reference():
    """The model's case: fp32 residual stream and parameters, bf16 branch output, bf16 autocast."""
    shape, dim = (2, 512, 4096), 4096
    x = _rand(shape, BF16).requires_grad_()
    residual = _rand(shape, F32, 3.0).requires_grad_()
    weight = _weight(dim, F32).requires_grad_()
    dy, dh = _rand(shape, BF16), _rand(shape, F32)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y, h = ops.add_rms_norm(x, residual, weight, EPS)
        z = ops.rms_norm(h, weight, EPS)
    assert y.dtype == BF16 and h.dtype == F32 and z.dtype == BF16
    _check(y, _oracle_fwd(h, weight)[0], 1e-2, "autocast y")
    _check(z, reference.rms_norm(h, weight, EPS).double(), 1e-2, "autocast z vs the reference")
    torch.autograd.backward([y, h], [dy, dh])
    ref_dh, ref_dw, scale = _oracle_bwd(dy, h.detach(), weight.detach(), _oracle_fwd(h.detach(), weight)[1], dh)
    _check(residual.grad, ref_dh, 1e-5, "dresidual", scale)
    _check(x.grad, ref_dh, 1e-2, "dx", scale)
    _check(weight.grad, ref_dw, 1e-3, "dweight")


def test_public_rms_norm_autograd_fp32():
    x, weight = _rand((3, 333, 2048), F32, 2.0).requires_grad_(), _weight(2048, F32).requires_grad_()
    dy = _rand((3, 333, 2048), F32)
    y = ops.rms_norm(x, weight, EPS)
    y.backward(dy)
    ref_y, ref_rstd = _oracle_fwd(x.detach(), weight.detach())
    ref_dx, ref_dw, scale = _oracle_bwd(dy, x.detach(), weight.detach(), ref_rstd, None)
    _check(y, ref_y, 1e-5, "y")
    _check(x.grad, ref_dx, 1e-5, "dx", scale)
    _check(weight.grad, ref_dw, 1e-5, "dweight")


def test_out_of_range_dims_and_empty_inputs():
    x, weight = _rand((4, norm.MAX_DIM + 8), F32), _weight(norm.MAX_DIM + 8, F32)
    torch.testing.assert_close(ops.rms_norm(x, weight, EPS), reference.rms_norm(x, weight, EPS))  # reference
    with pytest.raises(RuntimeError, match="rms_norm_fwd: last dim"):
        torch.ops.herd.rms_norm_fwd(x, weight, EPS, F32)
    empty = torch.empty(0, 64, device="cuda")
    y, rstd = torch.ops.herd.rms_norm_fwd(empty, _weight(64, F32), EPS, BF16)
    assert y.shape == (0, 64) and y.dtype == BF16 and rstd.shape == (0,)
    dh, dweight = torch.ops.herd.rms_norm_bwd(empty, empty, _weight(64, F32), rstd, None)
    assert dh.shape == (0, 64) and torch.equal(dweight, torch.zeros(64, device="cuda"))


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_opcheck_on_cuda(dtype):
    x, weight = _rand((3, 5, 64), dtype).requires_grad_(), _weight(64, F32).requires_grad_()
    residual = _rand((3, 5, 64), F32).requires_grad_()
    torch.library.opcheck(torch.ops.herd.rms_norm_fwd.default, (x, weight, EPS, BF16))
    torch.library.opcheck(torch.ops.herd.add_rms_norm_fwd.default, (x, residual, weight, EPS, BF16))
    _, rstd = torch.ops.herd.rms_norm_fwd(x.detach(), weight.detach(), EPS, BF16)
    torch.library.opcheck(torch.ops.herd.rms_norm_bwd.default,
                          (_rand((3, 5, 64), BF16), x.detach(), weight.detach(), rstd, None))
