"""The FP8 casts fused into RMSNorm and SwiGLU on a CUDA GPU (herd::rms_norm_fp8_fwd in csrc/rms_norm,
herd::swiglu_fp8_fwd in csrc/swiglu, the byte transpose in csrc/fp8_cast; engine/ops/fp8_fused.py).

Against the unfused kernels, bit for bit: the fused norm runs the plain forward's code (same launch shape, same
sum-of-squares order) and SwiGLU the same per-element math, then the cast csrc/fp8_cast does (saturate, round to
nearest even), so q, q^T, amax, rstd and h must equal herd::(add_)rms_norm_fwd or herd::swiglu_fwd followed by
herd::fp8_cast. Against the op's reference (the same composition in torch), within what the kernels' own
tolerances allow: the reference's rstd and silu differ from the kernels' in the last bits, which moves an fp8 value
by at most one step (e4m3: 2^-3 relative, 2^-9 absolute at the bottom). Then a model with both switches trains two
steps on the GPU bitwise like the unfused one. Outputs land in memory poisoned with 0xFF bytes.
"""

import pytest
import torch

import engine.ops as ops
from engine.config import FP8Config
from engine.ops import fp8_fused

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

E4M3, F32, BF16 = torch.float8_e4m3fn, torch.float32, torch.bfloat16
NORM_SHAPES = [(8192, 4096), (2, 37, 4096), (3, 4112), (5, 16384), (33, 64), "unaligned"]
SWIGLU_SHAPES = [(8192, 14336), (3, 5, 100), (37, 48)]


@pytest.fixture(autouse=True)
def _kernels_are_built():
    status = ops.kernel_status()
    for name in ("rms_norm_fp8_fwd", "swiglu_fp8_fwd", "rms_norm_fwd", "swiglu_fwd", "fp8_cast"):
        assert status[name] == "cuda kernel", f"{name}: {status[name]}"


def _poison():
    torch.cuda.empty_cache()
    blocks = [torch.empty(1 << 30, dtype=torch.uint8, device="cuda")]
    blocks += [torch.empty(512 << 10, dtype=torch.uint8, device="cuda") for _ in range(16)]
    for block in blocks:
        block.fill_(255)
    del blocks


