"""A second run of the same name never moves a live run's directory aside (found by a bad-input hunt, helper H38):
with another checkpoint.dir, the second run renamed runs/NAME, live checkpoints and lock included, and the first
run died at its next write. Now the second run is refused, naming the holder."""

import io
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from engine.errors import ConfigError
from engine.run import build_trainer
from tests.helpers import make_corpus, tiny_config

ROOT = Path(__file__).resolve().parents[2]
RUN = ["log.name=live", "train.eval_every=0", "checkpoint.every=1000"]
LIVE = """
import sys
from pathlib import Path
from engine.run import build_trainer
from tests.helpers import tiny_config
trainer = build_trainer(tiny_config(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]))
print("started", flush=True)
trainer.fit()
"""


def test_a_live_runs_directory_is_not_moved_aside(tmp_path):
    corpus = make_corpus(tmp_path / "corpus")
    live = subprocess.Popen([sys.executable, "-c", LIVE, str(corpus), str(tmp_path / "runs"), *RUN,
                             "train.steps=1000000"], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    try:
        assert live.stdout.readline().strip() == "started"  # its directory is claimed and locked
        second = tiny_config(corpus, tmp_path / "runs", RUN + ["train.steps=2", f"checkpoint.dir={tmp_path}/other"])
        with pytest.raises(ConfigError, match=r"^log\.name: .*/runs/live belongs to a run still going \(held by pid "
                                              rf"{live.pid} on .*, holding .*/runs/live\)"):
            build_trainer(second, io.StringIO())
        assert live.poll() is None and (tmp_path / "runs" / "live" / "checkpoints").is_dir()
        assert [p.name for p in (tmp_path / "runs").iterdir()] == ["live"]  # nothing moved
    finally:
        live.send_signal(signal.SIGKILL)
        live.wait()
    build_trainer(tiny_config(corpus, tmp_path / "runs", RUN + ["train.steps=2", f"checkpoint.dir={tmp_path}/other"]),
                  io.StringIO())  # once it has ended, its directory is moved aside as before
    assert sorted(p.name.split(".")[0] for p in (tmp_path / "runs").iterdir()) == ["live", "live"]


def test_a_live_run_that_does_not_save_keeps_its_directory(tmp_path):
    """It held no lock (found by helper H38's hunt): a second run of the same name moved its directory aside, and
    the live run's logs went on into the moved directory. Its rank 0 now holds <run>/.herd-lock."""
    corpus = make_corpus(tmp_path / "corpus")
    args = ["log.name=live", "train.eval_every=0", "checkpoint.every=0"]
    live = subprocess.Popen([sys.executable, "-c", LIVE, str(corpus), str(tmp_path / "runs"), *args,
                             "train.steps=1000000"], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    try:
        assert live.stdout.readline().strip() == "started"
        with pytest.raises(ConfigError, match=r"^log\.name: .*/runs/live belongs to a run still going \(held by pid "
                                              rf"{live.pid} on .*\)"):
            build_trainer(tiny_config(corpus, tmp_path / "runs", args + ["train.steps=2"]), io.StringIO())
        assert live.poll() is None and [p.name for p in (tmp_path / "runs").iterdir()] == ["live"]
    finally:
        live.send_signal(signal.SIGKILL)
        live.wait()
    trainer = build_trainer(tiny_config(corpus, tmp_path / "runs", args + ["train.steps=2"]), io.StringIO())
    trainer.fit()  # the dead run's directory is moved aside; a clean end leaves no lock file behind
    assert sorted(p.name.split(".")[0] for p in (tmp_path / "runs").iterdir()) == ["live", "live"]
    assert not (tmp_path / "runs" / "live" / ".herd-lock").exists()
