"""LR schedules step by step, and model FLOPs against torch's own FLOP counter."""

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from engine.config import ModelConfig, OptimConfig, ScheduleConfig
from engine.flops import device_peak_tflops, flops_per_token, parameter_count
from engine.model import build_model
from engine.optim import build_optimizer, build_scheduler
from engine.schedule import lr_multiplier


def curve(kind: str, steps=100, warmup=10, floor=0.1, decay_fraction=0.2):
    cfg = ScheduleConfig(kind=kind, warmup_steps=warmup, min_lr_ratio=floor, decay_fraction=decay_fraction)
    return [lr_multiplier(s, steps, cfg) for s in range(steps)]


def test_warmup_is_linear_and_never_zero():
    for kind in ("cosine", "wsd", "linear", "constant"):
        c = curve(kind)
        assert c[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])


def test_cosine_decays_to_the_floor():
    c = curve("cosine")
    assert c[10] == pytest.approx(1.0) and c[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(c[10:], c[11:]))
    middle = 10 + (99 - 10) / 2
    assert lr_multiplier(int(middle), 100, ScheduleConfig(kind="cosine", warmup_steps=10, min_lr_ratio=0.1)) == \
        pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * int(middle - 10) / 89)))


def test_wsd_is_flat_then_linear():
    c = curve("wsd", floor=0.0)
    assert c[10:80] == [1.0] * 70
    assert c[80:] == pytest.approx([1 - (k + 1) / 20 for k in range(20)])
    assert c[-1] == 0.0


def test_linear_anneals_to_zero():
    c = curve("linear", warmup=0, floor=0.0)
    assert c[0] == 1.0 and c[-1] == 0.0
    assert all(a - b == pytest.approx(1 / 99) for a, b in zip(c, c[1:]))


def test_scheduler_drives_the_optimizer():
    model = torch.nn.Linear(4, 4)
    opt = build_optimizer(model, OptimConfig(lr=1e-3), torch.device("cpu"))
    sched = build_scheduler(opt, ScheduleConfig(kind="cosine", warmup_steps=5, min_lr_ratio=0.0), 20)
    seen = []
    for _ in range(20):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([1e-3 * m for m in curve("cosine", 20, 5, 0.0)])
    assert opt.param_groups[1]["weight_decay"] == 0.0  # the bias (1-D) is not decayed


def test_parameter_count_matches_the_model():
    cfg = ModelConfig(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=96, vocab_size=300, max_seq_len=64)
    model = build_model(cfg, torch.device("cpu"), 0)
    assert parameter_count(cfg) == sum(p.numel() for p in model.parameters())


def test_matmul_flops_equal_torch_flop_counter():
    """6N counts every weight matmul forward and backward: check it against FlopCounterMode's mm/addmm count."""
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, vocab_size=512, max_seq_len=128)
    model = build_model(cfg, torch.device("cpu"), 0)
    tokens = torch.randint(0, 512, (2, 64))
    with FlopCounterMode(display=False) as counter:
        model(tokens).float().sum().backward()
    counts = counter.get_flop_counts()["Global"]
    matmul = sum(v for op, v in counts.items() if str(op).split(".")[1] in ("mm", "addmm", "bmm"))
    norm_params = (2 * cfg.n_layers + 1) * cfg.dim  # in N (as PaLM counts) but not multiplied
    n = parameter_count(cfg, include_embedding=False)
    assert matmul / tokens.numel() == 6 * (n - norm_params)
    attention = 12 * cfg.n_layers * cfg.n_heads * (cfg.dim // cfg.n_heads) * 64
    assert flops_per_token(cfg, 64) == 6 * n + attention
    assert flops_per_token(cfg, 64, causal=True) == 6 * n + attention / 2


def test_llama3_8b_flops_and_peaks():
    cfg = ModelConfig(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336, vocab_size=128256)
    assert parameter_count(cfg) == 8_030_261_248  # Llama 3 8B's published parameter count
    # 6 * 7.505e9 + 12 * 32 * 32 * 128 * 8192 = 45.03e9 + 12.88e9
    assert flops_per_token(cfg, 8192) == pytest.approx(57.91e9, rel=1e-3)
    assert device_peak_tflops("NVIDIA H100 80GB HBM3") == 989.4
    assert device_peak_tflops("NVIDIA H100 80GB HBM3", "fp8") == 1978.9
    assert device_peak_tflops("NVIDIA H200") == 989.4
    assert device_peak_tflops("Some CPU") == 0.0