def _same_bits(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def _within_one_fp8_step(got, want):
    g, w = got.float(), want.float()
    return bool(((g - w).abs() <= w.abs() / 8 + 2.0 ** -9).all())


def _scale_saturating(y_amax: float) -> torch.Tensor:
    """Maps half the amax to e4m3's max: the top values saturate, so SATFINITE is in the comparison."""
    return torch.tensor(448.0 / (0.5 * y_amax), device="cuda")


@pytest.mark.parametrize("shape", NORM_SHAPES)
@pytest.mark.parametrize("x_dtype,residual_dtype,weight_dtype,norm_dtype",
                         [(BF16, None, F32, BF16), (BF16, F32, F32, BF16), (BF16, BF16, BF16, BF16),
                          (F32, None, F32, F32), (F32, F32, BF16, F32)])
@pytest.mark.parametrize("transpose", [True, False])
def test_norm_cast_is_bitwise_the_unfused_kernels(shape, x_dtype, residual_dtype, weight_dtype, norm_dtype,
                                                  transpose):
    offset = 0
    if shape == "unaligned":  # x one element into its storage: not 16-byte aligned, the kernel's scalar path
        shape, offset = (37, 4096), 1
    x = (torch.randn(torch.Size(shape).numel() + offset, device="cuda") * 3).to(x_dtype)[offset:].view(shape)
    residual = torch.randn(shape, device="cuda").to(residual_dtype) if residual_dtype else None
    weight = (1 + 0.2 * torch.randn(shape[-1], device="cuda")).to(weight_dtype)
    if residual is None:
        y, rstd = torch.ops.herd.rms_norm_fwd(x, weight, 1e-5, norm_dtype)
    else:
        y, h, rstd = torch.ops.herd.add_rms_norm_fwd(x, residual, weight, 1e-5, norm_dtype)
    scale = _scale_saturating(y.float().abs().max().item())
    want = torch.ops.herd.fp8_cast(y.reshape(-1, shape[-1]), scale, E4M3, transpose)
    assert fp8_fused.rms_norm_fp8_kernel_applies(x, residual, weight, norm_dtype, scale, E4M3)
    _poison()
    q, q_t, amax, h_got, rstd_got = torch.ops.herd.rms_norm_fp8_fwd(x, residual, weight, 1e-5, norm_dtype, scale,
                                                                    E4M3, transpose)
    assert _same_bits(q, want[0]) and _same_bits(q_t, want[1]) and torch.equal(amax, want[2])
    assert torch.equal(rstd_got, rstd)
    assert h_got.numel() == 0 if residual is None else torch.equal(h_got, h)
    ref = fp8_fused._rms_norm_fp8_cpu(x, residual, weight, 1e-5, norm_dtype, scale, E4M3, transpose)
    assert _within_one_fp8_step(q, ref[0]) and torch.allclose(amax, ref[2], rtol=1e-2)


@pytest.mark.parametrize("shape", SWIGLU_SHAPES)
@pytest.mark.parametrize("dtype", [BF16, F32])
@pytest.mark.parametrize("aligned", [True, False])
def test_swiglu_cast_is_bitwise_the_unfused_kernels(shape, dtype, aligned):
    n = torch.Size(shape).numel()
    offset = 0 if aligned else 1  # one element in: not 16-byte aligned, the scalar (VEC 1) path
    gate = (torch.randn(n + offset, device="cuda") * 4).to(dtype)[offset:].view(shape)
    up = (torch.randn(n + offset, device="cuda") * 2).to(dtype)[offset:].view(shape)
    s = torch.ops.herd.swiglu_fwd(gate, up)
    scale = _scale_saturating(s.float().abs().max().item())
    want = torch.ops.herd.fp8_cast(s.reshape(-1, shape[-1]), scale, E4M3, True)
    _poison()
    q, q_t, amax = torch.ops.herd.swiglu_fp8_fwd(gate, up, scale, E4M3, True)
    assert _same_bits(q, want[0]) and _same_bits(q_t, want[1]) and torch.equal(amax, want[2])
    ref = fp8_fused._swiglu_fp8_cpu(gate, up, scale, E4M3, False)
    assert _within_one_fp8_step(q, ref[0]) and torch.allclose(amax, ref[2], rtol=1e-2)


def test_training_steps_with_fused_casts_are_bitwise_the_unfused_ones(monkeypatch):
    """A 2-block model (dim 256, FFN 512), bf16 autocast, delayed recipe, 3 steps of forward, backward and SGD:
    losses and every parameter equal with and without fuse_norm_cast + fuse_swiglu_cast (the first step fills the
    windows on the unfused path; the other two run the fused kernels)."""
    from engine.config import ModelConfig
    from engine.fp8 import fused_cast, native
    from engine.model import build_model
    cfg = ModelConfig(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=512, vocab_size=512, max_seq_len=128)
    tokens = torch.randint(0, 512, (2, 64), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    runs, calls = {}, []
    for name in ("rms_norm_fp8", "swiglu_fp8"):  # count the fused ops' launches
        original = getattr(fused_cast, name)
        monkeypatch.setattr(fused_cast, name, lambda *a, _f=original, _n=name: (calls.append(_n), _f(*a))[1])
    for fused in (True, False):
        model = build_model(cfg, torch.device("cuda"), seed=3)
        native.convert(model, FP8Config(backend="native", recipe="delayed", bf16_first_last_layers=False,
                                        fuse_norm_cast=fused, fuse_swiglu_cast=fused))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        losses = []
        for _ in range(3):
            optimizer.zero_grad()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits = model(tokens)
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), tokens.flatten())
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        runs[fused] = (losses, {n: p.detach().clone() for n, p in model.named_parameters()})
    assert calls.count("rms_norm_fp8") == 2 * 2 * 2 and calls.count("swiglu_fp8") == 2 * 2  # 2 steps x 2 blocks
    assert runs[True][0] == runs[False][0]
    assert all(torch.equal(p, runs[False][1][n]) for n, p in runs[True][1].items())
