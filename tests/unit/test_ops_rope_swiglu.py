"""The herd::rope_ and herd::swiglu_{fwd,bwd} custom ops on CPU (their reference kernels): values and gradients
through the ops and their autograd glue equal the references' autograd, opcheck passes, and the public functions on
CPU are exactly the references. The CUDA kernels are checked in tests/gpu/test_kernel_{rope,swiglu}.py."""

import importlib

import pytest
import torch

import engine.ops as ops
from engine.ops import library, reference

rope = importlib.import_module("engine.ops.rope")
swiglu = importlib.import_module("engine.ops.swiglu")  # engine.ops.swiglu the attribute is the public function

B, S, HQ, HK, D = 2, 5, 4, 2, 8


def _tables(dtype=torch.float32, b=B, s=S, d=D, seed=0):
    """cos, sin [b, s, 1, d/2] of random angles (any angle: the op takes the tables as given)."""
    angles = torch.rand(b, s, 1, d // 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 20
    return angles.cos().to(dtype), angles.sin().to(dtype)


def _qk(dtype, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(B, S, HQ, D, generator=gen, dtype=torch.float64).to(dtype),
            torch.randn(B, S, HK, D, generator=gen, dtype=torch.float64).to(dtype))


def _fused_on_cpu(monkeypatch, *names):
    """Make the public functions take their fused path on CPU (through the ops' CPU kernels)."""
    real = library.fused
    monkeypatch.setattr(library, "fused", lambda name, t: name in names or real(name, t))


# ----------------------------------------------------------------------------------------------------- rope


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_op_equals_reference_and_inverse_restores(dtype):
    q, k = _qk(dtype)
    cos, sin = _tables()
    q0, k0 = q.clone(), k.clone()
    torch.ops.herd.rope_(q, k, cos, sin, False)
    assert torch.equal(q, reference.apply_rope(q0, cos, sin)) and torch.equal(k, reference.apply_rope(k0, cos, sin))
    torch.ops.herd.rope_(q, k, cos, sin, True)
    tol = dict(rtol=0, atol=1e-5) if dtype == torch.float32 else dict(rtol=2 ** -7, atol=2 ** -7)
    torch.testing.assert_close(q, q0, **tol)
    torch.testing.assert_close(k, k0, **tol)


def test_rope_op_inverse_is_the_transpose():
    """<R x, y> = <x, R^T y>: the inverse rotation is the adjoint, so it is the backward."""
    x, _ = _qk(torch.float64)
    y, _ = _qk(torch.float64, seed=2)
    cos, sin = _tables(torch.float64)
    rx, ry, empty = x.clone(), y.clone(), torch.empty(B, S, 0, D, dtype=torch.float64)
    torch.ops.herd.rope_(rx, empty, cos, sin, False)
    torch.ops.herd.rope_(ry, empty, cos, sin, True)
    torch.testing.assert_close((rx * y).sum(), (x * ry).sum(), rtol=1e-12, atol=1e-12)


def test_rope_opcheck():
    q, k = _qk(torch.float32)
    cos, sin = _tables()
    for inverse in (False, True):
        torch.library.opcheck(torch.ops.herd.rope_.default, (q.clone(), k.clone(), cos, sin, inverse))


@pytest.mark.parametrize("inverse", [False, True])
def test_rope_out_of_place_op_equals_in_place_and_leaves_inputs(inverse):
    """herd::rope (the backward's one pass) gives herd::rope_'s values in new tensors, reads q and k even when they
    are one tensor or not contiguous, and changes neither."""
    q, k = _qk(torch.bfloat16)
    cos, sin = _tables()
    want_q, want_k = q.clone(), k.clone()
    torch.ops.herd.rope_(want_q, want_k, cos, sin, inverse)
    q0, k0 = q.clone(), k.clone()
    got_q, got_k = torch.ops.herd.rope(q, k, cos, sin, inverse)
    assert torch.equal(got_q, want_q) and torch.equal(got_k, want_k)
    assert torch.equal(q, q0) and torch.equal(k, k0) and got_q.data_ptr() != q.data_ptr()
    shared = q.transpose(1, 2).contiguous().transpose(1, 2)  # not contiguous; passed as both q and k
    got_a, got_b = torch.ops.herd.rope(shared, shared, cos, sin, inverse)
    assert got_a.is_contiguous() and torch.equal(got_a, want_q) and torch.equal(got_b, want_q)
    torch.library.opcheck(torch.ops.herd.rope.default, (q, k, cos, sin, inverse))


def test_rope_function_gradcheck_float64():
    q, k = (t.requires_grad_() for t in _qk(torch.float64))
    cos, sin = _tables(torch.float64)
    # clones: the Function rotates its inputs in place, and gradcheck reuses its inputs for every evaluation
    fn = lambda q, k: rope._RopeQK.apply(q.clone(), k.clone(), cos, sin, q.shape, k.shape)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k))


