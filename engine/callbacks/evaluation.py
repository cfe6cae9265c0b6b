"""Held-out validation loss on a fixed set of micro-batches."""

import math
from typing import Dict, List

from engine.callbacks.base import Callback
from engine.data.loader import Batch


class EvalCallback(Callback):
    """Every `every` steps (and after the last), the token-weighted mean loss over the same validation batches."""

    def __init__(self, batches: List[Batch], every: int):
        self.batches, self.every = batches, every

    def evaluate(self, trainer) -> float:
        total, tokens = trainer.module.eval_loss([b.to(trainer.device) for b in self.batches])
        return total / max(1, tokens)

    def on_fit_start(self, trainer) -> None:
        if trainer.state.step == 0:  # the untrained model's loss: the baseline the curve falls from
            trainer.initial_val_loss = self.evaluate(trainer)
            trainer.initial_eval_metrics = dict(getattr(trainer.module, "eval_metrics", {}))

    def on_step_end(self, trainer, metrics: Dict[str, float]) -> None:
        step, last = trainer.state.step, trainer.state.total_steps
        if (self.every and step % self.every == 0) or step == last:
            metrics["val_loss"] = self.evaluate(trainer)
            metrics["val_ppl"] = math.exp(min(metrics["val_loss"], 50.0))
            # held-out metrics a post-training module computes beside its loss (reward accuracy, margins)
            metrics.update({f"val_{k}": v for k, v in getattr(trainer.module, "eval_metrics", {}).items()})
