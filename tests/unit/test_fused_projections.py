"""Fused q/k/v (wqkv) and gate/up (w13) projections on one process: the same initial weights as the unfused model,
the same forward (one GEMM computes what three did; bitwise on CPU fp32), gradients to GEMM-blocking rounding, and
FP8 conversion of the fused layers. Layouts, checkpoints and resume: tests/distributed/test_fused_projections.py."""

import torch

from engine.config import FP8Config, load_config
from engine.fp8 import apply_fp8
from engine.fp8.native import Float8Linear
from engine.model import build_model
from engine.model.init import fused_part_names
from tests.helpers import PARITY_MODEL

CFG = load_config(None, PARITY_MODEL).model  # dim 64, 8 heads / 4 KV heads, ffn 128


def _models():
    return (build_model(CFG, torch.device("cpu"), seed=3),
            build_model(CFG, torch.device("cpu"), seed=3, fused_projections=True))


def test_fused_weights_start_as_the_unfused_ones_stacked():
    plain, fused = _models()
    names = dict(fused.named_parameters())
    assert "layers.0.attention.wqkv.weight" in names and "layers.0.attention.wq.weight" not in names
    assert names["layers.0.attention.wqkv.weight"].shape == (64 + 2 * 32, 64)  # [q; k; v] rows
    assert names["layers.1.feed_forward.w13.weight"].shape == (2 * 128, 64)
    plain_params = dict(plain.named_parameters())
    for fused_name, parts in fused_part_names(fused).items():
        stacked = torch.cat([plain_params[part] for part, _ in parts])
        assert torch.equal(names[fused_name], stacked), fused_name
    assert len(fused_part_names(fused)) == 2 * CFG.n_layers


def test_forward_equal_and_gradients_within_gemm_rounding():
    plain, fused = _models()
    tokens = torch.randint(0, CFG.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    plain_logits, fused_logits = plain(tokens), fused(tokens)
    assert torch.equal(plain_logits, fused_logits)  # the same products and sums, row by row
    plain_logits.float().square().mean().backward()
    fused_logits.float().square().mean().backward()
    plain_grads = {n: p.grad for n, p in plain.named_parameters()}
    worst = 0.0
    for fused_name, parts in fused_part_names(fused).items():
        grad = dict(fused.named_parameters())[fused_name].grad
        for (part, rows), piece in zip(parts, grad.split([r for _, r in parts])):
            worst = max(worst, ((piece - plain_grads[part]).norm() / plain_grads[part].norm()).item())
    print(f"fused vs unfused weight gradients: max relative difference {worst:.1e}")
    assert worst < 1e-6


def test_fp8_converts_the_fused_layers_and_keeps_their_parts():
    _, fused = _models()
    reference = build_model(CFG, torch.device("cpu"), seed=3, fused_projections=True)
    converted = apply_fp8(fused, FP8Config(backend="native", bf16_first_last_layers=False))
    assert "layers.0.attention.wqkv" in converted and "layers.1.feed_forward.w13" in converted
    wqkv = fused.layers["0"].attention.wqkv
    assert isinstance(wqkv, Float8Linear) and wqkv.fused_parts == (("wq", 64), ("wk", 32), ("wv", 32))
    assert wqkv.split_sizes == [64, 32, 32]
    tokens = torch.randint(0, CFG.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        err = ((fused(tokens) - reference(tokens)).norm() / reference(tokens).norm()).item()
    print(f"FP8 fused model vs fp32 fused model: relative logit error {err:.1e}")
    assert 0 < err < 0.05  # FP8 really ran (e4m3 has 3 mantissa bits), and stayed close
