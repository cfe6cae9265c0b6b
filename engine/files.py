"""Files herd writes and reads beside a user's own: one place that says what kind of file a path is, and one way to
replace a file atomically.

Every file herd writes (checkpoint manifests and markers, token files, run configs, recipe and pipeline state, row
files, plans, scripts) goes through `atomic_output`: a temporary created exclusively under a fresh name beside the
final one (O_EXCL, so never an existing file and never through a symlink a user or an earlier crash left there),
written, fsynced, renamed over the final name, and the directory fsynced. A reader, on this host or another, sees
the old file or the whole new one; an error or Ctrl-C part-way leaves neither a half file nor the temporary
(shared/TESTING.md R3, R21). Stdlib only: `herd plan` imports this without torch.
"""

import contextlib
import itertools
import os
import stat
import tempfile
import time
from pathlib import Path
from typing import IO, Iterator, Optional, Tuple, Union

from engine.errors import HerdError

_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def file_problem(path: Union[str, Path]) -> Optional[str]:
    """Why `path` cannot be read as a file, or None for a regular file (or a symlink to one). A FIFO would block
    the reader and a device (/dev/zero) never ends, so each is named for what it is, not called missing. The
    phrase follows the path: f"{path} {problem}"."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return f"is a symlink to {os.readlink(path)}, which does not exist" if os.path.islink(path) else \
            "does not exist"
    except OSError as e:  # too long a name, a file where a directory should be, no permission
        return f"cannot be read ({e.strerror or e})"
    if stat.S_ISREG(mode):
        return None
    what = next((name for test, name in _KINDS if test(mode)), "not a regular file")
    link = f"a symlink to {os.readlink(path)}, " if os.path.islink(path) else ""
    return f"is {link}{what}, not a regular file"


def _umask() -> int:
    """The process's umask, read without setting it where Linux says it (os.umask sets it process-wide, and a
    checkpoint's background writer thread may be creating files at that instant)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def aside_name(path: Path) -> Path:
    """A free name beside `path` to move it to: NAME.<date-time>, or NAME.<date-time>-N when that is taken (two
    moves in one second, or a name someone planted)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in itertools.count(1):
        candidate = path.with_name(f"{path.name}.{stamp}" + (f"-{n}" if n > 1 else ""))
        if not os.path.lexists(candidate):
            return candidate
    raise AssertionError("unreachable")


class AppendRefused(HerdError):
    """`open_append` cannot append there: the message names the path and what it was to hold."""


def open_append(path: Union[str, Path], what: str) -> IO:
    """`path` opened for appending text (created if missing), never through a symlink (a planted one appended a
    run's records to a user's file) and never a FIFO (the open blocked a resume forever) or a directory; anything
    else there is AppendRefused, one line naming `path` and `what` it was to hold."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                     0o666)
    except OSError as e:
        raise AppendRefused(f"{path}: cannot append {what} ({e.strerror}; a symlink, FIFO or directory there is "
                            f"refused): move it away") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise AppendRefused(f"{path}: not a regular file (a FIFO or device), where herd appends {what}: move it away")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "a", encoding="utf-8")


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _name_head(name: str, max_bytes: int) -> str:
    """The longest start of `name` whose file-system encoding fits `max_bytes` (names are limited in bytes: 255 on
    Linux, and a non-ASCII character takes 2-4 of them)."""
    encoded = os.fsencode(name)[:max_bytes]
    for cut in range(4):  # a cut inside a UTF-8 character leaves at most 3 of its bytes
        try:
            return encoded[:len(encoded) - cut].decode("utf-8")
        except UnicodeDecodeError:
            continue
    return os.fsdecode(encoded)  # a name that was not UTF-8 to begin with keeps its bytes


def exclusive_temporary(final: Path, binary: bool = True, suffix: str = ".tmp") -> Tuple[IO, Path]:
    """A new file beside `final` under a name no one else holds, opened for writing; (open file, its path). Its
    mode is what the umask allows a new file (mkstemp's 0600 would keep the data from a cluster's other users).
    The name is `.FINAL.<random>SUFFIX`, FINAL cut to 200 bytes so the whole stays within a name's 255."""
    final = Path(final)
    try:
        fd, name = tempfile.mkstemp(dir=final.parent, prefix=f".{_name_head(final.name, 200)}.", suffix=suffix)
    except OSError as e:  # said of the file being written, not of a random temporary name
        raise OSError(e.errno, e.strerror, str(final)) from None
    os.fchmod(fd, 0o666 & ~_umask())
    return (os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", encoding="utf-8")), Path(name)


@contextlib.contextmanager
def atomic_output(path: Union[str, Path], binary: bool = True, sync: bool = True,
                  mode: Optional[int] = None) -> Iterator[IO]:
    """`with atomic_output(path) as f: f.write(...)`: `path` is replaced by what was written when the block ends
    without an error, and left as it was otherwise. `sync=False` skips the fsyncs (files rewritten every step,
    such as heartbeats, where a lost last write is harmless). `mode` sets the final permission bits."""
    path = Path(path)
    stream, temporary = exclusive_temporary(path, binary)
    try:
        with stream:
            yield stream
            stream.flush()
            if sync:
                os.fsync(stream.fileno())
            if mode is not None:
                os.fchmod(stream.fileno(), mode)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    if sync:
        fsync_dir(path.parent)


def write_atomic(path: Union[str, Path], data: Union[bytes, str], sync: bool = True,
                 mode: Optional[int] = None) -> None:
    """Replace `path` with `data` (bytes, or text written as UTF-8) atomically; see `atomic_output`."""
    with atomic_output(path, binary=True, sync=sync, mode=mode) as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
