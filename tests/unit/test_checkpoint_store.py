"""The checkpoint commit protocol (engine/checkpoint/store.py): shared/TESTING.md R3, R5, R16, R18 and the
store's part of R15 (nothing unverified is parsed)."""

import hashlib
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from engine.checkpoint.store import MANIFEST, MARKER, CheckpointError, CheckpointStore, describe_files

ROOT = Path(__file__).resolve().parents[2]


def save(store: CheckpointStore, step: int, payload: bytes = b"") -> Path:
    """A checkpoint with two shard files and a small state file, as savers would write them."""
    path = store.begin(step)
    (path / "shards").mkdir()
    files = []
    for name, data in (("shards/rank0.bin", b"A" * 3000 + payload), ("shards/rank1.bin", b"B" * 2000),
                       ("state.json", json.dumps({"step": step}).encode())):
        (path / name).write_bytes(data)
        files.append(path / name)
    store.commit(step, describe_files(path, files))
    return path


def test_commit_verify_and_latest(tmp_path):
    store = CheckpointStore(tmp_path, keep_last=2)
    assert store.latest_step() is None
    for step in (10, 20, 30):
        save(store, step)
    assert store.complete_steps() == [20, 30]  # keep_last=2 purged step 10
    assert store.latest_step() == 30
    manifest = store.verify(30)
    assert sorted(manifest["files"]) == ["shards/rank0.bin", "shards/rank1.bin", "state.json"]
    assert (tmp_path / "latest").read_text() == "step_00000030"


def test_keep_last_below_two_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="keep_last must be at least 2"):
        CheckpointStore(tmp_path, keep_last=1)


@pytest.mark.parametrize("damage,expected", [
    ("flip", "shards/rank0.bin: sha256 differs from the manifest"),
    ("truncate", "shards/rank1.bin: 1000 bytes, the manifest says 2000"),
    ("missing", "shards/rank1.bin: missing from checkpoint step 20"),
    ("manifest", "manifest.json: does not match its commit marker"),
    ("marker", "incomplete checkpoint (No such file or directory: COMMITTED)"),
])
def test_corruption_is_detected_and_named(tmp_path, damage, expected):
    """R5: byte flip, truncation, missing shard, altered manifest, missing marker."""
    store = CheckpointStore(tmp_path, keep_last=2)
    save(store, 10)
    path = save(store, 20)
    if damage == "flip":
        data = bytearray((path / "shards/rank0.bin").read_bytes())
        data[1234] ^= 0x01
        (path / "shards/rank0.bin").write_bytes(bytes(data))
    elif damage == "truncate":
        (path / "shards/rank1.bin").write_bytes(b"B" * 1000)
    elif damage == "missing":
        (path / "shards/rank1.bin").unlink()
    elif damage == "manifest":
        (path / MANIFEST).write_text((path / MANIFEST).read_text().replace('"step": 20', '"step": 21'))
    elif damage == "marker":
        (path / MARKER).unlink()
    with pytest.raises(CheckpointError) as info:
        store.verify(20)
    print(f"{damage}: {info.value}")
    assert expected in str(info.value) and "\n" not in str(info.value)
    if damage in ("manifest", "marker"):  # no longer complete: resume falls back to the previous checkpoint
        assert store.latest_step() == 10


def test_sampled_verification_still_checks_every_size(tmp_path):
    store = CheckpointStore(tmp_path, keep_last=2, verify_sample=1)
    path = save(store, 10, payload=b"x" * (2 << 20))  # rank0.bin is large: sampled
    (path / "shards/rank1.bin").write_bytes(b"B" * 1999)
    with pytest.raises(CheckpointError, match="1999 bytes"):
        store.verify(10)


def test_paths_escaping_the_checkpoint_are_rejected(tmp_path):
    """R16: `..`, absolute paths and symlinks in a manifest; `latest` naming something else."""
    store = CheckpointStore(tmp_path / "ckpt", keep_last=2)
    path = store.begin(5)
    for bad in ("../outside", "/etc/passwd", "a/../../x"):
        with pytest.raises(CheckpointError, match="escapes the checkpoint directory"):
            store.commit(5, {bad: {"bytes": 1, "sha256": "0"}})
    (tmp_path / "secret").write_bytes(b"s")
    os.symlink(tmp_path / "secret", path / "link.bin")
    manifest = {"format": 1, "step": 5, "files": {"link.bin": {"bytes": 1, "sha256": "0" * 64}}, "meta": {}}
    raw = json.dumps(manifest).encode()
    (path / MANIFEST).write_bytes(raw)
    (path / MARKER).write_text(hashlib.sha256(raw).hexdigest())
    with pytest.raises(CheckpointError, match="link.bin: is a symlink"):
        store.verify(5)
    (tmp_path / "ckpt" / "latest").write_text("../../etc")
    assert store.latest_step() == 5  # `latest` is never followed
    os.symlink(tmp_path, tmp_path / "ckpt" / "step_00000009")
    assert 9 not in store.complete_steps()


class Payload:
    """A pickle that would create a file when loaded."""

    def __init__(self, sentinel):
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.system, (f"touch {self.sentinel}",))


