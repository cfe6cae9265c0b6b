"""A checkpoint directory belongs to one run, one process tree at a time (docs/checkpointing.md, "Ownership").

Lineage: every manifest records the run that wrote it, its `log.name` (the store's `lineage`). A requeued or
restarted run runs the same config, so it finds its own checkpoints again wherever its run directory is (a
resume under another layout or from another run directory keeps working); a checkpoint directory holding
complete checkpoints of another name is foreign. A run refuses a foreign directory, with one line naming the
other run, unless `checkpoint.on_foreign=new_lineage`: its checkpoints then go to `<dir>/lineages/<name>/`,
beside the other run's (and stay there once the other run's are gone), and nothing of the other run is ever
resumed or deleted (the store's purge deletes only its own lineage). A run that would start over (`checkpoint.resume=never`) among its own earlier checkpoints in
an explicit `checkpoint.dir` is refused too: its purge would delete its fresh saves (older steps) first.

Lock: a run that saves holds an exclusive `flock` on `<dir>/.herd-lock` (rank 0, for the run's lifetime), so a
second run on the directory is refused with one line naming the holder's pid and host (a run that does not save
tests the lock without writing anything, before it resumes from the directory or moves its run directory aside);
the kernel drops the lock when the holding process dies, so a SIGKILLed run never leaves it stuck. Writability: the directory is created
and a probe file written and removed on every rank before the first step, so an unwritable directory is one line
at start-up instead of a failure at the first save.
"""

import contextlib
import errno
import fcntl
import os
import re
import socket
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

from engine.checkpoint.store import LATEST, CheckpointError, CheckpointStore, step_name

LOCK = ".herd-lock"
_HOLDER = re.compile(r"held by pid (\d+) on (\S+)")  # what a holder writes into its lock file (acquire)
LINEAGES = "lineages"
ON_FOREIGN = ("refuse", "new_lineage")


def probe_writable(root: Path, tag: str = "") -> None:
    """Create `root` if needed, then write, fsync and remove a probe file in it; one line naming it if not."""
    probe = root / f".herd-probe-{tag}{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, b"herd")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise CheckpointError(f"{root}: the checkpoint directory cannot be written ({e.strerror or e}); choose "
                              f"another checkpoint.dir or fix its permissions") from None


class DirectoryBusy(CheckpointError):
    """Another live process holds the directory's lock; `pid` and `host` as it recorded them (None if it did not)."""

    def __init__(self, message: str, recorded: str):
        super().__init__(message)
        self.recorded = recorded
        found = _HOLDER.fullmatch(recorded)
        self.pid, self.host = (int(found[1]), found[2]) if found else (None, None)

    def is_this_process(self) -> bool:
        return self.pid == os.getpid() and self.host == socket.gethostname()


def _open_lock_file(path: Path, flags: int) -> int:
    """Open the lock file without following a symlink or blocking on a FIFO (a plain open for reading waits for a
    writer forever); anything but a regular file there is one line naming it, left as it is."""
    fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, 0o644)
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = "a FIFO" if stat.S_ISFIFO(mode) else "a directory" if stat.S_ISDIR(mode) else "not a regular file"
        raise CheckpointError(f"{path}: is {kind}, not the lock file herd keeps there; move it away")
    os.set_blocking(fd, True)
    return fd


