"""The console's ETA follows recent steps, and the closing lines name only the logs the run writes."""

import io
from types import SimpleNamespace

import pytest
import torch

from engine.callbacks import ConsoleCallback, JsonlCallback, TensorBoardCallback, ThroughputCallback
from engine.run import build_callbacks
from engine.trainer import TrainState
from tests.helpers import tiny_config


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def run_steps(durations, total_steps, window=20):
    """Drive a ThroughputCallback through steps taking `durations` seconds each (all of it inside the step);
    returns the eta_s reported after each step."""
    clock = FakeClock()
    callback = ThroughputCallback(flops_per_token=1e6, world_size=1, peak_tflops=0.0, window=window, clock=clock)
    trainer = SimpleNamespace(device=torch.device("cpu"), state=TrainState(total_steps=total_steps,
                                                                           tokens_per_step=1000))
    callback.on_fit_start(trainer)
    etas = []
    for seconds in durations:
        callback.on_step_start(trainer)
        clock.now += seconds
        trainer.state.step += 1
        metrics = {}
        callback.on_step_end(trainer, metrics)
        assert metrics["step_time"] == pytest.approx(seconds)
        etas.append(metrics["eta_s"])
    return etas


def test_slow_first_step_does_not_skew_the_eta():
    # a 100 s first step (compilation, warm-up), then 1 s steps: after step 3 of 10, 7 steps of 1 s are left
    # (a mean since the first step would say 7 * 102 / 3 = 238 s)
    etas = run_steps([100.0, 1.0, 1.0], total_steps=10)
    assert etas[0] == pytest.approx(9 * 100.0)  # nothing else is known yet
    assert etas[1] == pytest.approx(8 * 1.0)
    assert etas[2] == pytest.approx(7 * 1.0)


def test_eta_follows_a_change_of_speed_within_the_window():
    # 1 s steps, then the run slows to 3 s per step: once the window (4 steps) holds only slow steps, so does the ETA
    etas = run_steps([1.0] * 5 + [3.0] * 4, total_steps=20, window=4)
    assert etas[4] == pytest.approx(15 * 1.0)
    assert etas[6] == pytest.approx(13 * 2.0)  # two fast and two slow steps in the window
    assert etas[8] == pytest.approx(11 * 3.0)


def test_time_between_steps_counts_in_the_eta():
    # an evaluation or checkpoint between steps is part of the run's time: 1 s inside each step, 1 s outside
    clock = FakeClock()
    callback = ThroughputCallback(1e6, 1, 0.0, clock=clock)
    trainer = SimpleNamespace(device=torch.device("cpu"), state=TrainState(total_steps=10, tokens_per_step=1000))
    callback.on_fit_start(trainer)
    for _ in range(4):
        clock.now += 1.0  # data loading, the previous step's callbacks
        callback.on_step_start(trainer)
        clock.now += 1.0
        trainer.state.step += 1
        metrics = {}
        callback.on_step_end(trainer, metrics)
    assert metrics["step_time"] == pytest.approx(1.0)
    assert metrics["eta_s"] == pytest.approx(6 * 2.0)


@pytest.mark.parametrize("jsonl,tensorboard", [(True, True), (True, False), (False, True), (False, False)])
def test_footer_names_only_the_logs_the_run_writes(tmp_path, jsonl, tensorboard):
    cfg = tiny_config(tmp_path / "corpus", tmp_path / "runs", [f"log.jsonl={str(jsonl).lower()}",
                                                               f"log.tensorboard={str(tensorboard).lower()}"])
    state = TrainState(total_steps=cfg.train.steps, tokens_per_step=256)
    callbacks = build_callbacks(cfg, state, torch.device("cpu"), [], stream=io.StringIO())
    footer = next(c for c in callbacks if isinstance(c, ConsoleCallback)).footer
    written = [str(c.path) for c in callbacks if isinstance(c, JsonlCallback)]
    written += [str(c.log_dir) for c in callbacks if isinstance(c, TensorBoardCallback)]
    run = tmp_path / "runs" / "t"
    assert written == [p for p, on in ((f"{run}/metrics.jsonl", jsonl), (f"{run}/tb", tensorboard)) if on]
    assert [line.split(":")[0] for line in footer] == [name for name, on in (("metrics", jsonl),
                                                                             ("TensorBoard", tensorboard)) if on]
    for line, path in zip(footer, written):  # each line names the path its writer writes
        assert path in line
