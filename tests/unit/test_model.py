"""The model against HF transformers' LlamaForCausalLM, and document masking."""

import pytest
import torch

from engine.config import ModelConfig, RopeScalingConfig
from engine.hf_interop import herd_to_hf_state_dict, hf_config_dict
from engine.model import build_model
from engine.model.attention import document_causal_mask

transformers = pytest.importorskip("transformers")


def tiny(scaled: bool) -> ModelConfig:
    scaling = RopeScalingConfig(enabled=scaled, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                original_max_seq_len=64)
    return ModelConfig(dim=64, n_layers=3, n_heads=8, n_kv_heads=2, ffn_dim=160, vocab_size=300,
                       max_seq_len=256, rope_theta=500000.0, rope_scaling=scaling)


@pytest.mark.parametrize("scaled", [False, True], ids=["rope", "rope_llama31_scaled"])
def test_logits_equal_transformers(scaled):
    cfg = tiny(scaled)
    model = build_model(cfg, torch.device("cpu"), seed=7).eval()
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_config_dict(cfg))).eval()
    missing, unexpected = hf.load_state_dict(herd_to_hf_state_dict(model.state_dict()), strict=False)
    assert not unexpected and all("rotary" in k for k in missing)
    tokens = torch.randint(0, cfg.vocab_size, (2, 200), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(tokens)
        theirs = hf(tokens).logits
    err = (ours - theirs).abs().max().item()
    print(f"max |logit diff| vs transformers ({'scaled' if scaled else 'plain'} RoPE): {err:.2e}")
    assert err < 1e-4, err
    assert ours.abs().max() > 0.1  # a real signal, not two zero tensors


def test_rope_scaling_changes_only_long_wavelengths():
    from engine.model.rope import rope_frequencies
    plain = rope_frequencies(128, 500000.0, RopeScalingConfig(enabled=False))
    scaled = rope_frequencies(128, 500000.0, RopeScalingConfig(enabled=True))
    assert torch.equal(plain[:10], scaled[:10])  # short wavelengths untouched
    assert torch.allclose(scaled[-1], plain[-1] / 8)  # the longest divided by the factor


def test_document_mask_blocks_attention_across_documents():
    cfg = tiny(False)
    model = build_model(cfg, torch.device("cpu"), seed=3).eval()
    g = torch.Generator().manual_seed(1)
    doc_a, doc_b, doc_c = (torch.randint(0, cfg.vocab_size, (1, n), generator=g) for n in (10, 7, 15))
    other_a = torch.randint(0, cfg.vocab_size, (1, 10), generator=g)
    packed = torch.cat([doc_a, doc_b, doc_c], 1)
    packed_other = torch.cat([other_a, doc_b, doc_c], 1)  # only the first document differs
    doc_ids = torch.tensor([[0] * 10 + [1] * 7 + [2] * 15])
    positions = torch.cat([torch.arange(10), torch.arange(7), torch.arange(15)]).unsqueeze(0)
    with torch.no_grad():
        packed_logits = model(packed, positions, doc_ids)
        other_logits = model(packed_other, positions, doc_ids)
        alone_b = model(doc_b)
        unmasked = model(packed)
    # later documents are blind to the first one, and equal to the document run on its own
    assert torch.allclose(packed_logits[:, 10:], other_logits[:, 10:], atol=1e-5)
    assert torch.allclose(packed_logits[:, 10:17], alone_b, atol=1e-5)
    assert not torch.allclose(packed_logits[:, 10:17], unmasked[:, 10:17], atol=1e-3)  # the mask mattered


def test_document_causal_mask_shape_and_values():
    mask = document_causal_mask(None, torch.tensor([[0, 0, 1, 1, 1]]))
    assert mask.shape == (1, 1, 5, 5)
    expected = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 1]])
    assert torch.equal(mask[0, 0].int(), expected)


def test_meta_build_is_deterministic_and_seed_dependent():
    cfg = tiny(False)
    a = build_model(cfg, torch.device("cpu"), seed=5).state_dict()
    b = build_model(cfg, torch.device("cpu"), seed=5).state_dict()
    c = build_model(cfg, torch.device("cpu"), seed=6).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["layers.0.attention.wq.weight"], c["layers.0.attention.wq.weight"])
