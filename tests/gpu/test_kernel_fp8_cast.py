"""csrc/fp8_cast against engine/ops/reference.py fp8_amax / fp8_cast / fp8_delayed_update on a CUDA GPU.

Tolerances: none. amax is exact (a max of |bits|), and out / out_t are compared bit for bit with the reference
(torch's clamp then `.to(float8)`, round to nearest even), which the hardware conversion (cvt.rn.satfinite) matches;
test_rounding_ties_match_torch pins that on every tie between neighbouring fp8 values. NaN inputs are checked apart
(NaN out where x is NaN; the NaN's sign bit is not compared). Outputs land in memory poisoned with 0xFF bytes (NaN
in fp32 and in both fp8 formats), so a byte the kernel fails to write shows up as a mismatch.
"""

import os
import shutil
import subprocess
import sys

import pytest
import torch

import engine.ops
from engine.ops import reference
from engine.ops.reference import FP8_MAX

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

public = sys.modules["engine.ops.fp8_cast"]  # engine.ops re-exports the function fp8_cast under the module's name
FP8_DTYPES = [torch.float8_e4m3fn, torch.float8_e5m2]
IN_DTYPES = [torch.bfloat16, torch.float32]
SIZES = [1, 7, 64, 100, 4096]
SMALL_SHAPES = [(m, k) for m in SIZES for k in SIZES]
LLAMA_SHAPES = [(8192, 4096), (14336, 4096)]


@pytest.fixture(autouse=True, scope="module")
def kernels_are_loaded():
    status = engine.ops.kernel_status()
    assert status["fp8_amax"] == "cuda kernel", status["fp8_amax"]  # no silent fallback to the reference
    assert status["fp8_cast"] == "cuda kernel", status["fp8_cast"]
    assert status["fp8_delayed_update"] == "cuda kernel", status["fp8_delayed_update"]


def poison(nbytes: int) -> None:
    """Leave the caching allocator's free blocks full of 0xFF bytes: one large block of `nbytes` (split for the
    large outputs) and full 2 MiB small-pool segments (for outputs under 1 MiB)."""
    torch.cuda.empty_cache()
    big = torch.full((max(nbytes, 1 << 22),), 0xFF, dtype=torch.uint8, device="cuda")
    small = [torch.full(((1 << 20) - 512,), 0xFF, dtype=torch.uint8, device="cuda") for _ in range(8)]
    del big, small