def test_a_planted_pickle_is_refused_before_anything_parses_it(tmp_path):
    """The store's part of R15: a file swapped for a malicious pickle fails its hash before a loader reads it."""
    store = CheckpointStore(tmp_path / "ckpt", keep_last=2)
    path = save(store, 7)
    sentinel = tmp_path / "payload-ran"
    (path / "shards/rank0.bin").write_bytes(pickle.dumps(Payload(sentinel)))
    with pytest.raises(CheckpointError, match="rank0.bin"):
        store.verify(7)
    assert not sentinel.exists()


KILL_SCRIPT = """
import sys
from pathlib import Path
from tests.unit.test_checkpoint_store import save
from engine.checkpoint.store import CheckpointStore
store = CheckpointStore(Path(sys.argv[1]), keep_last=2)
save(store, int(sys.argv[2]))
"""


def save_in_process(root: Path, step: int, kill_at: str = "") -> int:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HERD_CHECKPOINT_KILL_AT": kill_at}
    return subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(root), str(step)], env=env,
                          cwd=ROOT).returncode


@pytest.mark.parametrize("kill_at,resumes_from", [("after_manifest", 20), ("after_marker", 30),
                                                  ("after_latest", 30), ("mid_purge", 30)])
def test_sigkill_during_a_save_never_leaves_a_partial_checkpoint_loadable(tmp_path, kill_at, resumes_from):
    """R3 and R18: a process SIGKILLed at each point of the commit (manifest written, marker written, `latest`
    moved, in the middle of the purge): resume picks a complete checkpoint that verifies, and one always exists."""
    for step in (10, 20):
        assert save_in_process(tmp_path, step) == 0
    code = save_in_process(tmp_path, 30, kill_at)
    assert code == -9, code
    store = CheckpointStore(tmp_path, keep_last=2)
    step = store.latest_step()
    print(f"killed {kill_at}: resumes from step {step}, complete {store.complete_steps()}")
    assert step == resumes_from
    store.verify(step)
    assert len(store.complete_steps()) >= 1
    assert save_in_process(tmp_path, 40) == 0  # the next save clears leftovers and commits
    assert store.latest_step() == 40 and store.complete_steps()[-1] == 40
    assert len(store.complete_steps()) == 2


def test_a_leftover_of_an_interrupted_save_is_replaced(tmp_path):
    store = CheckpointStore(tmp_path, keep_last=2)
    leftover = store.begin(50)
    (leftover / "junk").write_bytes(b"j")
    save(store, 50)
    assert not (tmp_path / "step_00000050" / "junk").exists()
    with pytest.raises(CheckpointError, match="committed checkpoint of step 50 exists"):
        store.begin(50)


def test_the_lock_is_released_when_the_last_save_fails():
    """A background save that failed raises at the end of the run; the directory's lock goes all the same."""
    from types import SimpleNamespace

    from engine.callbacks.checkpoint import CheckpointCallback

    class Failed:
        async_save, released = True, False

        def wait(self):
            raise CheckpointError("the background save failed")

        def release(self):
            self.released = True

    checkpointer = Failed()
    with pytest.raises(CheckpointError, match="background save failed"):
        CheckpointCallback(checkpointer, every=0).on_fit_end(SimpleNamespace(state=SimpleNamespace(step=3)))
    assert checkpointer.released


def test_a_manifest_nested_too_deep_is_one_line(tmp_path):
    """Python's JSON parser raises RecursionError (not a ValueError) on deep nesting: both readers turn it into
    what they do with any unreadable manifest."""
    store = CheckpointStore(tmp_path)
    path = save(store, 2)
    raw = b"[" * 100000
    (path / MANIFEST).write_bytes(raw)
    (path / MARKER).write_text(hashlib.sha256(raw).hexdigest())
    assert store.lineages() == {2: None}  # complete, of an unknown run
    with pytest.raises(CheckpointError, match=f"^{path / MANIFEST}: not valid JSON \\(maximum recursion"):
        store.verify(2)


def test_a_damaged_step_is_moved_aside_when_the_run_saves_that_step_again(tmp_path):
    """A marker whose manifest is missing or altered: the resume falls back past it (never loaded), and the save of
    that step used to stop the run with "a committed checkpoint of step 4 exists already" on every rerun (hunt H38)."""
    store = CheckpointStore(tmp_path)
    save(store, 2)
    damaged = save(store, 4)
    (damaged / MANIFEST).write_text("{}")  # the marker no longer matches
    assert store.latest_step() == 2
    fresh = store.begin(4)
    assert fresh == damaged and list(fresh.iterdir()) == []
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("step_00000004.damaged-")]
    assert len(aside) == 1 and (aside[0] / MARKER).exists() and (aside[0] / MANIFEST).read_text() == "{}"
    with pytest.raises(CheckpointError, match="a committed checkpoint of step 2 exists already"):
        store.begin(2)  # a complete one is never replaced


def test_a_symlink_at_the_temporary_name_is_not_written_through(tmp_path):
    """A planted `.latest.tmp -> user file` made a save overwrite the user's file (hunt H38)."""
    user = tmp_path / "user.txt"
    user.write_text("mine\n")
    root = tmp_path / "ck"
    store = CheckpointStore(root)
    save(store, 2)
    (root / ".latest.tmp").symlink_to(user)
    (root / ".COMMITTED.tmp").write_text("a killed write's leftover")
    save(store, 4)
    assert user.read_text() == "mine\n" and store.latest_step() == 4
    assert (root / "latest").read_text() == "step_00000004" and not (root / "latest").is_symlink()
