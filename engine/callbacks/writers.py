"""Metrics to disk: TensorBoard event files and metrics.jsonl (one JSON object per step)."""

import json
from pathlib import Path
from typing import Dict

from engine.callbacks.base import Callback
from engine.secrets import scrub


class JsonlCallback(Callback):
    """Appends {"step": N, "loss": ..., "lr": ..., "grad_norm": ..., "tokens_per_s": ..., ...} per step."""

    def __init__(self, path: Path):
        self.path = path

    def on_fit_start(self, trainer) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")

    def on_step_end(self, trainer, metrics: Dict[str, float]) -> None:
        self._file.write(scrub(json.dumps({"step": trainer.state.step, **metrics})) + "\n")  # R17
        self._file.flush()

    def on_fit_end(self, trainer) -> None:
        self._file.close()


class TensorBoardCallback(Callback):
    """Scalars under train/ and val/ in <run>/tb, x axis = optimizer step."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir

    def on_fit_start(self, trainer) -> None:
        from torch.utils.tensorboard import SummaryWriter
        self._writer = SummaryWriter(log_dir=str(self.log_dir))
        initial = trainer.initial_val_loss
        if initial is not None:
            self._writer.add_scalar("val/loss", initial, trainer.state.step)

    def on_step_end(self, trainer, metrics: Dict[str, float]) -> None:
        for key, value in metrics.items():
            tag = f"val/{key[4:]}" if key.startswith("val_") else f"train/{key}"
            self._writer.add_scalar(scrub(tag), value, trainer.state.step)  # tags are text in the event file (R17)

    def on_fit_end(self, trainer) -> None:
        self._writer.flush()
        self._writer.close()
