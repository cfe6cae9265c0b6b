"""The run directory's files are never written through a symlink or into a FIFO (found by a bad-input hunt, helper
H38): a planted `metrics.jsonl -> user file` got the metrics appended, and a FIFO there blocked the resume forever
while it held the checkpoint lock."""

import io
import os

import pytest

from engine.errors import HerdError
from engine.run import build_trainer
from tests.helpers import make_corpus, tiny_config

RUN = ["log.name=m", "train.steps=2", "train.eval_every=0", "log.tensorboard=false"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.mark.parametrize("kind", ["symlink", "fifo", "directory"])
def test_a_resumed_runs_metrics_file_that_is_not_a_regular_file_is_refused(corpus, tmp_path, kind):
    user = tmp_path / "user.txt"
    user.write_text("mine\n")
    build_trainer(tiny_config(corpus, tmp_path / "runs", RUN + ["checkpoint.every=2"]), io.StringIO()).fit()
    metrics = tmp_path / "runs" / "m" / "metrics.jsonl"
    metrics.unlink()
    {"symlink": lambda: metrics.symlink_to(user), "fifo": lambda: os.mkfifo(metrics),
     "directory": metrics.mkdir}[kind]()
    trainer = build_trainer(tiny_config(corpus, tmp_path / "runs", RUN + ["checkpoint.every=2", "train.steps=4"]),
                            io.StringIO())  # resumes step 2, appending to the run's logs
    with pytest.raises(HerdError, match=r"metrics\.jsonl: "):
        trainer.fit()
    assert user.read_text() == "mine\n"


def test_a_resumed_runs_config_symlink_is_replaced_not_written_through(corpus, tmp_path):
    user = tmp_path / "user.txt"
    user.write_text("mine\n")
    build_trainer(tiny_config(corpus, tmp_path / "runs", RUN + ["checkpoint.every=2"]), io.StringIO()).fit()
    config = tmp_path / "runs" / "m" / "config.yaml"
    config.unlink()
    config.symlink_to(user)
    build_trainer(tiny_config(corpus, tmp_path / "runs", RUN + ["checkpoint.every=2", "train.steps=4"]),
                  io.StringIO()).fit()
    assert user.read_text() == "mine\n" and not config.is_symlink() and "steps: 4" in config.read_text()
