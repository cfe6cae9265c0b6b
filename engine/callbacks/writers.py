"""Metrics to disk: TensorBoard event files and metrics.jsonl (one JSON object per step).

metrics.jsonl is strict JSON (RFC 8259), readable by any parser: a non-finite value (the NaN loss of a step the
guard skipped, an overflowing val_ppl) is written as null and named with its kind in the record's "nonfinite"
object, e.g. {"step": 3, "loss": null, ..., "nonfinite": {"loss": "nan"}}.
"""

import json
import math
import numbers
from pathlib import Path
from typing import Callable, Dict, List, Optional

from engine.callbacks.base import Callback
from engine.data.skips import SkipReport
from engine.errors import HerdError
from engine.files import open_append
from engine.secrets import scrub


def strict_record(record: Dict) -> Dict:
    """The record with non-finite numbers as None (listed under "nonfinite") and numpy scalars as plain numbers."""
    out, nonfinite = {}, {}
    for key, value in record.items():
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            value = int(value)
        elif isinstance(value, numbers.Real) and not isinstance(value, bool):
            value = float(value)
            if not math.isfinite(value):
                nonfinite[key] = "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
                value = None
        out[key] = value
    if nonfinite:
        out["nonfinite"] = nonfinite
    return out


def new_eval_records(trainer, written: int) -> List[Dict]:
    """The trainer's eval_records (measured outside a step, e.g. long_eval at fit start and end) after the first
    `written`."""
    return list(getattr(trainer, "eval_records", ())[written:])


class JsonlCallback(Callback):
    """Appends {"step": N, "loss": ..., "lr": ..., "grad_norm": ..., "tokens_per_s": ..., ...} per step.
    `once` fields (what the data readers skipped) go into the first record this process writes. A record measured
    outside a step (trainer.eval_records) is a line of its own, {"step": N, "event": "long_eval_end", ...}."""

    def __init__(self, path: Path):
        self.path = path
        self.once: Dict[str, float] = {}
        self._records_written = 0

    def on_fit_start(self, trainer) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open_append(self.path, "the metrics")
        self._write_eval_records(trainer)

    def _write(self, record: Dict) -> None:
        self._file.write(scrub(json.dumps(strict_record(record), allow_nan=False)) + "\n")  # R17
        self._file.flush()

    def _write_eval_records(self, trainer) -> None:
        for record in new_eval_records(trainer, self._records_written):
            self._write(record)
            self._records_written += 1

    def on_step_end(self, trainer, metrics: Dict[str, float]) -> None:
        self._write({"step": trainer.state.step, **metrics, **self.once})
        self.once = {}
        self._write_eval_records(trainer)

    def on_fit_end(self, trainer) -> None:
        self._write_eval_records(trainer)
        self._file.close()

    def on_fit_abort(self, trainer) -> None:
        if getattr(self, "_file", None) is not None:
            self._file.close()


class TensorBoardCallback(Callback):
    """Scalars under train/ and val/ in <run>/tb, x axis = optimizer step."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self._records_written = 0

    def on_fit_start(self, trainer) -> None:
        from torch.utils.tensorboard import SummaryWriter
        self._writer = SummaryWriter(log_dir=str(self.log_dir))
        initial = trainer.initial_val_loss
        if initial is not None:
            self._writer.add_scalar("val/loss", initial, trainer.state.step)
        self._write_eval_records(trainer)

    def _write_eval_records(self, trainer) -> None:
        """trainer.eval_records' numbers under their own names as tags (long_eval/short_loss, ...)."""
        for record in new_eval_records(trainer, self._records_written):
            for key, value in record.items():
                if key != "step" and isinstance(value, numbers.Real) and not isinstance(value, bool):
                    self._writer.add_scalar(scrub(key), value, record["step"])
            self._records_written += 1

    def on_step_end(self, trainer, metrics: Dict[str, float]) -> None:
        for key, value in metrics.items():
            tag = f"val/{key[4:]}" if key.startswith("val_") else f"train/{key}"
            self._writer.add_scalar(scrub(tag), value, trainer.state.step)  # tags are text in the event file (R17)
        self._write_eval_records(trainer)

    def on_fit_end(self, trainer) -> None:
        self._write_eval_records(trainer)
        self._writer.flush()
        self._writer.close()

    def on_fit_abort(self, trainer) -> None:
        """The event writer's thread is stopped and its file flushed (a left-over writer thread outlives the fit
        that failed)."""
        if getattr(self, "_writer", None) is not None:
            self._writer.close()


def report_data_skips(skips: Optional[SkipReport], run_dir: Path, say: Callable[[str], None],
                      callbacks: List[Callback]) -> None:
    """Rank 0, after the run directory is made: when the data readers left anything out, one console line,
    <run>/skipped.json (counts per reason and file, first places) and data_skipped fields in the first
    metrics.jsonl record. Nothing when nothing was skipped."""
    if skips is None or not (skips.total or skips.notes):
        return
    path = skips.write(Path(run_dir) / "skipped.json")
    say(f"data: {skips.summary()}; per file and line in {path}")
    for callback in callbacks:
        if isinstance(callback, JsonlCallback):
            callback.once.update(skips.metrics())
