"""FP8 training, chosen by config `fp8.backend`: none, native (engine/fp8/native.py: torch._scaled_mm, runs on any
torch >= 2.11) or te (engine/fp8/te.py: TransformerEngine layers, the only file that imports transformer_engine).

The engine applies FP8 to the plain model before parallelization (`apply_fp8`), and after it tells the layers
which process groups share their tensors (`set_amax_groups`), so parallel/ never imports this package.
"""

from typing import List, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from engine.config import FP8Config
from engine.errors import ConfigError

BACKENDS = ("none", "native", "te")
RECIPES = ("tensorwise", "delayed")
GRAD_DTYPES = ("e5m2", "e4m3")


def check_fp8_config(cfg: FP8Config, device: torch.device) -> None:
    """One-line ConfigError naming the key for an FP8 setting that cannot run here (config loading already
    checks the choices; this also covers configs built in code, and the device)."""
    for key, value, allowed in (("backend", cfg.backend, BACKENDS), ("recipe", cfg.recipe, RECIPES),
                                ("grad_dtype", cfg.grad_dtype, GRAD_DTYPES)):
        if value not in allowed:
            raise ConfigError(f"fp8.{key}", f"'{value}' is not one of {', '.join(allowed)}")
    if cfg.amax_history_len < 1:
        raise ConfigError("fp8.amax_history_len", f"{cfg.amax_history_len} must be at least 1")
    if cfg.backend == "native" and device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        raise ConfigError("fp8.backend", f"native needs FP8 tensor cores (compute capability 8.9+, e.g. H100); "
                          f"{torch.cuda.get_device_name(device)} has {torch.cuda.get_device_capability(device)}")


def apply_fp8(model: nn.Module, cfg: FP8Config) -> List[str]:
    """Convert `model`'s transformer-block projections for the configured backend, in place (meta or
    materialized). Returns the converted layer names (empty for backend none)."""
    if cfg.backend == "none":
        return []
    if cfg.backend == "native":
        from engine.fp8 import native
        return native.convert(model, cfg)
    from engine.fp8 import te
    return te.convert_model_to_te(model, cfg)


def set_amax_groups(parts: Sequence[nn.Module], groups: Sequence[Optional[dist.ProcessGroup]]) -> int:
    """Max-reduce FP8 amaxes over `groups` (tensor and context parallel) in every native FP8 layer of `parts`."""
    from engine.fp8 import native
    return sum(native.set_amax_groups(part, groups) for part in parts)
