"""Paths the commands read or write, checked before anything is read or written: a name the file system cannot
hold (OSError ENAMETOOLONG from the first stat, as a traceback) or a file that is not a regular file (a FIFO blocks
a read forever) is refused in one line naming the flag. Used by herd plan and herd launch (launch/)."""

import os
from pathlib import Path

from engine.errors import HerdError
from engine.files import file_problem

NAME_MAX, PATH_MAX = 255, 4095  # bytes of one file name, and of a whole path (Linux: limits.h)


def check_name_lengths(out: Path, flag: str) -> None:
    """Every name in `out` fits the file system's limits (else an OSError ENAMETOOLONG, as a traceback, from the
    first stat of the path). The temporary written beside it fits whenever `out` does (engine.files)."""
    short = (lambda name: name if len(name) <= 40 else f"{name[:20]}...{name[-12:]}")
    total = len(os.fsencode(str(out)))
    if total > PATH_MAX:
        raise HerdError(f"{flag}: the path is {total} bytes, longer than the {PATH_MAX} a path may have")
    for name in out.parts:
        size = len(os.fsencode(name))
        if size > NAME_MAX:
            raise HerdError(f"{flag}: the name {short(name)} is {size} bytes, longer than the {NAME_MAX} a file or "
                            f"directory name may have")


def check_input_file(path: str, flag: str) -> None:
    """A YAML file herd is about to read: a name too long for the file system, or something that is not a regular
    file (a FIFO blocks the read forever, a device never ends it), is refused naming `flag`; a missing file is
    left to the loader's own message."""
    check_name_lengths(Path(path), flag)
    try:
        problem = file_problem(path)
    except ValueError:  # a NUL in the name: the loader says so
        return
    if problem and not problem.startswith(("does not exist", "cannot be read", "is a directory")):
        raise HerdError(f"{flag} {path}: {problem}; name a YAML file")  # (the loader names the rest)
