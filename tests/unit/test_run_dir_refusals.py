"""The run directory takes nothing that is not herd's (found by helper H40's hunt): `log.name=data` in the folder
holding the training data moved the data aside (rc 0, "an earlier run of the same name was moved"); a
checkpoint.dir that is the run directory itself was moved aside by its own run, lock and all; a file where the
run writes its TensorBoard or heartbeat directory was a traceback; two runs moved aside in one second collided."""

import io
from pathlib import Path

import pytest

from engine import files
from engine.checkpoint.ownership import DirectoryBusy, DirectoryLock
from engine.errors import ConfigError
from engine.run import build_trainer
from tests.helpers import make_corpus, tiny_config

RUN = ["train.eval_every=0", "train.steps=2"]


def test_a_folder_that_is_not_a_run_is_never_moved_aside(tmp_path):
    corpus = make_corpus(tmp_path / "corpus")
    (tmp_path / "runs" / "data").mkdir(parents=True)
    (tmp_path / "runs" / "data" / "train.bin").write_bytes(b"the user's data")
    with pytest.raises(ConfigError, match=r"^log\.name: .*/runs/data exists and is not a herd run directory \(it "
                                          r"holds none of config\.yaml, .*\); herd moves an earlier run aside, never "
                                          r"another folder: choose another log\.name or log\.run_dir$"):
        build_trainer(tiny_config(corpus, tmp_path / "runs", RUN + ["log.name=data"]), io.StringIO())
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["data"]
    assert (tmp_path / "runs" / "data" / "train.bin").read_bytes() == b"the user's data"


def test_a_checkpoint_dir_that_is_the_run_directory_stays_in_place_and_locked(tmp_path):
    corpus = make_corpus(tmp_path / "corpus")
    args = RUN + ["log.name=cr", f"checkpoint.dir={tmp_path}/runs/cr", "checkpoint.every=1"]
    out = io.StringIO()
    trainer = build_trainer(tiny_config(corpus, tmp_path / "runs", args), out)
    assert "moved" not in out.getvalue() and [p.name for p in (tmp_path / "runs").iterdir()] == ["cr"]
    with pytest.raises(DirectoryBusy):  # held while the run lives (flock: even against this process)
        DirectoryLock(tmp_path / "runs" / "cr").test()
    trainer.fit()
    assert trainer.checkpointer.store.latest_step() == 2
    rerun = io.StringIO()
    build_trainer(tiny_config(corpus, tmp_path / "runs", args[:-1] + ["train.steps=4", "checkpoint.every=1"]),
                  rerun).fit()
    assert "resumed from" in rerun.getvalue() and [p.name for p in (tmp_path / "runs").iterdir()] == ["cr"]


@pytest.mark.parametrize("name", ["tb", "heartbeat"])
def test_a_file_where_the_run_writes_a_directory_is_one_line(tmp_path, name):
    corpus = make_corpus(tmp_path / "corpus")
    args = RUN + ["log.name=w", "checkpoint.every=1", "log.tensorboard=true"]
    build_trainer(tiny_config(corpus, tmp_path / "runs", args), io.StringIO()).fit()
    target = tmp_path / "runs" / "w" / name
    if target.is_dir():
        for child in target.iterdir():
            child.unlink()
        target.rmdir()
    target.write_text("a user's file")
    with pytest.raises(ConfigError, match=rf"^log\.name: .*/runs/w/{name} is a file, not the directory herd writes "
                                          rf"its {name} files into; move it away$"):
        build_trainer(tiny_config(corpus, tmp_path / "runs", args[:1] + ["train.steps=4"] + args[2:]),
                      io.StringIO())
    assert target.read_text() == "a user's file"


def test_two_moves_aside_in_one_second_take_two_names(tmp_path, monkeypatch):
    monkeypatch.setattr(files.time, "strftime", lambda fmt: "20261207-120000")
    (tmp_path / "run.20261207-120000").mkdir()  # an earlier move this second, or a planted name
    assert files.aside_name(tmp_path / "run") == tmp_path / "run.20261207-120000-2"
    (tmp_path / "run.20261207-120000-2").symlink_to("/nonexistent")
    assert files.aside_name(tmp_path / "run") == tmp_path / "run.20261207-120000-3"


