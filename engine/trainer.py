"""The training loop. It only moves data and calls hooks: the TrainModule says what a step is, callbacks do
everything else (throughput, validation, console, TensorBoard, metrics.jsonl; later checkpoints and guards)."""

from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch

from engine.callbacks.base import Callback
from engine.data.loader import StepLoader
from engine.train_module import TrainModule


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    total_steps: int = 0
    tokens_per_step: int = 0  # input tokens in one global batch (all ranks)
    stop_requested: bool = False
    preempted: int = 0  # the signal that stopped the run (0: not preempted)


class Trainer:
    def __init__(self, module: TrainModule, loader: StepLoader, state: TrainState, device: torch.device,
                 callbacks: List[Callback]):
        self.module, self.loader, self.state, self.device = module, loader, state, device
        self.callbacks = callbacks
        self.last_metrics: Dict[str, float] = {}
        self.initial_val_loss: Optional[float] = None  # set by EvalCallback before the first step
        # metrics measured outside a step (long-context evaluations at fit start and end), each a dict with "step":
        # the writers add them to metrics.jsonl and TensorBoard as they appear
        self.eval_records: List[Dict[str, Any]] = []

    def _emit(self, hook: str, *args) -> None:
        for callback in self.callbacks:
            getattr(callback, hook)(self, *args)

    def fit(self) -> Dict[str, float]:
        try:
            self._emit("on_fit_start")
            while self.state.step < self.state.total_steps and not self.state.stop_requested:
                micro_batches = [batch.to(self.device) for batch in self.loader.next_step()]
                self._emit("on_step_start")
                metrics = self.module.train_step(micro_batches)
                self.state.step += 1
                self._emit("on_step_end", metrics)
                self.last_metrics = metrics
        except BaseException:
            self._abort()
            raise
        self._emit("on_fit_end")
        return self.last_metrics

    def _abort(self) -> None:
        """Every callback releases what it holds; a failure there must not hide the exception that ended fit."""
        for callback in self.callbacks:
            try:
                callback.on_fit_abort(self)
            except Exception:  # noqa: BLE001 - the original exception is the one to report
                pass
