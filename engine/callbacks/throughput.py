"""Step time, tokens/s, TFLOP/s per device, MFU, peak memory and ETA."""

import resource
import sys
import time
from collections import deque
from typing import Callable, Deque, Dict, Optional

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
    the device synchronized. The ETA is the mean wall time between the ends of the last `window` steps (data,
    evaluation and checkpoints included) times the steps left. The first step of a fit is left out once a later
    one is timed: it holds start-up (compilation, allocator warm-up, the evaluation before training), and a mean
    since the start would carry that into every estimate of the run.
    """

    def __init__(self, flops_per_token: float, world_size: int, peak_tflops: float, window: int = 20,
                 clock: Callable[[], float] = time.perf_counter):
        self.flops_per_token, self.world_size, self.peak_tflops = flops_per_token, world_size, peak_tflops
        self.clock = clock  # injectable, so tests drive it
        self._start: Optional[float] = None
        self._last_end = 0.0
        self._first: Optional[float] = None  # the fit's first interval, used only until another exists
        self._recent: Deque[float] = deque(maxlen=window)

    def on_fit_start(self, trainer) -> None:
        self._last_end = self.clock()
        self._first = None
        self._recent.clear()

    def on_step_start(self, trainer) -> None:
        self._start = self.clock()

    def on_step_end(self, trainer, metrics: Dict[str, float]) -> None:
        if trainer.device.type == "cuda":
            torch.cuda.synchronize(trainer.device)
        now = self.clock()
        step_time = now - self._start
        interval, self._last_end = now - self._last_end, now
        if self._first is None:
            self._first = interval
        else:
            self._recent.append(interval)
        mean_step = sum(self._recent) / len(self._recent) if self._recent else self._first
        tokens_per_s = trainer.state.tokens_per_step / step_time
        tflops = self.flops_per_token * tokens_per_s / self.world_size / 1e12
        metrics.update(step_time=step_time, tokens_per_s=tokens_per_s, tflops=tflops,
                       mem_gib=peak_memory_gib(trainer.device),
                       eta_s=mean_step * (trainer.state.total_steps - trainer.state.step))
        if self.peak_tflops > 0:
            metrics["mfu"] = tflops / self.peak_tflops