@pytest.mark.parametrize("kind", ["file", "fifo", "dangling symlink"])
def test_a_log_name_that_is_not_a_directory_is_one_line(tmp_path, kind):
    import os
    from engine.config import load_config
    (tmp_path / "runs").mkdir()
    target = tmp_path / "runs" / "x"
    {"file": lambda: target.write_text("mine"), "fifo": lambda: os.mkfifo(target),
     "dangling symlink": lambda: target.symlink_to(tmp_path / "gone")}[kind]()
    with pytest.raises(ConfigError, match=r"^log\.name: .*/runs/x is .*, not a run directory: choose another "
                                          r"log\.name or move it away$"):
        load_config(None, ["data.train=[]", f"log.run_dir={tmp_path}/runs", "log.name=x"])
    assert os.path.lexists(target)


@pytest.mark.parametrize("key", ["log.run_dir", "checkpoint.dir"])
def test_a_directory_name_too_long_for_the_file_system_is_one_line(tmp_path, key):
    from engine.config import load_config
    with pytest.raises(ConfigError, match=rf"^{key}: '.*\.\.\.': a name of 300 bytes, longer than the 255"):
        load_config(None, ["data.train=[]", f"{key}={tmp_path}/{'d' * 300}"])


def test_a_filler_name_too_long_is_one_line(tmp_path):
    from engine.config import load_config
    with pytest.raises(ConfigError, match=r"^long_eval\.filler: '.*' cannot be read \(File name too long\)$"):
        load_config(None, ["data.train=[]", "long_eval.enabled=true", "long_eval.short_seq_len=0",
                           "long_eval.needle_trials=1", f"long_eval.filler={tmp_path}/{'f' * 300}"])


def test_a_fifo_as_the_run_dir_is_named_for_what_it_is(tmp_path):
    import os
    from engine.config import load_config
    os.mkfifo(tmp_path / "runs")
    with pytest.raises(ConfigError, match=r"^log\.run_dir: '.*runs' cannot be a directory: .*runs is a FIFO$"):
        load_config(None, ["data.train=[]", f"log.run_dir={tmp_path}/runs"])  # it said "is a file"


def test_validation_asked_for_without_validation_data_is_said(tmp_path):
    corpus = make_corpus(tmp_path / "corpus")
    out = io.StringIO()
    build_trainer(tiny_config(corpus, tmp_path / "runs", ["data.valid=[]", "train.eval_every=3"]), out)
    assert "warning: train.eval_every=3 but there is no validation data" in out.getvalue()


def test_validation_larger_than_the_validation_data_is_said(tmp_path):
    """eval_batches beyond what data.valid holds measures samples twice: a warning line, and none when it fits."""
    from engine.data.loader import build_blend, distinct_samples
    from engine.run import build_data
    corpus = make_corpus(tmp_path / "corpus")
    cfg = tiny_config(corpus, tmp_path / "runs", ["train.eval_batches=1"])
    loader, _ = build_data(cfg, None)
    assert loader.notes == []
    valid = build_blend(cfg.data.valid, cfg.data, cfg.model.vocab_size, seed_offset=1000)
    held = distinct_samples(valid)
    many = held // cfg.data.micro_batch_size + 1
    out = io.StringIO()
    build_trainer(tiny_config(corpus, tmp_path / "runs", RUN + [f"train.eval_batches={many}"]), out)
    assert (f"warning: train.eval_batches={many} x data.micro_batch_size={cfg.data.micro_batch_size} = "
            f"{many * cfg.data.micro_batch_size:,} validation samples, but data.valid holds {held:,}") in out.getvalue()


def test_pipeline_settings_without_a_pipeline_are_said(tmp_path):
    """A base config's pipeline keys under pp=1 are never read (H40): a warning line, none at the defaults."""
    corpus = make_corpus(tmp_path / "corpus")
    out = io.StringIO()
    build_trainer(tiny_config(corpus, tmp_path / "runs", RUN + ["log.name=a", "parallel.pp_schedule=GPipe",
                                                                "parallel.pp_layers=[1,1]"]), out)
    assert "warning: parallel.pp_schedule, parallel.pp_layers have no effect at parallel.pp=1" in out.getvalue()
    out = io.StringIO()
    build_trainer(tiny_config(corpus, tmp_path / "runs", RUN + ["log.name=b"]), out)
    assert "no effect at parallel.pp=1" not in out.getvalue()
