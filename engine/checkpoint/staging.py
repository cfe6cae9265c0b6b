"""Putting a finished output directory in place of a user's destination, never half-written (R21).

`herd average` and `herd convert herd-to-hf` both write their output into a staging directory beside the
destination and rename it into the destination's place only once complete. Until that rename the destination is
untouched; an existing destination is first renamed aside and deleted only after the new one is in place, and put
back if the swap fails. A failure leaves the destination as it was, no staging directory, and none of the parent
directories this made.
"""

import contextlib
import shutil
import uuid
from pathlib import Path
from typing import Callable, Optional, Tuple, Type

from engine.checkpoint.store import CheckpointError


def install_staged(out_dir: Path, write: Callable[[Path], None], what: str,
                   write_errors: Tuple[Type[BaseException], ...] = (OSError,)) -> None:
    """Run write(staging) on a new empty staging directory beside out_dir, then put it in out_dir's place. A
    failure of type `write_errors` (no space, no permission...) becomes one line, "OUT_DIR: the WHAT could not be
    written (REASON)"; any other exception passes through. Either way out_dir is left as it was."""
    created = [d for d in out_dir.parents if not d.exists()]  # innermost first: removed again on failure
    token = uuid.uuid4().hex[:12]
    staging = out_dir.parent / f".{out_dir.name}.herd-{what}-{token}"
    old = out_dir.parent / f".{out_dir.name}.herd-replaced-{token}"
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        staging.mkdir()
        write(staging)
        if out_dir.exists():
            out_dir.rename(old)
        staging.rename(out_dir)
    except BaseException as e:
        shutil.rmtree(staging, ignore_errors=True)
        if old.exists() and not out_dir.exists():
            old.rename(out_dir)  # put back what was there
        for directory in created:
            with contextlib.suppress(OSError):
                directory.rmdir()
        if isinstance(e, write_errors):
            raise CheckpointError(f"{out_dir}: the {what} could not be written ({_reason(e)})") from None
        raise
    shutil.rmtree(old, ignore_errors=True)


def _reason(error: BaseException) -> str:
    """The first line of what went wrong: an OSError's strerror (also one that DCP wrapped), else the message,
    else the exception's type name."""
    cause = _os_error(error)
    reason = (cause.strerror or str(cause)) if cause is not None else str(error)
    return reason.strip().splitlines()[0] if reason.strip() else type(error).__name__


def _os_error(error: BaseException) -> Optional[OSError]:
    """The OSError itself, or the one DCP wrapped in its CheckpointException (failures by rank)."""
    if isinstance(error, OSError):
        return error
    for failure in getattr(error, "failures", {}).values():
        exception = failure[0] if isinstance(failure, tuple) and failure else failure
        if isinstance(exception, OSError):
            return exception
    return None
