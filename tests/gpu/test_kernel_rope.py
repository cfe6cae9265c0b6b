"""csrc/rope against a float64 rotation of the same inputs, on a CUDA GPU (benchmarks/gpu/check.sh runs these).

Tolerances, |out - want| <= atol + rtol * |want| with want the float64 result: fp32 rtol 1e-5; bf16 rtol 2^-8 (one
rounding to bf16's 8 significant bits is at most half an ulp = 2^-8 relative) plus fp32 slack; atol 1e-6 times the
largest input, for the cancellation in x1 * cos - x2 * sin (fp32 math).
"""

import pytest
import torch

import engine.ops as ops
from engine.ops import reference

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

DEVICE = "cuda"

# (b, s, hq, hk, d): Llama-3-8B-like GQA 32/8, odd token counts, head counts that are not multiples of the kernel's
# 4-head groups, d = 256 (largest), and head dims whose half is not a multiple of the 16-byte vector (scalar path).
SHAPES = [(1, 2048, 32, 8, 128), (2, 129, 32, 8, 128), (3, 17, 5, 3, 64), (1, 33, 7, 1, 256), (2, 9, 3, 2, 6),
          (1, 5, 4, 4, 2), (2, 7, 6, 2, 24)]
DTYPES = [torch.float32, torch.bfloat16]


def _rtol(dtype):
    return 1e-5 if dtype == torch.float32 else 2 ** -8 + 1e-5


def _assert_close(out, want64, dtype, scale):
    torch.testing.assert_close(out.double(), want64, rtol=_rtol(dtype), atol=1e-6 * scale)


def _rotate64(x, cos, sin, inverse=False):
    """Float64 RoPE (half-split pairs) of x [b, s, h, d] by the angles of cos, sin [b or 1, s, 1, d/2]."""
    x, cos, sin = x.double(), cos.double(), sin.double()
    sin = -sin if inverse else sin
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def _tables(b, s, d, seed=0):
    """cos, sin [b, s, 1, d/2] fp32 of position * frequency angles (positions up to 8192, as the model's)."""
    gen = torch.Generator().manual_seed(seed)
    pos = torch.randint(0, 8192, (b, s, 1, 1), generator=gen).float()
    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, d, 2).float() / d))  # [d/2]
    angles = pos * inv_freq
    return angles.cos().to(DEVICE), angles.sin().to(DEVICE)


def _padded(shape, dtype, offset, gen):
    """(buffer, x): x [shape] a contiguous view `offset` elements into a random buffer that has 8 spare elements
    after it. The buffer starts 16-byte aligned, so an offset of 8 keeps x aligned for bf16 and fp32 (the kernel's
    vector path) and an offset of 11 does not (its scalar path)."""
    n = 1
    for size in shape:
        n *= size
    buf = torch.randn(offset + n + 8, generator=gen, device=DEVICE).to(dtype)
    return buf, buf[offset: offset + n].view(shape)


def _untouched(buf_after, buf_before, x):
    start = x.storage_offset()
    assert torch.equal(buf_after[:start], buf_before[:start])
    assert torch.equal(buf_after[start + x.numel():], buf_before[start + x.numel():])


def _poison_allocator():
    """Fill cached free blocks with 0xFF bytes (NaN in bf16 and fp32), so an output element that a kernel leaves
    unwritten shows up as NaN."""
    blocks = [torch.full((n,), 255, dtype=torch.uint8, device=DEVICE) for n in [1 << 28, 1 << 26] + [1 << 18] * 16]
    del blocks


def test_rope_kernel_is_built():
    assert ops.kernel_status()["rope_"] == "cuda kernel"


@pytest.mark.parametrize("shape", SHAPES, ids=[f"{b}x{s}x{hq}/{hk}x{d}" for b, s, hq, hk, d in SHAPES])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("offset", [8, 11], ids=["aligned", "misaligned"])
def test_rope_forward_and_inverse_match_float64(shape, dtype, offset):
    b, s, hq, hk, d = shape
    gen = torch.Generator(device=DEVICE).manual_seed(sum(shape) * 100 + offset)
    q_buf, q = _padded((b, s, hq, d), dtype, offset, gen)
    k_buf, k = _padded((b, s, hk, d), dtype, offset, gen)
    cos, sin = _tables(b, s, d)
    q0, k0, q_buf0, k_buf0 = q.clone(), k.clone(), q_buf.clone(), k_buf.clone()
    scale = max(q0.abs().max().item(), k0.abs().max().item())

    torch.ops.herd.rope_(q, k, cos, sin, False)
    _assert_close(q, _rotate64(q0, cos, sin), dtype, scale)
    _assert_close(k, _rotate64(k0, cos, sin), dtype, scale)
    _untouched(q_buf, q_buf0, q)
    _untouched(k_buf, k_buf0, k)

    q1, k1 = q.clone(), k.clone()
    torch.ops.herd.rope_(q, k, cos, sin, True)  # the inverse of the rounded forward result
    _assert_close(q, _rotate64(q1, cos, sin, inverse=True), dtype, scale)
    _assert_close(k, _rotate64(k1, cos, sin, inverse=True), dtype, scale)
    # and back to the input: two roundings, each at most 2^-8 of a pair's norm for bf16
    round_trip = dict(rtol=0, atol=1e-5 * scale) if dtype == torch.float32 else dict(rtol=0, atol=2 ** -7 * scale)
    torch.testing.assert_close(q, q0, **round_trip)
    torch.testing.assert_close(k, k0, **round_trip)
    _untouched(q_buf, q_buf0, q)
    _untouched(k_buf, k_buf0, k)


