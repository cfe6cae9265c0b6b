"""Rotary position embedding tables with Llama 3.1's frequency scaling for long context."""

import math

import torch
from torch import nn

from engine.config import ModelConfig, RopeScalingConfig


def rope_frequencies(head_dim: int, theta: float, scaling: RopeScalingConfig) -> torch.Tensor:
    """Inverse frequencies theta^(-2i/d) for i < d/2, in fp32: [head_dim / 2].

    With scaling enabled (Llama 3.1), wavelengths longer than original_max_seq_len / low_freq_factor are
    stretched by `factor`, those shorter than original_max_seq_len / high_freq_factor are kept, and those in
    between are blended linearly in original_max_seq_len / wavelength.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if not scaling.enabled:
        return inv_freq
    wavelength = 2 * math.pi / inv_freq
    low_freq_wavelength = scaling.original_max_seq_len / scaling.low_freq_factor
    high_freq_wavelength = scaling.original_max_seq_len / scaling.high_freq_factor
    smooth = (scaling.original_max_seq_len / wavelength - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor)
    blended = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
    scaled = torch.where(wavelength > low_freq_wavelength, inv_freq / scaling.factor, blended)
    return torch.where(wavelength < high_freq_wavelength, inv_freq, scaled)


class RotaryEmbedding(nn.Module):
    """Holds cos/sin tables [max_seq_len, head_dim/2] and looks them up by position id."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.register_buffer("cos", torch.empty(cfg.max_seq_len, cfg.dim // cfg.n_heads // 2), persistent=False)
        self.register_buffer("sin", torch.empty(cfg.max_seq_len, cfg.dim // cfg.n_heads // 2), persistent=False)

    def reset_tables(self) -> None:
        """Compute the tables (after materializing from the meta device; they are never checkpointed)."""
        inv_freq = rope_frequencies(self.cfg.dim // self.cfg.n_heads, self.cfg.rope_theta, self.cfg.rope_scaling)
        angles = torch.outer(torch.arange(self.cfg.max_seq_len, dtype=torch.float32), inv_freq)  # [max_s, d/2]
        with torch.no_grad():
            self.cos.copy_(angles.cos())
            self.sin.copy_(angles.sin())

    def forward(self, position_ids: torch.Tensor) -> tuple:
        """position_ids: [b, s] -> cos, sin: [b, s, 1, head_dim/2] (broadcast over heads)."""
        return self.cos[position_ids].unsqueeze(2), self.sin[position_ids].unsqueeze(2)
