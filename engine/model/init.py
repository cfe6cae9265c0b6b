"""Building the model on the meta device, materializing it and initializing it reproducibly.

Each parameter is drawn from its own generator seeded by (seed, parameter name), on its full shape. The values
therefore do not depend on the order modules are visited, nor on how a parallel layout later shards them: the
same seed gives the same model on one process or on many.
"""

import math
import zlib

import torch
from torch import nn

from engine.config import ModelConfig
from engine.model.llama import Transformer

_RESIDUAL_OUTPUTS = ("attention.wo.weight", "feed_forward.w2.weight")


def build_model(cfg: ModelConfig, device: torch.device, seed: int) -> Transformer:
    """Construct on meta (no memory), allocate on `device`, then initialize."""
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device=device)
    init_weights(model, seed)
    return model


def parameter_init(name: str, shape: torch.Size, cfg: ModelConfig, seed: int) -> torch.Tensor:
    """The full-shape fp32 initial value of one parameter, a pure function of (name, shape, cfg, seed).

    Norm weights are 1. Matrices are N(0, init_std); the two residual-branch outputs (wo, w2) are further scaled
    by 1/sqrt(2 * n_layers) so the residual stream's variance does not grow with depth (GPT-2, Radford et al.).
    """
    if name.endswith("norm.weight"):
        return torch.ones(shape)
    std = cfg.init_std
    if name.endswith(_RESIDUAL_OUTPUTS):
        std /= math.sqrt(2 * cfg.n_layers)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    return torch.empty(shape).normal_(0.0, std, generator=generator)


@torch.no_grad()
def init_weights(model: nn.Module, seed: int) -> None:
    for name, param in model.named_parameters():
        param.copy_(parameter_init(name, param.shape, model.cfg, seed))
    for module in model.modules():
        if hasattr(module, "reset_tables"):
            module.reset_tables()
