"""engine/checkpoint/staging.py, the staged install `herd average` and `herd convert herd-to-hf` share: the
destination is replaced whole or not at all, and a failure is one line naming it (R21)."""

import errno
from pathlib import Path

import pytest

from engine.checkpoint.staging import install_staged
from engine.checkpoint.store import CheckpointError
from tests.helpers import snapshot


def write_file(name: str, data: bytes):
    def write(staging: Path) -> None:
        assert staging.is_dir() and not any(staging.iterdir())  # a new, empty directory
        (staging / name).write_bytes(data)
    return write


def test_replaces_the_destination_whole_and_leaves_no_sibling(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_bytes(b"earlier output")
    install_staged(out, write_file("new.txt", b"new output"), "export")
    assert snapshot(tmp_path) == {"out": None, "out/new.txt": b"new output"}  # no staging, no replaced copy


def test_a_failed_rename_puts_the_destination_back(tmp_path, monkeypatch):
    """The staging directory cannot take the destination's place (after the destination was moved aside): the
    destination comes back as it was and the error names it in one line."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_bytes(b"earlier output")
    before = snapshot(tmp_path)
    real_rename = Path.rename

    def rename(self, target):
        if Path(target) == out and ".herd-average-" in self.name:
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return real_rename(self, target)
    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(CheckpointError) as info:
        install_staged(out, write_file("new.txt", b"new"), "average")
    assert str(info.value) == f"{out}: the average could not be written (Invalid cross-device link)"
    assert snapshot(tmp_path) == before


def test_other_failures_pass_through_and_leave_nothing(tmp_path):
    """An exception that is not a write failure (a bug, an interrupt) is raised as it is; the parents the
    install made are removed again."""
    out = tmp_path / "made" / "deeper" / "out"

    def broken(staging: Path) -> None:
        (staging / "part").write_bytes(b"half")
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        install_staged(out, broken, "export")
    assert list(tmp_path.iterdir()) == []


class WrappedFailure(Exception):
    """Like DCP's CheckpointException: the OSError of each failed rank in `failures`."""

    def __init__(self, failures):
        super().__init__("rank 0 failed\nlong traceback")
        self.failures = failures


@pytest.mark.parametrize("error,reason", [
    (WrappedFailure({0: (OSError(errno.ENOSPC, "No space left on device"), "traceback")}), "No space left on device"),
    (WrappedFailure({}), "rank 0 failed"),  # no OSError inside: the message's first line
    (WrappedFailure({0: OSError("")}), "WrappedFailure"),  # nothing to say: the type
    (OSError(errno.EACCES, "Permission denied"), "Permission denied"),
])
def test_the_reason_is_the_os_error_even_when_wrapped(tmp_path, error, reason):
    def fail(staging: Path) -> None:
        raise error
    with pytest.raises(CheckpointError) as info:
        install_staged(tmp_path / "out", fail, "average", (OSError, WrappedFailure))
    assert str(info.value) == f"{tmp_path / 'out'}: the average could not be written ({reason})"
    assert list(tmp_path.iterdir()) == []