@pytest.mark.parametrize("shape", SHAPES, ids=[f"{b}x{s}x{hq}/{hk}x{d}" for b, s, hq, hk, d in SHAPES])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("inverse", [False, True], ids=["fwd", "inverse"])
def test_rope_out_of_place_matches_float64_and_in_place(shape, dtype, inverse):
    """herd::rope (the backward's pass) writes into fresh (poisoned) memory what herd::rope_ writes in place and
    what the eager reference computes, bit for bit (no FMA contraction in the kernel), from misaligned inputs (the
    scalar path) too, and leaves its inputs alone."""
    b, s, hq, hk, d = shape
    gen = torch.Generator(device=DEVICE).manual_seed(sum(shape) * 10 + inverse)
    for offset in (8, 11):
        q_buf, q = _padded((b, s, hq, d), dtype, offset, gen)
        k_buf, k = _padded((b, s, hk, d), dtype, offset, gen)
        cos, sin = _tables(b, s, d)
        q_buf0, k_buf0 = q_buf.clone(), k_buf.clone()
        scale = max(q.abs().max().item(), k.abs().max().item())
        _poison_allocator()
        got_q, got_k = torch.ops.herd.rope(q, k, cos, sin, inverse)
        _assert_close(got_q, _rotate64(q, cos, sin, inverse), dtype, scale)
        _assert_close(got_k, _rotate64(k, cos, sin, inverse), dtype, scale)
        assert torch.equal(q_buf, q_buf0) and torch.equal(k_buf, k_buf0)
        want_q, want_k = q.clone(), k.clone()  # aligned copies: the vector path when the shape allows it
        torch.ops.herd.rope_(want_q, want_k, cos, sin, inverse)
        assert torch.equal(got_q, want_q) and torch.equal(got_k, want_k)
        signed_sin = -sin if inverse else sin
        assert torch.equal(got_q, reference.apply_rope(q, cos, signed_sin))
        assert torch.equal(got_k, reference.apply_rope(k, cos, signed_sin))


def test_rope_out_of_place_reads_one_tensor_as_q_and_k_and_any_layout():
    b, s, h, d = 2, 33, 4, 64
    g = torch.randn(b, h, s, d, device=DEVICE).transpose(1, 2)  # [b, s, h, d], not contiguous
    cos, sin = _tables(b, s, d)
    got_q, got_k = torch.ops.herd.rope(g, g, cos, sin, True)
    want = _rotate64(g, cos, sin, inverse=True)
    assert got_q.is_contiguous() and got_k.data_ptr() != got_q.data_ptr()
    _assert_close(got_q, want, torch.float32, g.abs().max().item())
    assert torch.equal(got_q, got_k)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_rope_broadcast_and_strided_tables(dtype):
    """cos/sin [1, s, 1, d/2] broadcast over the batch, and non-contiguous tables: the binding copies them."""
    b, s, hq, hk, d = 3, 40, 8, 2, 128
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(b, s, hq, d, generator=gen).to(dtype).to(DEVICE)
    k = torch.randn(b, s, hk, d, generator=gen).to(dtype).to(DEVICE)
    cos, sin = _tables(1, s, d)
    cos_strided = torch.stack([cos, cos], dim=-1)[..., 0]  # same values, last-dim stride 2
    q0, k0 = q.clone(), k.clone()
    torch.ops.herd.rope_(q, k, cos_strided, sin, False)
    _assert_close(q, _rotate64(q0, cos, sin), dtype, q0.abs().max().item())
    _assert_close(k, _rotate64(k0, cos, sin), dtype, k0.abs().max().item())


def test_rope_rejects_what_it_cannot_rotate_in_place():
    q = torch.randn(1, 4, 2, 8, device=DEVICE)
    cos, sin = _tables(1, 4, 8)
    with pytest.raises(RuntimeError, match="contiguous"):
        torch.ops.herd.rope_(q.transpose(1, 2), q.clone().transpose(1, 2), cos, sin, False)
    with pytest.raises(RuntimeError, match="share memory"):
        torch.ops.herd.rope_(q, q, cos, sin, False)
    with pytest.raises(RuntimeError, match="even"):
        torch.ops.herd.rope_(q[..., :7].contiguous(), q[..., :7].contiguous(), cos, sin, False)


