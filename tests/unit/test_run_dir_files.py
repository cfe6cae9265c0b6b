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
    with pytest.raises(HerdError, match=r"metrics\.jsonl "):  # refused when the resumed run prepares its directory
        build_trainer(tiny_config(corpus, tmp_path / "runs", RUN + ["checkpoint.every=2", "train.steps=4"]),
                      io.StringIO()).fit()  # it would resume step 2, appending to the run's logs
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


@pytest.mark.parametrize("name", ["long_eval.jsonl", "stragglers.jsonl"])
@pytest.mark.parametrize("kind", ["symlink", "fifo"])
def test_every_appended_record_file_is_refused_when_not_a_regular_file(corpus, tmp_path, name, kind):
    """long_eval.jsonl through a symlink got the records appended to a user's file, and a FIFO there hung the
    resumed run (helper H41's hunt); the straggler report was opened the same way."""
    user = tmp_path / "user.txt"
    user.write_text("mine\n")
    build_trainer(tiny_config(corpus, tmp_path / "runs", RUN + ["checkpoint.every=2"]), io.StringIO()).fit()
    target = tmp_path / "runs" / "m" / name
    target.unlink(missing_ok=True)
    target.symlink_to(user) if kind == "symlink" else os.mkfifo(target)
    with pytest.raises(HerdError, match=rf"{name} (is a symlink to .*user\.txt|is a FIFO), not the file herd "
                                        r"appends the run's records to; move it away$"):
        build_trainer(tiny_config(corpus, tmp_path / "runs", RUN + ["checkpoint.every=2", "train.steps=4"]),
                      io.StringIO())
    assert user.read_text() == "mine\n"


def test_the_append_opener_refuses_links_fifos_and_directories(tmp_path):
    from engine.files import AppendRefused, open_append
    (tmp_path / "user").write_text("mine\n")
    (tmp_path / "link").symlink_to(tmp_path / "user")
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "dir").mkdir()
    for name in ("link", "fifo", "dir"):
        with pytest.raises(AppendRefused, match=rf"^.*{name}: (cannot append the records|not a regular file)"):
            open_append(tmp_path / name, "the records")
    with open_append(tmp_path / "new.jsonl", "the records") as f:
        f.write("a\n")
    assert (tmp_path / "new.jsonl").read_text() == "a\n" and (tmp_path / "user").read_text() == "mine\n"