def sample(shape, dtype, seed):
    """Random values over many binades (a scale near 448 / amax saturates the top ones and flushes the bottom
    ones to fp8 subnormals / zero), with +-inf, +-0 and fp32 subnormals sprinkled in."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(shape, device="cuda", generator=g)
    x *= torch.exp(torch.empty(shape, device="cuda").uniform_(-10, 10, generator=g))
    flat = x.view(-1)
    specials = torch.tensor([float("inf"), -float("inf"), 0.0, -0.0, 1e-40, -3e-39], device="cuda")
    n = min(flat.numel() // 7, specials.numel())
    if n:
        idx = torch.randperm(flat.numel(), device="cuda", generator=g)[:n]
        flat[idx] = specials[:n]
    return x.to(dtype)


def scale_for(x, fp8, seed):
    """An fp32 one-element scale on the device around FP8_MAX / amax, times 2^[-3, 5) (so some values saturate)."""
    finite = x.float()[torch.isfinite(x.float())].abs()
    amax = finite.max().item() if finite.numel() else 1.0
    factor = 2.0 ** (torch.rand((), generator=torch.Generator().manual_seed(seed)).item() * 8 - 3)
    return torch.tensor([FP8_MAX[fp8] / max(amax, 1e-30) * factor], device="cuda")


def same_bits(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def check_cast(x, scale, fp8, transpose):
    ref_out, ref_t, ref_amax = reference.fp8_cast(x, scale, fp8, transpose)  # before poisoning: keeps its memory
    poison(4 * x.numel() + (1 << 22))
    out, out_t, amax = torch.ops.herd.fp8_cast(x, scale, fp8, transpose)
    assert out.shape == ref_out.shape and out_t.shape == ref_t.shape
    bad = (out.view(torch.uint8) != ref_out.view(torch.uint8)).nonzero()
    assert bad.numel() == 0, f"out differs at {bad[:5].tolist()} ({bad.shape[0]} bytes)"
    assert same_bits(out_t, ref_t), "out_t differs from out transposed"
    assert torch.equal(amax, ref_amax), (amax.item(), ref_amax.item())


@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("fp8", FP8_DTYPES, ids=["e4m3", "e5m2"])
@pytest.mark.parametrize("dtype", IN_DTYPES, ids=["bf16", "fp32"])
@pytest.mark.parametrize("shape", SMALL_SHAPES + LLAMA_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_cast_matches_reference_bitwise(shape, dtype, fp8, transpose):
    seed = 1000 * shape[0] + shape[1] + 100 * IN_DTYPES.index(dtype) + 10 * FP8_DTYPES.index(fp8) + transpose
    x = sample(shape, dtype, seed)
    check_cast(x, scale_for(x, fp8, seed), fp8, transpose)


@pytest.mark.parametrize("shape", [(100, 64), (64, 100), (333, 4096), (4096, 77)])
@pytest.mark.parametrize("dtype", IN_DTYPES, ids=["bf16", "fp32"])
def test_cast_unaligned_and_strided_inputs(shape, dtype):
    m, k = shape
    buf = sample((m * k + 8,), dtype, seed=m + k)
    x = buf[1:1 + m * k].view(m, k)  # contiguous, data_ptr not 16-byte aligned: the scalar paths
    assert x.data_ptr() % 16 != 0
    for fp8 in FP8_DTYPES:
        for transpose in (False, True):
            check_cast(x, scale_for(x, fp8, 1), fp8, transpose)
    xt = sample((k, m), dtype, seed=3).t()  # non-contiguous: the binding copies it
    check_cast(xt, scale_for(xt, torch.float8_e4m3fn, 2), torch.float8_e4m3fn, True)


@pytest.mark.parametrize("fp8", FP8_DTYPES, ids=["e4m3", "e5m2"])
@pytest.mark.parametrize("dtype", IN_DTYPES, ids=["bf16", "fp32"])
def test_rounding_ties_match_torch(fp8, dtype):
    """Every finite fp8 value, every midpoint between neighbours (a tie: round to even), the floats just above and
    below each midpoint, and values past the largest finite one, at scale 1: kernel == torch on GPU == torch on
    CPU, bit for bit."""
    grid = torch.arange(256, dtype=torch.uint8).view(fp8).float()
    grid = grid[torch.isfinite(grid)].unique()  # sorted
    limit = FP8_MAX[fp8]
    mids = (grid[:-1] + grid[1:]) / 2  # exact in fp32 (and bf16: fp8 has at most 3 mantissa bits)
    past = torch.tensor([limit * 1.0625, limit * 1.125, limit * 1.5, 1e30, 3e38])  # beyond the format: saturate
    past = torch.cat([past, -past])
    vals = torch.cat([grid, mids, torch.nextafter(mids, mids + 1), torch.nextafter(mids, mids - 1), past]).to(dtype)
    x = vals.view(1, -1).repeat(3, 1).cuda()  # [3, n]: several rows for the transposed copy too
    one = torch.ones(1, device="cuda")
    for transpose in (False, True):
        check_cast(x, one, fp8, transpose)
    cpu_out, _, _ = reference.fp8_cast(x.cpu(), one.cpu(), fp8, False)
    assert same_bits(torch.ops.herd.fp8_cast(x, one, fp8, False)[0].cpu(), cpu_out)


@pytest.mark.parametrize("fp8", FP8_DTYPES, ids=["e4m3", "e5m2"])
def test_nan_inputs_give_nan_outputs_and_nan_amax(fp8):
    x = sample((100, 64), torch.bfloat16, seed=5)
    x[3, 7] = float("nan")
    x[50, 0] = -float("nan")
    scale = scale_for(x, fp8, 3)
    ref_out, _, ref_amax = reference.fp8_cast(x, scale, fp8, False)
    out, out_t, amax = torch.ops.herd.fp8_cast(x, scale, fp8, True)
    nan = torch.isnan(x)
    assert torch.equal(torch.isnan(out.float()), nan) and torch.equal(torch.isnan(out_t.float()), nan.t())
    assert same_bits(out.view(torch.uint8)[~nan], ref_out.view(torch.uint8)[~nan])
    assert torch.isnan(amax) and torch.isnan(ref_amax)
    assert torch.isnan(torch.ops.herd.fp8_amax(x)) and torch.isnan(torch.ops.herd.fp8_amax(x.float()))


@pytest.mark.parametrize("dtype", IN_DTYPES, ids=["bf16", "fp32"])
@pytest.mark.parametrize("shape", [(1,), (7,), (4097,), (3, 5, 1001), ((1 << 20) + 3,), (64, 100)] + LLAMA_SHAPES,
                         ids=str)
def test_amax_is_exact(shape, dtype):
    x = sample(shape, dtype, seed=len(shape) + shape[0])
    ref = reference.fp8_amax(x)
    poison(1 << 22)
    got = torch.ops.herd.fp8_amax(x)
    assert got.dtype == torch.float32 and got.shape == () and torch.equal(got, ref), (got.item(), ref.item())
    finite = torch.where(torch.isinf(x), torch.zeros_like(x), x)  # the same without the +-inf
    assert torch.equal(torch.ops.herd.fp8_amax(finite), reference.fp8_amax(finite))
    unaligned = sample((x.numel() + 8,), dtype, seed=7)[1:1 + x.numel()]
    assert torch.equal(torch.ops.herd.fp8_amax(unaligned), reference.fp8_amax(unaligned))
    assert torch.ops.herd.fp8_amax(torch.zeros(shape, dtype=dtype, device="cuda")).item() == 0.0
    assert torch.ops.herd.fp8_amax(-torch.zeros(5, dtype=dtype, device="cuda")).view(torch.int32).item() == 0


def test_public_functions_flatten_and_never_sync_the_host():
    x = sample((2, 48, 4096), torch.bfloat16, seed=9)
    scale = scale_for(x, torch.float8_e4m3fn, 4)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # a .item() or other host sync inside would raise
    try:
        out, out_t, amax = public.fp8_cast(x, scale, torch.float8_e4m3fn, True)
        amax_only = public.fp8_amax(x)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    ref_out, ref_t, ref_amax = reference.fp8_cast(x.view(96, 4096), scale, torch.float8_e4m3fn, True)
    assert out.shape == x.shape and out_t.shape == (4096, 96)
    assert same_bits(out.view(96, 4096), ref_out) and same_bits(out_t, ref_t)
    assert torch.equal(amax, ref_amax) and torch.equal(amax_only, ref_amax)



# this step's amax for the delayed update: ordinary, above the window (an overflow at the used scale), zero,
# fp32 subnormal (below the 1e-12 clamp; a flush-to-zero build would lose it), inf and NaN (not recorded)
DELAYED_AMAXES = [3.25, 1e4, 0.0, 1e-40, float("inf"), float("nan")]


@pytest.mark.parametrize("window", [1, 5, 16, 1000, 1024, 8192])
@pytest.mark.parametrize("amax", DELAYED_AMAXES)
@pytest.mark.parametrize("fp8", FP8_DTYPES)
def test_delayed_update_matches_reference_bitwise(window, amax, fp8):
    """Every buffer after one step bit for bit the reference's (run by torch on the same GPU), on random windows,
    an all-zero window (the scale must stay) and a window of subnormals only (max > 0: the scale moves)."""
    g = torch.Generator(device="cuda").manual_seed(window)
    limit = FP8_MAX[fp8]
    windows = [torch.rand(window, device="cuda", generator=g) * torch.exp(
                   torch.empty(window, device="cuda").uniform_(-20, 20, generator=g)),
               torch.zeros(window, device="cuda"), torch.full((window,), 1e-42, device="cuda")]
    for history in windows:
        scale = (limit / history.max().clamp(min=1e-3)).reshape(())
        state = (history, scale, torch.tensor(7, dtype=torch.int64, device="cuda"))
        ref = [t.clone() for t in state]
        ref_inv = reference.fp8_delayed_update(*ref, torch.tensor(amax, device="cuda"), limit)
        poison(1 << 20)
        inv = torch.ops.herd.fp8_delayed_update(*state, torch.tensor(amax, device="cuda"), limit)
        for got, want in zip((*state, inv), (*ref, ref_inv)):  # int32 views: bits (NaN never enters a window)
            assert torch.equal(got.view(torch.int32) if got.dtype == torch.float32 else got,
                               want.view(torch.int32) if want.dtype == torch.float32 else want), (got, want)


def test_scaling_state_delayed_steps_match_the_reference_path(monkeypatch):
    """ScalingState over 6 steps (window 4) with the kernel and with the reference: same FP8 bytes, inverse scales,
    window and overflow count at every step, through an overflowing step (30x) and one with an inf (not recorded)."""
    from engine.fp8.native import ScalingState
    runs = {}
    for path in ("kernel", "reference"):
        if path == "reference":
            monkeypatch.setattr(public, "MAX_KERNEL_WINDOW", 0)  # every window above the kernel's limit
        state, seen = ScalingState(torch.float8_e4m3fn, "delayed", 4, device="cuda"), []
        g = torch.Generator(device="cuda").manual_seed(1)
        for factor in [1.0, 1.0, 30.0, 1.0, 0.5, 1.0]:
            x = torch.randn(64, 128, device="cuda", generator=g) * factor
            if len(seen) == 3:
                x[0, 0] = float("inf")
            out, _, inv = state.quantize(x, transpose=True)
            seen.append((out.view(torch.uint8).clone(), inv.clone(), state.amax_history.clone(),
                         state.overflows.item()))
        runs[path] = seen
    for a, b in zip(runs["kernel"], runs["reference"]):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and torch.equal(a[2], b[2]) and a[3] == b[3]
    assert runs["kernel"][-1][3] >= 1  # the 30x step overflowed


SANITIZED = """
import torch
import engine.ops
assert engine.ops.kernel_status()["fp8_cast"] == "cuda kernel", engine.ops.kernel_status()
for m, k in [(1, 1), (7, 100), (100, 7), (130, 70), (64, 64), (129, 65)]:
    for dtype in (torch.bfloat16, torch.float32):
        for offset in (0, 1):  # 1: x not 16-byte aligned
            x = torch.randn(m * k + offset, device="cuda").to(dtype)[offset:].view(m, k)
            torch.ops.herd.fp8_amax(x)
            for fp8 in (torch.float8_e4m3fn, torch.float8_e5m2):
                for transpose in (False, True):
                    torch.ops.herd.fp8_cast(x, torch.ones(1, device="cuda"), fp8, transpose)
for h in (1, 31, 33, 1025, 8192):
    one = torch.ones((), device="cuda")
    torch.ops.herd.fp8_delayed_update(torch.rand(h, device="cuda"), one.clone(),
                                      torch.zeros((), dtype=torch.int64, device="cuda"), one * 3, 448.0)
torch.cuda.synchronize()
print("sanitized run done")
"""


def test_no_out_of_bounds_access_under_compute_sanitizer():
    """memcheck with the caching allocator off (each tensor its own cudaMalloc, so any read or write past an
    input or output is caught), on tile-edge and unaligned shapes."""
    tool = shutil.which("compute-sanitizer") or "/usr/local/cuda/bin/compute-sanitizer"
    if not os.path.exists(tool):
        pytest.skip("compute-sanitizer not installed")
    env = dict(os.environ, PYTORCH_NO_CUDA_MEMORY_CACHING="1", PYTHONPATH=os.pathsep.join(sys.path))
    run = subprocess.run([tool, "--tool", "memcheck", "--error-exitcode", "9", sys.executable, "-c", SANITIZED],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0 and "sanitized run done" in run.stdout, (run.stdout + run.stderr)[-4000:]