def test_rope_empty_sequence_is_a_no_op():
    q, k = torch.empty(2, 0, 4, 8, device=DEVICE), torch.empty(2, 0, 2, 8, device=DEVICE)
    cos, sin = torch.empty(2, 0, 1, 4, device=DEVICE), torch.empty(2, 0, 1, 4, device=DEVICE)
    torch.ops.herd.rope_(q, k, cos, sin, False)
    torch.cuda.synchronize()


def _reference_grads(q_src, k_src, cos, sin, gq, gk):
    q_ref, k_ref = (t.detach().clone().requires_grad_() for t in (q_src, k_src))
    out_q, out_k = reference.apply_rope(q_ref, cos, sin), reference.apply_rope(k_ref, cos, sin)
    torch.autograd.backward((out_q, out_k), (gq, gk))
    return out_q.detach(), out_k.detach(), q_ref.grad, k_ref.grad


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(2, 256, 32, 8, 128), (1, 9, 4, 4, 6)], ids=["llama", "small"])
def test_apply_rope_qk_gradients_match_reference_autograd(dtype, shape):
    b, s, hq, hk, d = shape
    gen = torch.Generator().manual_seed(7)
    q_src, k_src = (torch.randn(b, s, h, d, generator=gen).to(dtype).to(DEVICE).requires_grad_() for h in (hq, hk))
    gq, gk = (torch.randn(b, s, h, d, generator=gen).to(dtype).to(DEVICE) for h in (hq, hk))
    cos, sin = _tables(b, s, d)
    q, k = q_src.clone(), k_src.clone()  # non-leaf, not views: rotated in place
    gq0, gk0 = gq.clone(), gk.clone()
    q_rot, k_rot = ops.apply_rope_qk(q, k, cos, sin)
    assert q_rot.data_ptr() == q.data_ptr() and k_rot.data_ptr() == k.data_ptr()
    _poison_allocator()
    torch.autograd.backward((q_rot, k_rot), (gq, gk))
    want_q, want_k, want_dq, want_dk = _reference_grads(q_src, k_src, cos, sin, gq, gk)
    scale = max(q_src.abs().max().item(), k_src.abs().max().item())
    gscale = max(gq.abs().max().item(), gk.abs().max().item())
    # the reference rounds once from fp32 too: equal up to one rounding each way
    ulp = dict(rtol=2 * _rtol(dtype), atol=1e-6 * scale)
    torch.testing.assert_close(q_rot.detach(), want_q, **ulp)
    torch.testing.assert_close(k_rot.detach(), want_k, **ulp)
    torch.testing.assert_close(q_src.grad, want_dq, **dict(ulp, atol=1e-6 * gscale))
    torch.testing.assert_close(k_src.grad, want_dk, **dict(ulp, atol=1e-6 * gscale))
    _assert_close(q_src.grad, _rotate64(gq, cos, sin, inverse=True), dtype, gscale)
    _assert_close(k_src.grad, _rotate64(gk, cos, sin, inverse=True), dtype, gscale)
    assert torch.equal(gq, gq0) and torch.equal(gk, gk0)  # the incoming gradients were not rotated in place


def test_apply_rope_qk_on_linear_views_and_a_shared_gradient():
    """The model's q, k (views of Linear outputs) are rotated in the Linear outputs' memory; a gradient that
    autograd hands to both q_rot and k_rot (q_rot + k_rot) is not corrupted."""
    b, s, h, d, dim = 2, 64, 4, 64, 96
    torch.manual_seed(3)
    wq, wk = (torch.nn.Linear(dim, h * d, bias=False, device=DEVICE) for _ in range(2))
    x0, g = torch.randn(b, s, dim, device=DEVICE), torch.randn(b, s, h, d, device=DEVICE)
    cos, sin = _tables(b, s, d)

    def run(fn):
        x = x0.clone().requires_grad_()
        q_lin, k_lin = wq(x), wk(x)
        q_rot, k_rot = fn(q_lin.view(b, s, h, d), k_lin.view(b, s, h, d))
        ((q_rot + k_rot) * g).sum().backward()
        return q_lin, q_rot, x.grad

    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # TF32 would round the two paths' tiny differences apart
    try:
        q_lin, q_rot, dx = run(lambda q, k: ops.apply_rope_qk(q, k, cos, sin))
        _, want_q, want_dx = run(lambda q, k: (reference.apply_rope(q, cos, sin), reference.apply_rope(k, cos, sin)))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    assert q_rot.data_ptr() == q_lin.data_ptr()
    torch.testing.assert_close(q_rot.detach(), want_q.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx, want_dx, rtol=1e-4, atol=1e-4 * want_dx.abs().max().item())
