"""AdamW over fp32 master weights and its LR schedule."""

import torch
from torch import nn

from engine.config import OptimConfig, ScheduleConfig
from engine.schedule import lr_multiplier, stage_lr_multiplier


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (norm weights are not decayed); fused on CUDA, foreach on CPU."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    fused = device.type == "cuda"
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                             fused=fused, foreach=None if fused else True)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, total_steps: int,
                    tokens_per_step: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """The step schedule, or with cfg.total_tokens set (a recipe stage) the token schedule (engine/schedule.py)."""
    if cfg.total_tokens > 0:
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: stage_lr_multiplier(step, tokens_per_step, cfg))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(step, total_steps, cfg))
