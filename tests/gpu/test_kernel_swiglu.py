"""csrc/swiglu against float64 SwiGLU and its derivative from the same inputs, on a CUDA GPU (benchmarks/gpu/check.sh
runs these).

Tolerances, |out - want| <= atol + rtol * |want| with want the float64 result: fp32 rtol 1e-5; bf16 rtol 2^-8 (one
rounding to bf16's 8 significant bits is at most half an ulp = 2^-8 relative) plus fp32 slack; atol 1e-6 times the
largest |want|, for the cancellation in 1 + g * (1 - sigmoid(g)) near g = -1.28 (fp32 math).
"""

import pytest
import torch

import engine.ops as ops
from engine.ops import reference

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

DEVICE = "cuda"
# Llama-3-8B-like [tokens, ffn] (4096 of the 8192 tokens, to keep the float64 oracle small), a 3-D input, n % 8 = 7
# (bf16 tail), n % 4 = 3 (fp32 tail), n < 8 (tail only), and one element.
SHAPES = [(4096, 14336), (2, 3, 4103), (5, 999), (1, 7), (1,)]
DTYPES = [torch.float32, torch.bfloat16]


def _rtol(dtype):
    return 1e-5 if dtype == torch.float32 else 2 ** -8 + 1e-5


def _assert_close(out, want64, dtype):
    assert out.dtype == dtype and out.shape == want64.shape
    torch.testing.assert_close(out.double(), want64, rtol=_rtol(dtype), atol=1e-6 * want64.abs().max().item())


def _swiglu64(gate, up):
    g, u = gate.double(), up.double()
    return g * torch.sigmoid(g) * u


def _swiglu_grads64(dout, gate, up):
    d, g, u = dout.double(), gate.double(), up.double()
    sig = torch.sigmoid(g)
    return d * u * sig * (1 + g * (1 - sig)), d * g * sig


def _inputs(shape, dtype, count, seed, offset=0):
    """`count` tensors [shape] (gate scaled to +-15, where sigmoid saturates), `offset` elements into fresh buffers
    (an offset of 3 makes them misaligned: the kernels' scalar path)."""
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    n = 1
    for size in shape:
        n *= size
    out = []
    for i in range(count):
        buf = (torch.randn(n + offset, generator=gen, device=DEVICE) * (3 if i == 1 else 1.5)).to(dtype)
        out.append(buf[offset:].view(shape))
    return out


def _poison_allocator():
    """Fill cached free blocks with 0xFF bytes (NaN in bf16 and fp32), so an output element that a kernel leaves
    unwritten shows up as NaN."""
    blocks = [torch.full((n,), 255, dtype=torch.uint8, device=DEVICE) for n in [1 << 29, 1 << 26] + [1 << 18] * 16]
    del blocks


def test_swiglu_kernels_are_built():
    status = ops.kernel_status()
    assert status["swiglu_fwd"] == "cuda kernel" and status["swiglu_bwd"] == "cuda kernel", status


@pytest.mark.parametrize("shape", SHAPES, ids=["x".join(map(str, s)) for s in SHAPES])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("offset", [0, 3], ids=["aligned", "misaligned"])
def test_swiglu_fwd_and_bwd_match_float64(shape, dtype, offset):
    dout, gate, up = _inputs(shape, dtype, 3, seed=len(shape) * 1000 + shape[-1] + offset, offset=offset)
    _poison_allocator()
    out = torch.ops.herd.swiglu_fwd(gate, up)
    _assert_close(out, _swiglu64(gate, up), dtype)
    _poison_allocator()
    dgate, dup = torch.ops.herd.swiglu_bwd(dout, gate, up)
    want_dgate, want_dup = _swiglu_grads64(dout, gate, up)
    _assert_close(dgate, want_dgate, dtype)
    _assert_close(dup, want_dup, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_swiglu_non_contiguous_inputs(dtype):
    """Transposed inputs: the binding makes them contiguous; outputs keep the logical shape."""
    dout, gate, up = (t.t() for t in _inputs((640, 96), dtype, 3, seed=11))  # [96, 640] views, strides (1, 96)
    _assert_close(torch.ops.herd.swiglu_fwd(gate, up), _swiglu64(gate, up), dtype)
    dgate, dup = torch.ops.herd.swiglu_bwd(dout, gate, up)
    want_dgate, want_dup = _swiglu_grads64(dout, gate, up)
    _assert_close(dgate, want_dgate, dtype)
    _assert_close(dup, want_dup, dtype)


def test_swiglu_saturated_and_empty_inputs():
    gate = torch.tensor([-100.0, -30.0, -1.2785, 0.0, 30.0, 100.0], device=DEVICE)
    up = torch.full_like(gate, 2.0)
    out = torch.ops.herd.swiglu_fwd(gate, up)
    dgate, dup = torch.ops.herd.swiglu_bwd(torch.ones_like(gate), gate, up)
    for got, want in ((out, _swiglu64(gate, up)), (dgate, _swiglu_grads64(torch.ones_like(gate), gate, up)[0]),
                      (dup, _swiglu_grads64(torch.ones_like(gate), gate, up)[1])):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    empty = torch.empty(0, 14336, device=DEVICE, dtype=torch.bfloat16)
    assert torch.ops.herd.swiglu_fwd(empty, empty).shape == (0, 14336)
    assert torch.ops.herd.swiglu_bwd(empty, empty, empty)[0].shape == (0, 14336)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_swiglu_autograd_matches_reference_autograd(dtype):
    dout, gate, up = _inputs((512, 1000), dtype, 3, seed=21)
    gate, up = gate.clone().requires_grad_(), up.clone().requires_grad_()
    out = ops.swiglu(gate, up)
    assert "herd_swiglu_fwd" in out.grad_fn.name()  # the fused op, not the reference's graph
    dgate, dup = torch.autograd.grad(out, (gate, up), dout)
    want = reference.swiglu(gate, up)
    want_dgate, want_dup = torch.autograd.grad(want, (gate, up), dout)
    # both are fp32 math; the reference rounds its intermediates (silu, the products) to bf16 as well
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2 ** -6, atol=1e-3)
    for got, ref in ((out, want), (dgate, want_dgate), (dup, want_dup)):
        torch.testing.assert_close(got, ref, **dict(tol, atol=tol["atol"] * ref.abs().max().item()))
    _assert_close(dgate, _swiglu_grads64(dout, gate.detach(), up.detach())[0], dtype)
