"""What the bad-input hunt H38 left open in the checkpoint directory, fixed (session 14): a FIFO planted as the
lock file hung a run that does not save (opening it for reading waits for a writer forever); `latest` turned into
a directory, or an old checkpoint that cannot be deleted, crashed the run after a save had committed (with two
ranks the watchdog reported it as a HANG); `config.yaml` that is a directory was a traceback; a store without a
complete checkpoint did not say why; a saved config's errors named a temporary file."""

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.checkpoint import store as store_module
from engine.checkpoint.manifest import configs_of, saved_section
from engine.checkpoint.ownership import DirectoryBusy, DirectoryLock
from engine.checkpoint.store import CheckpointError, CheckpointStore
from engine.errors import ConfigError
from engine.run import build_trainer
from tests.helpers import make_corpus, tiny_config
from tests.unit.test_checkpoint_store import save

ROOT = Path(__file__).resolve().parents[2]


def test_a_fifo_lock_file_is_one_line_not_a_hang(tmp_path):
    os.mkfifo(tmp_path / ".herd-lock")
    script = ("import sys; from engine.checkpoint.ownership import DirectoryLock\n"
              "from engine.errors import HerdError\n"
              "for take in ('test', 'acquire'):\n"
              "    try: getattr(DirectoryLock(sys.argv[1]), take)()\n"
              "    except HerdError as e: print(take, e)\n")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)  # a guard: it hung before
    assert done.stdout.splitlines() == [
        f"{take} {tmp_path}/.herd-lock: is a FIFO, not the lock file herd keeps there; move it away"
        for take in ("test", "acquire")], done.stderr
    assert (tmp_path / ".herd-lock").exists()  # the user's FIFO is left as it is


def test_a_busy_directory_says_which_process_holds_it(tmp_path):
    holder = DirectoryLock(tmp_path)
    assert holder.acquire() is None
    try:
        with pytest.raises(DirectoryBusy) as busy:
            DirectoryLock(tmp_path).test()
        assert busy.value.pid == os.getpid() and busy.value.is_this_process()
        assert f"(held by pid {os.getpid()} on " in str(busy.value)
    finally:
        holder.release()
    (tmp_path / ".herd-lock").write_text("held by pid 1 on elsewhere")  # recorded, not trusted: nobody holds it
    assert DirectoryLock(tmp_path).test() is None


def test_latest_that_became_a_directory_loses_nothing_and_is_refused_at_start(tmp_path, capfd):
    store = CheckpointStore(tmp_path / "ck")
    save(store, 2)
    (tmp_path / "ck" / "latest").unlink()
    (tmp_path / "ck" / "latest").mkdir()
    save(store, 4)  # committed by its marker; `latest` is for people: a warning, not a crash
    assert store.latest_step() == 4 and store.verify(4)["step"] == 4
    assert capfd.readouterr().err.splitlines() == [
        f"herd: warning: {tmp_path}/ck/latest: not updated to step_00000004 (Is a directory); resume is "
        f"unaffected (it goes by the COMMITTED markers)"]
    corpus = make_corpus(tmp_path / "corpus")
    cfg = tiny_config(corpus, tmp_path / "runs", ["train.steps=2", "checkpoint.every=1",
                                                  f"checkpoint.dir={tmp_path}/ck"])
    with pytest.raises(CheckpointError, match=rf"^{tmp_path}/ck/latest: is a directory; herd writes the newest "
                                              r"checkpoint's name there, move it away$"):
        build_trainer(cfg, io.StringIO())


def test_an_old_checkpoint_that_cannot_be_removed_is_a_warning(tmp_path, capfd, monkeypatch):
    store = CheckpointStore(tmp_path, keep_last=2)
    save(store, 2)
    save(store, 4)

    def refuse(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(Path(path) / "shards"))

    monkeypatch.setattr(store_module.shutil, "rmtree", refuse)
    save(store, 6)
    save(store, 8)  # the same failure again is not said twice
    err = capfd.readouterr().err.splitlines()
    assert err == [f"herd: warning: {tmp_path}/step_00000002: an old checkpoint could not be removed (Permission "
                   f"denied: {tmp_path}/step_00000002/shards); training goes on, remove it by hand",
                   f"herd: warning: {tmp_path}/step_00000004: an old checkpoint could not be removed (Permission "
                   f"denied: {tmp_path}/step_00000004/shards); training goes on, remove it by hand"]
    assert store.complete_steps() == [6, 8]  # the left-over ones lost their markers first: never loaded


def test_a_config_yaml_that_is_a_directory_is_one_line_on_resume(tmp_path):
    corpus = make_corpus(tmp_path / "corpus")
    args = ["log.name=cfgdir", "train.eval_every=0", "checkpoint.every=1"]
    build_trainer(tiny_config(corpus, tmp_path / "runs", args + ["train.steps=2"]), io.StringIO()).fit()
    run = tmp_path / "runs" / "cfgdir"
    (run / "config.yaml").unlink()
    (run / "config.yaml").mkdir()  # resuming keeps the run directory: herd must write its config there
    with pytest.raises(ConfigError, match=r"^log\.name: .*/runs/cfgdir/config\.yaml is a directory, not a regular "
                                          r"file; move it away \(herd writes the run's config there\)$"):
        build_trainer(tiny_config(corpus, tmp_path / "runs", args + ["train.steps=4"]), io.StringIO())
    assert (run / "config.yaml").is_dir() and CheckpointStore(run / "checkpoints").latest_step() == 2


def test_no_complete_checkpoint_says_why(tmp_path):
    assert CheckpointStore(tmp_path).why_none_complete() == "no step_* directories"
    store = CheckpointStore(tmp_path)
    save(store, 2)
    (tmp_path / "step_00000002" / "manifest.json").unlink()
    (tmp_path / "step_00000002" / "manifest.json").mkdir()
    assert store.why_none_complete() == "the newest, step_00000002: manifest.json: Is a directory"
    save(store, 4)
    (tmp_path / "step_00000004" / "COMMITTED").write_text("0" * 64)
    assert store.why_none_complete() == "the newest, step_00000004: its manifest does not match its commit marker"


def test_a_saved_config_is_read_by_section_and_named_as_such(tmp_path):
    assert saved_section("model: {dim: 64}\nlog: {token: '***'}\n", "model") == {"dim": 64}
    assert saved_section(": not yaml: [", "model") == {} and saved_section("- a list", "model") == {}
    manifest = {"meta": {"config": "model:\n  dim: 64\n  dim: 65\n", "world_size": 1}}  # a duplicate key
    with pytest.raises(CheckpointError) as raised:
        configs_of(manifest, tmp_path / "manifest.json")
    assert str(raised.value).startswith(f"{tmp_path}/manifest.json: field 'meta.config' describes no valid model (")
    assert "the saved config" in str(raised.value) and "/tmp" not in str(raised.value).split("manifest.json", 1)[1]
