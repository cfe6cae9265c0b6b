"""Checks that need a CUDA GPU; skipped elsewhere (benchmarks/gpu/check.sh runs them on a lent H100)."""

import io

import pytest
import torch

from engine.config import ModelConfig
from engine.model import build_model

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_cuda_model_matches_cpu_fp32_and_bf16_within_tolerance():
    cfg = ModelConfig(dim=256, n_layers=2, n_heads=8, n_kv_heads=2, ffn_dim=512, vocab_size=1024, max_seq_len=512)
    cpu = build_model(cfg, torch.device("cpu"), seed=1)
    gpu = build_model(cfg, torch.device("cuda"), seed=1)
    tokens = torch.randint(0, cfg.vocab_size, (2, 256))
    doc_ids = torch.cat([torch.zeros(2, 100), torch.ones(2, 156)], 1).long()
    with torch.no_grad():
        ref = cpu(tokens, doc_ids=doc_ids)
        torch.backends.cuda.matmul.allow_tf32 = False
        fp32 = gpu(tokens.cuda(), doc_ids=doc_ids.cuda()).cpu()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            bf16 = gpu(tokens.cuda(), doc_ids=doc_ids.cuda()).float().cpu()
    assert (fp32 - ref).abs().max() < 1e-3
    # bf16 keeps 8 bits of mantissa: logits of size ~1 carry errors of a few 1e-2 after two layers
    assert (bf16 - ref).abs().max() < 0.1


def test_trainer_runs_on_cuda_with_fused_adamw(tmp_path):
    from engine.run import train
    from tests.helpers import make_corpus, tiny_config
    corpus = make_corpus(tmp_path / "c")
    trainer = train(tiny_config(corpus, tmp_path / "runs", ["train.device=cuda", "train.dtype=bf16",
                                                           "train.steps=20"]), stream=io.StringIO())
    assert trainer.module.optimizer.defaults["fused"] is True
    assert next(trainer.module.model.parameters()).dtype == torch.float32  # fp32 master weights
    assert trainer.last_metrics["val_loss"] < trainer.initial_val_loss - 0.5
