"""What one training step means. The Trainer loop only calls `train_step`; LM pretraining is defined here, and
SFT, reward-model and DPO steps are further TrainModules with the same interface."""

from typing import Dict, List, Tuple

import torch
from torch import nn

from engine import ops
from engine.data.loader import Batch


class TrainModule:
    """Owns the model, the optimizer and the LR scheduler, and defines a step on a list of micro-batches."""

    def train_step(self, micro_batches: List[Batch]) -> Dict[str, float]:
        raise NotImplementedError

    def eval_loss(self, micro_batches: List[Batch]) -> Tuple[float, int]:
        raise NotImplementedError


class LMTrainModule(TrainModule):
    """Next-token prediction: one optimizer step over all micro-batches of a global batch.

    The loss is the sum of token losses divided by the number of loss tokens in the whole step, so accumulating
    gradients over micro-batches (in fp32, on the fp32 master weights) equals one large batch exactly; the
    forward runs under bf16 autocast when asked.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler, device: torch.device, dtype: str,
                 grad_clip: float):
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.device, self.grad_clip = device, grad_clip
        self.autocast_dtype = torch.bfloat16 if dtype == "bf16" else None

    def _loss_sum(self, batch: Batch) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None):
            logits = self.model(batch.inputs, batch.position_ids, batch.doc_ids)  # [b, s, vocab]
        return ops.cross_entropy_sum(logits, batch.targets, batch.loss_mask)

    def count_tokens(self, micro_batches: List[Batch]) -> int:
        """Loss tokens in the step (on one rank: all of them; a data-parallel step sums over ranks)."""
        return sum(b.num_tokens for b in micro_batches)

    def train_step(self, micro_batches: List[Batch]) -> Dict[str, float]:
        self.model.train()
        total_tokens = max(1, self.count_tokens(micro_batches))
        self.optimizer.zero_grad(set_to_none=True)
        loss = torch.zeros((), device=self.device)
        for batch in micro_batches:
            micro_loss = self._loss_sum(batch) / total_tokens
            micro_loss.backward()
            loss += micro_loss.detach()
        params = [p for p in self.model.parameters() if p.grad is not None]
        max_norm = self.grad_clip if self.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        return {"loss": loss.item(), "grad_norm": grad_norm.item(), "lr": lr, "loss_tokens": total_tokens}

    @torch.no_grad()
    def eval_loss(self, micro_batches: List[Batch]) -> Tuple[float, int]:
        """(summed token loss, loss tokens) over the micro-batches, in eval mode."""
        self.model.eval()
        total, tokens = 0.0, 0
        for batch in micro_batches:
            total += self._loss_sum(batch).item()
            tokens += batch.num_tokens
        return total, tokens
