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
