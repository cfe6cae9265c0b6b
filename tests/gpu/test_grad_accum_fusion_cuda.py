"""Fused gradient accumulation on CUDA (engine/ops/accum_linear.py): cuBLAS's bf16 x bf16 -> fp32 GEMM with beta = 1
(torch.addmm(grad, dy^T, x, out_dtype=float32, out=grad), its output aliasing its input) against the pure-torch
reference (fp32 GEMM of the upcast operands), over several micro-batches; and the fused and compiled model options
training a few steps on the GPU. Skipped without CUDA."""

import pytest
import torch

from engine.ops.accum_linear import MainGradLinear, fused_accumulate, reference_accumulate

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("shape", [(4096, 1024, 4096), (8192, 4096, 14336), (100, 48, 72)])
def test_fused_accumulation_matches_reference(shape):
    m, k, n = shape  # tokens, in features, out features
    g = torch.Generator(device="cuda").manual_seed(0)
    fused_w = torch.zeros(n, k, device="cuda", requires_grad=True)
    reference_w = torch.zeros(n, k, device="cuda", requires_grad=True)
    for _ in range(3):  # the first micro-batch creates the gradient, the next ones add into it in place
        dy = torch.randn(m, n, device="cuda", generator=g).bfloat16()
        x = torch.randn(m, k, device="cuda", generator=g).bfloat16()
        fused_accumulate(fused_w, dy, x)
        reference_accumulate(reference_w, dy, x)
    assert fused_w.grad.dtype == torch.float32
    err = ((fused_w.grad - reference_w.grad).norm() / reference_w.grad.norm()).item()
    print(f"{shape}: fused vs reference accumulation, relative difference {err:.1e}")
    assert err < 1e-5  # both sum exact products in fp32; only the summation order differs


def test_layer_under_autocast_matches_reference_accumulation():
    torch.manual_seed(0)
    fused = torch.nn.Linear(512, 768, bias=False, device="cuda")
    fused.__class__ = MainGradLinear
    oracle = torch.zeros(768, 512, device="cuda", dtype=torch.float64)
    for _ in range(4):
        x = torch.randn(2, 256, 512, device="cuda")
        g = torch.randn(2, 256, 768, device="cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = fused(x)
        (y.float() * g).sum().backward()
        oracle += g.bfloat16().double().reshape(-1, 768).t() @ x.bfloat16().double().reshape(-1, 512)
    err = ((fused.weight.grad.double() - oracle).norm() / oracle.norm()).item()
    print(f"MainGradLinear under bf16 autocast vs fp64 oracle: {err:.1e}")
    assert fused.weight.grad.dtype == torch.float32 and err < 1e-5
