"""A fit that ends by an exception releases what its callbacks hold: metrics.jsonl closed with what was written,
the TensorBoard writer's thread stopped (a thread left behind outlives the run), and a callback that fails while
releasing does not hide the exception that ended the fit."""

import json
import threading

import pytest
import torch

from engine.callbacks.base import Callback
from engine.callbacks.writers import JsonlCallback, TensorBoardCallback
from engine.trainer import Trainer, TrainState


class _Batch:
    def to(self, device):
        return self


class _Loader:
    def next_step(self):
        return [_Batch()]


class _FailsAtStep:
    def __init__(self, step: int):
        self.step, self.calls = step, 0

    def train_step(self, micro_batches):
        self.calls += 1
        if self.calls == self.step:
            raise RuntimeError("the step failed")
        return {"loss": 1.0 / self.calls}


class _BrokenRelease(Callback):
    def on_fit_abort(self, trainer) -> None:
        raise OSError("cannot release")


def test_a_failed_fit_closes_its_writers_and_keeps_its_exception(tmp_path):
    before = set(threading.enumerate())
    jsonl, tb = JsonlCallback(tmp_path / "metrics.jsonl"), TensorBoardCallback(tmp_path / "tb")
    trainer = Trainer(_FailsAtStep(3), _Loader(), TrainState(total_steps=10), torch.device("cpu"),
                      [_BrokenRelease(), jsonl, tb])
    with pytest.raises(RuntimeError, match="the step failed"):
        trainer.fit()
    assert jsonl._file.closed
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    left = [t for t in set(threading.enumerate()) - before if t.is_alive()]
    assert left == [], left
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_a_fit_that_ends_normally_does_not_abort(tmp_path):
    aborted = []

    class Records(Callback):
        def on_fit_abort(self, trainer) -> None:
            aborted.append(trainer.state.step)

    trainer = Trainer(_FailsAtStep(99), _Loader(), TrainState(total_steps=2), torch.device("cpu"), [Records()])
    trainer.fit()
    assert aborted == [] and trainer.state.step == 2
