"""The console: a header, one plain line per step (readable in a SLURM log file: no colors, no redraws), and a
closing summary that says where the logs are."""

import sys
from typing import Dict, List, TextIO

from engine.callbacks.base import Callback
from engine.secrets import scrub


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def _si(value: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:.1f}{unit}"
    return f"{value:.0f}"


def format_step_line(step: int, total: int, m: Dict[str, float]) -> str:
    width = len(str(total))
    parts = [f"step {step:>{width}}/{total}", f"loss {m['loss']:.4f}", f"lr {m['lr']:.2e}",
             f"gnorm {m['grad_norm']:.3f}"]
    if "tokens_per_s" in m:
        parts += [f"{_si(m['tokens_per_s'])} tok/s", f"{m['tflops']:.3g} TFLOP/s",
                  f"MFU {100 * m['mfu']:.1f}%" if "mfu" in m else "MFU n/a",
                  f"mem {m['mem_gib']:.2f} GiB", f"{m['step_time']:.3f} s/step", f"ETA {_duration(m['eta_s'])}"]
    if "val_loss" in m:
        parts.append(f"val {m['val_loss']:.4f}")
    return " | ".join(parts)


class ConsoleCallback(Callback):
    def __init__(self, every: int, header: List[str], footer: List[str], stream: TextIO = sys.stdout):
        self.every, self.header, self.footer, self.stream = every, header, footer, stream
        self.first_val = None

    def _print(self, line: str) -> None:
        print(scrub(line), file=self.stream, flush=True)  # the header holds paths (R17)

    def on_fit_start(self, trainer) -> None:
        for line in self.header:
            self._print(line)
        initial = trainer.initial_val_loss
        if initial is not None:
            self._print(f"validation loss before training: {initial:.4f}")

    def on_step_end(self, trainer, metrics: Dict[str, float]) -> None:
        step = trainer.state.step
        if step % self.every == 0 or step == trainer.state.total_steps or "val_loss" in metrics:
            self._print(format_step_line(step, trainer.state.total_steps, metrics))

    def on_fit_end(self, trainer) -> None:
        m = trainer.last_metrics
        initial = trainer.initial_val_loss
        if "val_loss" in m and initial is not None:
            self._print(f"validation loss: {initial:.4f} before training -> {m['val_loss']:.4f} after "
                        f"{trainer.state.step} steps")
        for line in self.footer:
            self._print(line)
