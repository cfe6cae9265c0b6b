"""FP8 training, chosen by config `fp8.backend`: none, native (engine/fp8/native.py: torch._scaled_mm, runs on any
torch >= 2.11) or te (engine/fp8/te.py: TransformerEngine layers, the only file that imports transformer_engine).

The engine applies FP8 to the plain model before parallelization (`apply_fp8`), and after it tells the layers
which process groups share their tensors (`set_amax_groups`), so parallel/ never imports this package.
"""

import contextlib
from typing import Callable, ContextManager, List, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from engine.config import FP8Config, ParallelConfig
from engine.config_checks import check_fp8_fusion
from engine.errors import ConfigError

BACKENDS = ("none", "native", "te")
RECIPES = ("tensorwise", "delayed")
GRAD_DTYPES = ("e5m2", "e4m3")


def check_fp8_config(cfg: FP8Config, device: torch.device, parallel: Optional[ParallelConfig] = None) -> None:
    """One-line ConfigError naming the key for an FP8 setting that cannot run here (config loading already
    checks the choices; this also covers configs built in code, and the device)."""
    for key, value, allowed in (("backend", cfg.backend, BACKENDS), ("recipe", cfg.recipe, RECIPES),
                                ("grad_dtype", cfg.grad_dtype, GRAD_DTYPES)):
        if value not in allowed:
            raise ConfigError(f"fp8.{key}", f"'{value}' is not one of {', '.join(allowed)}")
    if cfg.amax_history_len < 1:
        raise ConfigError("fp8.amax_history_len", f"{cfg.amax_history_len} must be at least 1")
    check_fp8_fusion(cfg, parallel.tp if parallel is not None else 1)
    if cfg.backend == "te":
        from engine.fp8 import te
        te.require_te()  # one-line error naming the key when transformer_engine does not import
        spread = {k: getattr(parallel, k) for k in ("tp", "cp", "pp")} if parallel is not None else {}
        if any(v > 1 for v in spread.values()):
            axis = next(k for k, v in spread.items() if v > 1)
            raise ConfigError(f"parallel.{axis}", "fp8.backend=te is wired into the engine for data parallel "
                              "layouts only (tp, cp and pp 1); use fp8.backend=native with model parallelism")
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


def set_recording_gate(parts: Sequence[nn.Module], gate) -> int:
    """Native FP8 layers of `parts` record amaxes only while `gate.open` (the pipeline's ScheduleGate)."""
    from engine.fp8 import native
    return native.set_recording_gate(parts, gate)


def recompute_contexts(block: nn.Module):
    """activation checkpointing's context_fn for a block with native FP8 layers (the recomputation quantizes as
    its forward did and records no amax), or None."""
    from engine.fp8 import native
    return native.recompute_contexts(block)


def init_fp8_weights(part: nn.Module, cfg: FP8Config, seed: int) -> None:
    """After init_weights on a materialized part: TE blocks take herd's initial values under TE's names."""
    if cfg.backend == "te":
        from engine.fp8 import te
        te.init_te_blocks(part, seed)


def fp8_step_context(cfg: FP8Config, parts: Sequence[nn.Module],
                     weights_sharded: bool = False) -> Callable[[], ContextManager]:
    """What the train module enters around one optimizer step's micro-batches: for backend native with
    `cache_weights`, the scope in which each FP8 layer quantizes its weight once (native.weight_cache); nothing
    otherwise, and nothing when FSDP shards the weights (`weights_sharded`): the cache would keep every layer's
    whole FP8 weight for the whole step, the memory FSDP exists to save."""
    if cfg.backend != "native" or not cfg.cache_weights or weights_sharded:
        return contextlib.nullcontext
    from engine.fp8 import native
    layers = native.float8_layers(parts)  # once, not at every step
    return lambda: native.weight_cache(layers)


def fp8_forward_context(cfg: FP8Config) -> Callable[[], ContextManager]:
    """What the train module enters around each forward: TE's fp8_autocast for backend te (TE layers quantize
    only inside it; one amax reduction per step when it exits), nothing for the others."""
    if cfg.backend != "te":
        return contextlib.nullcontext
    from engine.fp8 import te
    return lambda: te.fp8_autocast_context(cfg)
