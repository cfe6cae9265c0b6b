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
from tests.helpers import StepsFailingAt, StubLoader


class _BrokenRelease(Callback):
    def on_fit_abort(self, trainer) -> None:
        raise OSError("cannot release")


def test_a_failed_fit_closes_its_writers_and_keeps_its_exception(tmp_path):
    before = set(threading.enumerate())
    jsonl, tb = JsonlCallback(tmp_path / "metrics.jsonl"), TensorBoardCallback(tmp_path / "tb")
    trainer = Trainer(StepsFailingAt(3), StubLoader(), TrainState(total_steps=10), torch.device("cpu"),
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

    trainer = Trainer(StepsFailingAt(99), StubLoader(), TrainState(total_steps=2), torch.device("cpu"), [Records()])
    trainer.fit()
    assert aborted == [] and trainer.state.step == 2