class DirectoryLock:
    """An exclusive advisory lock on `<root>/.herd-lock`, held while the file stays open."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self._file, self._path = None, self.root / LOCK
        self.unsupported = False  # the filesystem cannot lock (flock fails): warned once, not tried again

    @property
    def held(self) -> bool:
        return self._file is not None

    def acquire(self) -> Optional[str]:
        """Take the lock, or raise one line naming its holder. Returns a warning when the filesystem cannot lock
        (then concurrent runs go undetected, as before locks existed; `unsupported` is set and no file is left)."""
        path = self.root / LOCK
        for _ in range(8):  # a holder that released may unlink the file under us: lock the file at the path
            existed = os.path.lexists(path)
            try:
                fd = _open_lock_file(path, os.O_RDWR | os.O_CREAT)
            except OSError as e:
                if e.errno == errno.ELOOP:
                    raise CheckpointError(f"{path}: is a symlink; refusing to lock through it") from None
                raise CheckpointError(f"{self.root}: the checkpoint directory cannot be written "
                                      f"({e.strerror})") from None
            handle = os.fdopen(fd, "r+b")
            warning = self._try_lock(handle)
            if warning is not None:
                if not existed:  # ours, and useless: a clean end leaves nothing behind
                    with contextlib.suppress(OSError):
                        os.unlink(path)
                return warning
            try:
                same = os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            handle.close()
        else:
            raise CheckpointError(f"{path}: keeps being replaced; is another run starting on it?")
        handle.truncate(0)  # who holds it, for the refusal of a second run (read there, never trusted)
        handle.write(f"held by pid {os.getpid()} on {socket.gethostname()}".encode())
        handle.flush()
        self._file, self._path = handle, path
        return None

    def test(self) -> Optional[str]:
        """For a run that does not save: refuse, as acquire does, while another run holds the lock; otherwise
        take it for an instant and let it go. Creates, writes and removes nothing (a read-only directory is
        fine); a warning when the lock cannot be tested."""
        path = self.root / LOCK
        try:
            fd = _open_lock_file(path, os.O_RDONLY)
        except FileNotFoundError:
            return None  # a holder keeps its file: nobody holds the directory
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise CheckpointError(f"{path}: is a symlink; refusing to lock through it") from None
            self.unsupported = True
            return f"warning: cannot test the lock {path} ({e.strerror}): a run using it would not be detected"
        with os.fdopen(fd, "rb") as handle:
            return self._try_lock(handle)  # closing drops the lock taken

    def _try_lock(self, handle) -> Optional[str]:
        """flock `handle` exclusively without waiting: None when taken; one line naming the holder when another
        process holds it; a warning (handle closed, `unsupported` set) when the filesystem cannot lock."""
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            return None
        except OSError as e:
            recorded = handle.read(200).decode("utf-8", "replace").strip()
            handle.close()
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise DirectoryBusy(f"{self.root}: another run is using this checkpoint directory "
                                    f"({recorded or 'a process that recorded nothing'}); wait for it to end, or "
                                    f"choose another checkpoint.dir", recorded) from None
            self.unsupported = True
            return f"warning: cannot lock {self.root / LOCK} ({e.strerror}): a second run on it would not be detected"

    def release(self) -> None:
        """Remove the lock file (a clean end leaves nothing behind) while still holding it, then close: a run
        waiting on the old file sees it replaced and retries (acquire's loop)."""
        if self._file is not None:
            try:
                if os.stat(self._path, follow_symlinks=False).st_ino == os.fstat(self._file.fileno()).st_ino:
                    os.unlink(self._path)
            except OSError:
                pass  # moved aside with its run directory, or gone: nothing of ours to remove
            self._file.close()  # closing the last descriptor drops the flock
            self._file = None


@dataclass
class Claim:
    """What claiming a checkpoint directory decided (rank 0)."""

    root: Path  # where this run's checkpoints live: the directory, or lineages/<name> beside another run's
    lock: Optional[DirectoryLock] = None
    run_dir_prepared: bool = False  # the earlier run directory (holding the default root) was moved aside here
    notes: List[str] = field(default_factory=list)


def _foreign(store: CheckpointStore) -> Dict[int, Optional[str]]:
    return {step: lineage for step, lineage in store.lineages().items() if not store._mine(lineage)}


def _refuse_foreign(root: Path, foreign: Dict[int, Optional[str]], lineage: str) -> None:
    first, names = min(foreign), sorted({str(v) for v in foreign.values() if v is not None})
    who = f"run '{names[0]}'" if names else "an unknown run"
    if foreign[first] is None:
        who = f"an unknown run ({root / step_name(first)}/manifest.json cannot be read)"
    raise CheckpointError(f"{root}: holds {len(foreign)} checkpoint(s) of {who} (from step {first}), not of this "
                          f"run '{lineage}' (log.name); continue that run under its own log.name, choose another "
                          f"checkpoint.dir, or set checkpoint.on_foreign=new_lineage to save beside them in "
                          f"{root / LINEAGES / lineage}")


def _placement(store: CheckpointStore, foreign: Dict[int, Optional[str]],
               on_foreign: str) -> Tuple[CheckpointStore, bool, List[int]]:
    """Where this run's checkpoints go (its lineage beside another run's?) and the complete steps it has there."""
    beside = CheckpointStore(store.root / LINEAGES / store.lineage, store.keep_last, lineage=store.lineage)
    # beside the other run's checkpoints, or (new_lineage) where this run saved them before, once the other
    # run's are gone: the same command keeps resuming its own
    use_beside = bool(foreign) or (on_foreign == "new_lineage" and bool(beside.complete_steps())
                                   and not store.complete_steps())
    return beside, use_beside, beside.complete_steps() if use_beside else store.complete_steps()


def _refuse_symlink(root: Path) -> None:
    if root.is_symlink():
        raise CheckpointError(f"{root}: is a symlink; a checkpoint directory must be a plain directory")
    latest = root / LATEST
    if latest.is_dir() and not latest.is_symlink():  # a save could not replace it: refused before the first step
        raise CheckpointError(f"{latest}: is a directory; herd writes the newest checkpoint's name there, move it "
                              f"away")


def _refuse_fresh_start(root: Path, lineage: str, own: List[int]) -> None:
    raise CheckpointError(f"{root}: holds checkpoints of this run '{lineage}' (steps {own[0]}-{own[-1]}) and "
                          f"checkpoint.resume=never would train over them from step 0; resume them "
                          f"(checkpoint.resume=auto) or choose another checkpoint.dir")


def check_before_launch(store: CheckpointStore, on_foreign: str, resume: str, writes: bool, explicit: bool,
                        test_lock: bool = True) -> None:
    """A launcher, before it starts any rank: the refusals `claim_directory` would give on rank 0 that need
    nothing written (a symlinked root, a live run holding the directory, another run's checkpoints, a fresh
    start over this run's own in an explicit `checkpoint.dir`), so that a refused run is one line from the
    launcher instead of N ranks starting, meeting and stopping. Reads only (the lock is taken for an instant,
    as a run that does not save tests it); rank 0's claim still decides, since the directory can change in
    between. `test_lock=False` for a job that starts later (a SLURM submission)."""
    root = store.root
    _refuse_symlink(root)
    if not root.is_dir():
        return
    if test_lock:
        DirectoryLock(root).test()  # a warning (no locks here) is the run's to give
    foreign = _foreign(store)
    if foreign and on_foreign != "new_lineage":
        _refuse_foreign(root, foreign, store.lineage)
    beside, use_beside, own = _placement(store, foreign, on_foreign)
    if explicit and writes and resume == "never" and own:  # a default root is moved aside with its run directory
        _refuse_fresh_start(beside.root if use_beside else root, store.lineage, own)


def claim_directory(store: CheckpointStore, on_foreign: str, resume: str, writes: bool,
                    run_dir: Optional[Path] = None, move_aside: Optional[Callable[[Path], None]] = None) -> Claim:
    """Rank 0, before anything reads or moves the directory: lock it (a run that saves) or test its lock (one
    that does not), refuse foreign checkpoints or place this run's beside them, move an earlier run directory
    aside when the checkpoint root lies in it (`run_dir`, the default root) and the run does not resume, and
    refuse a fresh start among the run's own checkpoints. Changes `store.root` to the claimed root; raises
    CheckpointError (one line)."""
    root = store.root
    _refuse_symlink(root)
    claim = Claim(root)
    lock = DirectoryLock(root)
    try:
        if root.is_dir():  # before reading: a live run's directory is not ours to judge, resume or move
            if writes:
                probe_writable(root)
            claim.notes += [w for w in [lock.acquire() if writes else lock.test()] if w]
        foreign = _foreign(store)
        if foreign and on_foreign != "new_lineage":
            _refuse_foreign(root, foreign, store.lineage)
        beside, use_beside, own = _placement(store, foreign, on_foreign)
        if writes and run_dir is not None:  # the run directory is prepared here, before the root is made in it
            claim.run_dir_prepared = True
            if not (resume == "auto" and own) and run_dir.exists() and any(run_dir.iterdir()) and move_aside:
                move_aside(run_dir)  # the lock file goes with it: the fresh root is locked below
                lock.release()
                use_beside, own = False, []
        if use_beside:
            store.root = claim.root = beside.root
        if writes and resume == "never" and own:
            _refuse_fresh_start(store.root, store.lineage, own)
        if writes:
            probe_writable(root)
            probe_writable(store.root)
            if not lock.held and not lock.unsupported:  # once only where the filesystem cannot lock
                claim.notes += [w for w in [lock.acquire()] if w]
            claim.lock = lock
    except BaseException:
        lock.release()
        raise
    return claim