def _linear_qk_loss(rope_fn, x0, wq, wk, gq, shared_grad=False):
    """x -> Linear -> .view [b, s, heads, d] (the model's q, k) -> RoPE -> loss; returns outputs and gradients."""
    x = x0.clone().requires_grad_()
    for w in (wq, wk):
        w.grad = None
    q_lin, k_lin = wq(x), wk(x)
    q, k = q_lin.view(B, S, HQ, D), k_lin.view(B, S, -1, D)
    q_rot, k_rot = rope_fn(q, k)
    if shared_grad:  # AddBackward hands one gradient tensor to both q_rot and k_rot
        loss = ((q_rot + k_rot) * gq).sum()
    else:
        loss = (q_rot * gq).sum() + (k_rot ** 2).sum()
    loss.backward()
    return [q_rot.detach().clone(), k_rot.detach().clone(), x.grad, wq.weight.grad, wk.weight.grad], q_lin, q_rot


@pytest.mark.parametrize("shared_grad", [False, True])
def test_apply_rope_qk_fused_path_on_linear_views_matches_reference_autograd(monkeypatch, shared_grad):
    torch.manual_seed(0)
    hk = HQ if shared_grad else HK
    wq = torch.nn.Linear(16, HQ * D, bias=False)
    wk = torch.nn.Linear(16, hk * D, bias=False)
    x0, gq = torch.randn(B, S, 16), torch.randn(B, S, HQ, D)
    cos, sin = _tables()
    ref_fn = lambda q, k: (reference.apply_rope(q, cos, sin), reference.apply_rope(k, cos, sin))  # noqa: E731
    want, _, _ = _linear_qk_loss(ref_fn, x0, wq, wk, gq, shared_grad)
    _fused_on_cpu(monkeypatch, "rope_")
    got, q_lin, q_rot = _linear_qk_loss(lambda q, k: ops.apply_rope_qk(q, k, cos, sin), x0, wq, wk, gq, shared_grad)
    assert q_rot.data_ptr() == q_lin.data_ptr()  # rotated in place in the Linear's output, no copy
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])  # same fp32 operations as the reference
    for g, w in zip(got[2:], want[2:]):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_inplace_target_uses_the_base_of_whole_views_and_copies_otherwise():
    lin = torch.randn(B, S, HQ * D)  # a Linear's output
    assert rope._inplace_target(lin.view(B, S, HQ, D)) is lin
    whole = torch.randn(B, S, HQ, D)
    assert rope._inplace_target(whole) is whole
    for x in (torch.randn(B, S, D, HQ).transpose(2, 3),  # not contiguous
              torch.randn(B, S, 2 * HQ, D)[:, :, :HQ],  # part of its base
              torch.randn(B, S, HQ, D, requires_grad=True)):  # a leaf that requires grad
        target = rope._inplace_target(x)
        assert target.is_contiguous() and target.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()
        assert torch.equal(target, x.detach())


