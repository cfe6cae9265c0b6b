"""What one training step means. The Trainer loop only calls `train_step`; LM pretraining is defined here, and
SFT, reward-model and DPO steps are further TrainModules with the same interface."""

import contextlib
import os
import signal
from typing import Callable, ContextManager, Dict, List, Optional, Tuple

import torch

from engine.data.loader import Batch
from parallel.parallelize import Parallelized


def fault_point(point: str) -> None:
    """Fault injection for the kill tests (shared/TESTING.md R2): HERD_FAULT=<point>:<rank>:<n> SIGKILLs that rank
    the n-th time it passes `point`. Unset, this is one dictionary lookup."""
    spec = os.environ.get("HERD_FAULT")
    if not spec:
        return
    name, rank, count = spec.split(":")
    if name == point and os.environ.get("RANK", "0") == rank:
        _FAULT_COUNTS[point] = _FAULT_COUNTS.get(point, 0) + 1
        if _FAULT_COUNTS[point] == int(count):
            os.kill(os.getpid(), signal.SIGKILL)


_FAULT_COUNTS: Dict[str, int] = {}


class TrainModule:
    """Owns the model, the optimizer and the LR scheduler, and defines a step on a list of micro-batches."""

    def train_step(self, micro_batches: List[Batch]) -> Dict[str, float]:
        raise NotImplementedError

    def eval_loss(self, micro_batches: List[Batch]) -> Tuple[float, int]:
        raise NotImplementedError


class LMTrainModule(TrainModule):
    """Next-token prediction: one optimizer step over all micro-batches of a global batch.

    The loss is the sum of token losses divided by the number of loss tokens in the whole step, over every rank
    holding other tokens (dp x cp), so accumulating gradients over micro-batches (in fp32, on the fp32 master
    weights) and over ranks equals one large batch exactly; the forward runs under bf16 autocast when asked. What
    depends on the layout (the loss over vocabulary shards, dp/cp sums, gradient sync, the global norm, the
    pipeline schedule) comes from `parallel`.
    """

    def __init__(self, parallel: Parallelized, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler, device: torch.device, dtype: str,
                 grad_clip: float, forward_context: Optional[Callable[[], ContextManager]] = None,
                 step_context: Optional[Callable[[], ContextManager]] = None):
        self.parallel = parallel
        self.optimizer, self.scheduler = optimizer, scheduler
        self.device, self.grad_clip = device, grad_clip
        self.autocast_dtype = torch.bfloat16 if dtype == "bf16" else None
        self.forward_context = forward_context or contextlib.nullcontext  # e.g. TransformerEngine's fp8_autocast
        self.step_context = step_context or contextlib.nullcontext  # around a step's micro-batches: FP8 weight cache
        self.step_guard = None  # engine/callbacks/guards.py StepGuard, installed by GuardCallback
        self.loss_copies = 1  # ranks of one data-parallel rank that report the same loss (cp, for align/ losses)

    @property
    def model(self) -> torch.nn.Module:
        return self.parallel.model

    @contextlib.contextmanager
    def autocast(self):
        with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None), self.forward_context():
            yield

    def micro_loss(self, logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """One micro-batch's summed loss from its logits [b, s, vocab (shard)] (on the last pipeline stage).
        Post-training modules (align/) override this and `count_tokens`; the rest of the step is shared."""
        return self.parallel.loss_sum(logits, targets, mask)

    def _loss_sum(self, batch: Batch) -> torch.Tensor:
        with self.autocast():
            logits = self.parallel.model(batch.inputs, batch.position_ids, batch.doc_ids)  # [b, s, vocab (shard)]
        return self.micro_loss(logits, batch.targets, batch.loss_mask)

    def count_tokens(self, micro_batches: List[Batch]) -> int:
        """Loss tokens in the step over all ranks with other tokens (counted on the host, summed over dp x cp)."""
        local = torch.tensor(float(sum(b.num_tokens for b in micro_batches)), device=self.device)
        return int(self.parallel.sum_over_data(local).item())

    def _forward_backward(self, micro_batches: List[Batch], total_tokens: int) -> torch.Tensor:
        """Backpropagate every micro-batch's share of the step loss; returns the summed (unscaled) loss."""
        scale = self.parallel.loss_scale
        if self.parallel.pipeline is not None:
            def step_loss(logits, targets, mask):
                return self.micro_loss(logits, targets, mask) / total_tokens * scale
            with self.autocast():
                return self.parallel.pipeline.forward_backward(micro_batches, step_loss) / scale
        loss = torch.zeros((), device=self.device)
        for index, batch in enumerate(micro_batches):
            self.parallel.set_gradient_sync(index == len(micro_batches) - 1)
            micro_loss = self._loss_sum(batch) / total_tokens
            (micro_loss * scale if scale != 1.0 else micro_loss).backward()
            loss += micro_loss.detach()
        return loss

    def train_step(self, micro_batches: List[Batch]) -> Dict[str, float]:
        self.parallel.train(True)
        total_tokens = max(1, self.count_tokens(micro_batches))
        self.optimizer.zero_grad(set_to_none=True)
        with self.step_context():
            loss = self._forward_backward(micro_batches, total_tokens)
        fault_point("after_backward")
        self.parallel.finish_gradients()
        grad_norm = self.parallel.clip_grad_norm(self.grad_clip)
        loss = self.parallel.sum_over_data(loss) / self.loss_copies  # before the update: the guards judge it
        lr = self.optimizer.param_groups[0]["lr"]
        if self.step_guard is None or self.step_guard.check(loss, grad_norm):
            self.optimizer.step()
            self.scheduler.step()
        else:  # withheld on every rank (NaN/Inf or a loss spike): no update, the schedule does not advance
            self.optimizer.zero_grad(set_to_none=True)
        return {"loss": loss.item(), "grad_norm": grad_norm.item(), "lr": lr, "loss_tokens": total_tokens}

    @torch.no_grad()
    def eval_loss(self, micro_batches: List[Batch]) -> Tuple[float, int]:
        """(summed token loss, loss tokens) over the micro-batches of every rank with other tokens, in eval mode."""
        self.parallel.train(False)
        tokens = torch.tensor(float(sum(b.num_tokens for b in micro_batches)), device=self.device,
                              dtype=torch.float64)
        total = self._forward_total(micro_batches)
        return self.parallel.sum_over_data(total).item(), int(self.parallel.sum_over_data(tokens).item())

    def _forward_total(self, micro_batches: List[Batch]) -> torch.Tensor:
        """This rank's summed micro_loss over the micro-batches, forward only (float64 scalar)."""
        if self.parallel.pipeline is not None:
            with self.autocast():
                total = self.parallel.pipeline.forward_only(micro_batches, self.micro_loss).double()
        else:
            total = torch.zeros((), device=self.device, dtype=torch.float64)
            for batch in micro_batches:
                total += self._loss_sum(batch).double()
        self._reshard()
        return total

    def _reshard(self) -> None:
        """FSDP keeps the root's gathered parameters (every layer's with reshard_after_forward=false) after a
        forward, for the backward; an evaluation has none, so free them: after an evaluation each rank holds only
        its shards again, as after a training step."""
        if not self.parallel.fsdp:
            return
        from torch.distributed.fsdp import FSDPModule
        for part in self.parallel.parts:
            for module in part.modules():
                if isinstance(module, FSDPModule):
                    module.reshard()
