"""Learning-rate schedules as pure functions of the optimizer step (so a resume needs only the step)."""

import math

from engine.config import ScheduleConfig


def lr_multiplier(step: int, total_steps: int, cfg: ScheduleConfig) -> float:
    """Multiplier of the peak LR for the update number `step` (0-based: the first optimizer step is step 0).

    warmup: (step + 1) / warmup_steps, reaching 1 at the last warmup step (never an update with LR 0).
    cosine: half a cosine from 1 down to min_lr_ratio at the last step (Llama 3 pretraining).
    wsd: 1 until the last decay_fraction of the steps, then linear down to min_lr_ratio (warmup-stable-decay).
    linear: linear from 1 down to min_lr_ratio (annealing: Llama 3 anneals linearly to 0).
    constant: 1.
    """
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    floor = cfg.min_lr_ratio
    if cfg.kind == "constant":
        return 1.0
    if cfg.kind == "wsd":
        decay_steps = max(1, round(cfg.decay_fraction * total_steps))
        decay_start = max(cfg.warmup_steps, total_steps - decay_steps)
        if step < decay_start:
            return 1.0
        progress = (step - decay_start + 1) / max(1, total_steps - decay_start)
        return 1.0 - (1.0 - floor) * min(1.0, progress)
    span = max(1, total_steps - cfg.warmup_steps - 1)
    progress = min(1.0, (step - cfg.warmup_steps) / span)  # 0 after warmup, 1 at the last step
    if cfg.kind == "linear":
        return 1.0 - (1.0 - floor) * progress
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))  # cosine


def lr_multiplier_tokens(tokens: int, cfg: ScheduleConfig) -> float:
    """Multiplier of the peak LR for the update that ends with `tokens` tokens trained (a recipe's schedule,
    continuous across stages whose batch or sequence length differ: it depends on tokens, not on steps).

    warmup: tokens / warmup_tokens (never an update with LR 0).
    then cfg.kind from 1 down to min_lr_ratio at total_tokens (cosine, linear or wsd as lr_multiplier; constant 1).
    anneal (anneal_tokens > 0, tokens past anneal_start_tokens): linear from the value at anneal_start_tokens down
    to 0 at anneal_start_tokens + anneal_tokens (Llama 3's annealing; the update ending there has LR 0).
    """
    if cfg.anneal_tokens > 0 and tokens > cfg.anneal_start_tokens:
        start = lr_multiplier_tokens(cfg.anneal_start_tokens, cfg) if cfg.anneal_start_tokens > 0 else 1.0
        return start * max(0.0, 1.0 - (tokens - cfg.anneal_start_tokens) / cfg.anneal_tokens)
    if tokens < cfg.warmup_tokens:
        return max(tokens, 1) / cfg.warmup_tokens
    floor = cfg.min_lr_ratio
    if cfg.kind == "constant":
        return 1.0
    if cfg.kind == "wsd":
        decay_start = max(cfg.warmup_tokens, cfg.total_tokens - cfg.decay_fraction * cfg.total_tokens)
        progress = (tokens - decay_start) / max(1.0, cfg.total_tokens - decay_start)
        return 1.0 - (1.0 - floor) * min(1.0, max(0.0, progress))
    progress = min(1.0, (tokens - cfg.warmup_tokens) / max(1, cfg.total_tokens - cfg.warmup_tokens))
    if cfg.kind == "linear":
        return 1.0 - (1.0 - floor) * progress
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))  # cosine


def stage_lr_multiplier(step: int, tokens_per_step: int, cfg: ScheduleConfig) -> float:
    """The token schedule seen from a run that is one stage of a recipe: global update `step` (0-based) of a
    stage that began at update cfg.stage_start_step with cfg.stage_start_tokens trained, tokens_per_step each."""
    done = cfg.stage_start_tokens + (step - cfg.stage_start_step + 1) * tokens_per_step
    return lr_multiplier_tokens(max(done, 1), cfg)
