"""Step time, tokens/s, TFLOP/s per device, MFU, peak memory and ETA."""

import resource
import sys
import time
from typing import Dict, Optional

import torch

from engine.callbacks.base import Callback


def peak_memory_gib(device: torch.device) -> float:
    """Peak allocated CUDA memory, or on CPU the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / 2**20 if sys.platform != "darwin" else kib / 2**30


class ThroughputCallback(Callback):
    """Adds step_time, tokens_per_s, tflops (per device), mfu (0..1, when the peak is known), mem_gib, eta_s.

    Step time runs from the start of the step (after the data is loaded) to the end of the optimizer step, with
    the device synchronized; the ETA uses the mean step time since the first step (which includes warm-up).
    """

    def __init__(self, flops_per_token: float, world_size: int, peak_tflops: float):
        self.flops_per_token, self.world_size, self.peak_tflops = flops_per_token, world_size, peak_tflops
        self._start: Optional[float] = None
        self._fit_start = 0.0
        self._steps_timed = 0

    def on_fit_start(self, trainer) -> None:
        self._fit_start = time.perf_counter()
        self._first_step = trainer.state.step

    def on_step_start(self, trainer) -> None:
        self._start = time.perf_counter()

    def on_step_end(self, trainer, metrics: Dict[str, float]) -> None:
        if trainer.device.type == "cuda":
            torch.cuda.synchronize(trainer.device)
        now = time.perf_counter()
        step_time = now - self._start
        tokens_per_s = trainer.state.tokens_per_step / step_time
        tflops = self.flops_per_token * tokens_per_s / self.world_size / 1e12
        mean_step = (now - self._fit_start) / max(1, trainer.state.step - self._first_step)
        metrics.update(step_time=step_time, tokens_per_s=tokens_per_s, tflops=tflops,
                       mem_gib=peak_memory_gib(trainer.device),
                       eta_s=mean_step * (trainer.state.total_steps - trainer.state.step))
        if self.peak_tflops > 0:
            metrics["mfu"] = tflops / self.peak_tflops
