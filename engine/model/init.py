"""Building the model on the meta device, materializing it and initializing it reproducibly.

Each parameter is drawn from its own generator seeded by (seed, parameter name), on its full shape. The values
therefore do not depend on the order modules are visited, nor on how a parallel layout later shards them: the
same seed gives the same model on one process or on many.
"""

import math
import zlib
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import nn

from engine.config import ModelConfig
from engine.model.llama import Transformer

_RESIDUAL_OUTPUTS = ("attention.wo.weight", "feed_forward.w2.weight")


def build_meta_model(cfg: ModelConfig, fused_projections: bool = False) -> Transformer:
    """The model on the meta device: shapes only, no memory (parallelize it, then materialize)."""
    with torch.device("meta"):
        return Transformer(cfg, fused_projections)


def build_model(cfg: ModelConfig, device: torch.device, seed: int, fused_projections: bool = False) -> Transformer:
    """Construct on meta, allocate on `device`, then initialize (the whole model, on one process)."""
    model = build_meta_model(cfg, fused_projections)
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


def fused_part_names(model: nn.Module) -> Dict[str, Tuple[Tuple[str, int], ...]]:
    """Fused parameters (engine/model/llama.py fused_linear) -> their parts as (unfused parameter name, full rows),
    in row order: {"layers.0.attention.wqkv.weight": (("layers.0.attention.wq.weight", rows), ...)}."""
    fused = {}
    for module_name, module in model.named_modules():
        parts = getattr(module, "fused_parts", None)
        if parts:
            parent = module_name.rpartition(".")[0]
            fused[f"{module_name}.weight"] = tuple((f"{parent}.{part}.weight", rows) for part, rows in parts)
    return fused


def full_init(name: str, shape: torch.Size, cfg: ModelConfig, seed: int,
              parts: Optional[Tuple[Tuple[str, int], ...]] = None) -> torch.Tensor:
    """parameter_init of a parameter, or of a fused one: its parts' values (each drawn under its unfused name)
    stacked along the rows, so a fused model starts from exactly the unfused model's weights."""
    if not parts:
        return parameter_init(name, shape, cfg, seed)
    return torch.cat([parameter_init(part, (rows, *shape[1:]), cfg, seed) for part, rows in parts])


def _copy_whole(name: str, param: torch.Tensor, full: torch.Tensor) -> None:
    param.copy_(full)


@torch.no_grad()
def init_weights(model: nn.Module, seed: int, full_shape: Optional[Callable] = None,
                 assign: Callable = _copy_whole) -> None:
    """Give every parameter its initial value, then compute the RoPE tables.

    A parallelized model passes `full_shape(name, param)` (the unsharded shape) and `assign(name, param, full)`
    (copies this process's part of the full value), so each process generates one full parameter at a time and
    keeps only its shard.
    """
    fused = fused_part_names(model)
    for name, param in model.named_parameters():
        shape = full_shape(name, param) if full_shape is not None else param.shape
        assign(name, param, full_init(name, shape, model.cfg, seed, fused.get(name)).to(param.device))
    for module in model.modules():
        if hasattr(module, "reset_tables"):
            module.reset_tables()