def test_apply_rope_qk_fused_path_copies_leaves_instead_of_failing(monkeypatch):
    _fused_on_cpu(monkeypatch, "rope_")
    q, k = (t.requires_grad_() for t in _qk(torch.float32))
    cos, sin = _tables()
    q_rot, k_rot = ops.apply_rope_qk(q, k, cos, sin)
    assert torch.equal(q_rot, reference.apply_rope(q.detach(), cos, sin))
    (q_rot.sum() + k_rot.sum()).backward()
    q2, k2 = (t.detach().clone().requires_grad_() for t in (q, k))
    (reference.apply_rope(q2, cos, sin).sum() + reference.apply_rope(k2, cos, sin).sum()).backward()
    torch.testing.assert_close(q.grad, q2.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(k.grad, k2.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apply_rope_qk_on_cpu_is_the_reference_exactly(dtype):
    q, k = (t.requires_grad_() for t in _qk(dtype))
    cos, sin = _tables()
    q_rot, k_rot = ops.apply_rope_qk(q, k, cos, sin)
    assert torch.equal(q_rot, reference.apply_rope(q, cos, sin))
    assert torch.equal(k_rot, reference.apply_rope(k, cos, sin))
    assert ops.apply_rope is reference.apply_rope


# ----------------------------------------------------------------------------------------------------- swiglu


def _gate_up(dtype, shape=(3, 7, 24), seed=3):
    gen = torch.Generator().manual_seed(seed)
    return tuple((torch.randn(shape, generator=gen, dtype=torch.float64) * 3).to(dtype) for _ in range(2))


def test_swiglu_ops_gradcheck_float64():
    gate, up = (t.requires_grad_() for t in _gate_up(torch.float64, shape=(4, 6)))
    assert torch.autograd.gradcheck(torch.ops.herd.swiglu_fwd, (gate, up))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_ops_equal_reference_autograd(dtype):
    gate, up = (t.requires_grad_() for t in _gate_up(dtype))
    dout = torch.randn(gate.shape, dtype=torch.float64).to(dtype)
    out = torch.ops.herd.swiglu_fwd(gate, up)
    dgate, dup = torch.autograd.grad(out, (gate, up), dout)
    want = reference.swiglu(gate, up)
    want_dgate, want_dup = torch.autograd.grad(want, (gate, up), dout)
    # fp32 math either way; the op rounds each result once, the reference (in bf16) its intermediates too
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2 ** -6, atol=2 ** -6)
    if dtype == torch.float32:
        assert torch.equal(out, want)
    torch.testing.assert_close(out, want, **tol)
    assert torch.equal(out, reference.swiglu(gate.float(), up.float()).to(dtype))  # fp32, rounded once
    torch.testing.assert_close(dgate, want_dgate, **tol)
    torch.testing.assert_close(dup, want_dup, **tol)


def test_swiglu_opcheck():
    gate, up = _gate_up(torch.float32)
    dout = torch.randn_like(gate)
    torch.library.opcheck(torch.ops.herd.swiglu_fwd.default, (gate, up))
    torch.library.opcheck(torch.ops.herd.swiglu_fwd.default, (gate.requires_grad_(), up.requires_grad_()))
    torch.library.opcheck(torch.ops.herd.swiglu_bwd.default, (dout, gate.detach(), up.detach()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_on_cpu_is_the_reference_exactly(dtype):
    gate, up = (t.requires_grad_() for t in _gate_up(dtype))
    out = ops.swiglu(gate, up)
    out.sum().backward()
    g2, u2 = (t.detach().clone().requires_grad_() for t in (gate, up))
    want = reference.swiglu(g2, u2)
    want.sum().backward()
    assert torch.equal(out, want) and torch.equal(gate.grad, g2.grad) and torch.equal(up.grad, u2.grad)


def test_swiglu_fused_path_takes_the_op(monkeypatch):
    _fused_on_cpu(monkeypatch, "swiglu_fwd")
    gate, up = (t.requires_grad_() for t in _gate_up(torch.float32))
    out = swiglu.swiglu(gate, up)
    assert "herd_swiglu_fwd" in out.grad_fn.name()  # the op's registered autograd, not the reference's graph
    torch.testing.assert_close(out, reference.swiglu(gate, up))
    out.backward(torch.ones_like(out))
    dgate, dup = swiglu.swiglu_bwd_reference(torch.ones_like(out), gate.detach(), up.detach())
    assert torch.equal(gate.grad, dgate) and torch.equal(up.grad, dup)
