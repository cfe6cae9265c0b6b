"""Mapping between herd's Llama and HF transformers' LlamaForCausalLM: config and parameter names.

herd applies RoPE in the half-split layout (pair i is (x[i], x[i + d/2])), the same as HF checkpoints, so weights
move across unchanged; only Meta's original consolidated checkpoints (interleaved pairs) need the q/k row
permutation, which this module does not handle.
"""

import re
from typing import Dict

import torch

from engine.config import ModelConfig

_LAYER_NAMES = {  # herd suffix inside a block -> HF suffix inside a decoder layer
    "attention_norm.weight": "input_layernorm.weight",
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
}
_TOP_NAMES = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def hf_config_dict(cfg: ModelConfig) -> dict:
    """The keyword arguments of transformers.LlamaConfig describing the same model."""
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling.enabled:
        s = cfg.rope_scaling
        rope = {"rope_type": "llama3", "rope_theta": cfg.rope_theta, "factor": s.factor,
                "low_freq_factor": s.low_freq_factor, "high_freq_factor": s.high_freq_factor,
                "original_max_position_embeddings": s.original_max_seq_len}
    return dict(hidden_size=cfg.dim, intermediate_size=cfg.ffn_dim, num_hidden_layers=cfg.n_layers,
                num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads, vocab_size=cfg.vocab_size,
                rms_norm_eps=cfg.norm_eps, max_position_embeddings=cfg.max_seq_len, rope_theta=cfg.rope_theta,
                rope_scaling=rope, tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
                hidden_act="silu")


def herd_to_hf_name(name: str) -> str:
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    match = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
    if match and match.group(2) in _LAYER_NAMES:
        return f"model.layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}"
    raise KeyError(f"no HF name for herd parameter '{name}'")


def hf_to_herd_name(name: str) -> str:
    for herd, hf in _TOP_NAMES.items():
        if name == hf:
            return herd
    match = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
    if match:
        for herd, hf in _LAYER_NAMES.items():
            if match.group(2) == hf:
                return f"layers.{match.group(1)}.{herd}"
    raise KeyError(f"no herd name for HF parameter '{name}'")


def herd_to_hf_state_dict(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return {herd_to_hf_name(k): v for k, v in state.items()}


def hf_to_herd_state_dict(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return {hf_to_herd_name(k): v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}
