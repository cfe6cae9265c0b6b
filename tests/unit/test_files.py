"""engine/files.py: the one atomic writer every herd output goes through, and the one description of what kind of
file a path is (it replaced three writers and two descriptions that had drifted apart)."""

import os
import stat

import pytest

from engine.files import atomic_output, file_problem, write_atomic


def test_a_write_replaces_the_file_whole_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "state.json"
    path.write_text("old\n")
    write_atomic(path, "new\n")
    assert path.read_text() == "new\n" and os.listdir(tmp_path) == ["state.json"]


def test_an_error_part_way_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("old\n")
    with pytest.raises(KeyboardInterrupt):
        with atomic_output(path, binary=False) as stream:
            stream.write("half of the new ")
            raise KeyboardInterrupt
    assert path.read_text() == "old\n" and os.listdir(tmp_path) == ["rows.jsonl"]


def test_a_symlink_at_the_final_name_is_replaced_never_written_through(tmp_path):
    user = tmp_path / "user.txt"
    user.write_text("mine\n")
    (tmp_path / "out").symlink_to(user)
    write_atomic(tmp_path / "out", b"herd's\n")
    assert user.read_text() == "mine\n"
    assert not (tmp_path / "out").is_symlink() and (tmp_path / "out").read_text() == "herd's\n"


def test_the_file_mode_is_what_the_umask_allows_or_what_is_asked(tmp_path):
    old = os.umask(0o027)
    try:
        write_atomic(tmp_path / "a", b"x")
        write_atomic(tmp_path / "b", b"x", mode=0o755)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a").stat().st_mode) == 0o640  # mkstemp alone gives 0600
    assert stat.S_IMODE((tmp_path / "b").stat().st_mode) == 0o755


def test_a_directory_that_cannot_hold_the_file_names_the_file(tmp_path):
    with pytest.raises(OSError) as raised:
        write_atomic(tmp_path / "missing" / "f", b"x")
    assert raised.value.filename == str(tmp_path / "missing" / "f")


def test_file_problem_names_each_kind(tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "link").symlink_to(tmp_path / "file")
    (tmp_path / "dir").mkdir()
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")
    (tmp_path / "zero").symlink_to("/dev/zero")
    assert file_problem(tmp_path / "file") is None and file_problem(tmp_path / "link") is None
    assert file_problem(tmp_path / "dir") == "is a directory, not a regular file"
    assert file_problem(tmp_path / "fifo") == "is a FIFO, not a regular file"
    assert file_problem(tmp_path / "nothing") == "does not exist"
    assert file_problem(tmp_path / "dangling") == f"is a symlink to {tmp_path / 'gone'}, which does not exist"
    assert file_problem(tmp_path / "zero") == "is a symlink to /dev/zero, a character device, not a regular file"
    assert file_problem(tmp_path / ("a" * 300)) == "cannot be read (File name too long)"
    assert file_problem(tmp_path / "file" / "below") == "cannot be read (Not a directory)"
