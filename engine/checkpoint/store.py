"""The checkpoint directory and its commit protocol: a checkpoint is complete or it does not exist.

    <root>/step_00000200/...           files written by the savers (DCP shards, loader/RNG state, config)
    <root>/step_00000200/manifest.json {"format", "step", "files": {relative path: {"sha256", "bytes"}}}
    <root>/step_00000200/COMMITTED     the sha256 of manifest.json, written last
    <root>/latest                      "step_00000200", moved only after COMMITTED exists

Saving: the savers write and fsync their files; the manifest (hashes computed by the rank that wrote each file)
is written to a temporary file, fsynced and renamed; the marker likewise; the directory is fsynced; then `latest`
is replaced the same way; only then are old checkpoints purged beyond the last `keep_last` (>= 2), each by first
removing its marker, so a kill at any instant leaves every checkpoint either complete or visibly incomplete, and
the newest complete one untouched (Llama 3 kept >90% effective training time through 466 interruptions;
shared/TESTING.md R3, R18).

Loading trusts nothing it has not checked: `latest` must name a step directory, the marker must hold the
manifest's hash, every manifest path must stay inside the step directory (no absolute paths, `..` or symlinks:
R16), and every file's size (and sha256, for all files or a sample by config) must match before any file is
parsed (R5, R15). A failure names the file. Resume takes the newest complete checkpoint (its marker is the
commit point); `latest` is written for people and tools, and never followed blindly.
"""

import hashlib
import json
import os
import random
import re
import shutil
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from engine.errors import HerdError
from engine.files import fsync_dir, write_atomic
from engine.secrets import scrub, scrub_tree

FORMAT = 1
MANIFEST, MARKER, LATEST = "manifest.json", "COMMITTED", "latest"
_STEP_DIR = re.compile(r"step_(\d{8})")
_KILL_POINT = "HERD_CHECKPOINT_KILL_AT"  # fault injection for the kill tests: SIGKILL self at a named point


class CheckpointError(HerdError):
    """A checkpoint is incomplete, corrupt or unsafe; the message names the file."""


def step_name(step: int) -> str:
    return f"step_{step:08d}"


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


_warned = set()


def _warn(message: str) -> None:
    """One stderr line, once per message in this process (a purge failing at every save says it once)."""
    if message not in _warned:
        _warned.add(message)
        print(f"herd: warning: {scrub(message)}", file=sys.stderr, flush=True)


def _maybe_die(point: str, step: Optional[int] = None) -> None:
    """Fault injection: HERD_CHECKPOINT_KILL_AT=<point> or <point>@<step> SIGKILLs this process there."""
    if os.environ.get(_KILL_POINT) in (point, f"{point}@{step}"):
        os.kill(os.getpid(), 9)


def describe_files(step_dir: Path, paths: List[Path]) -> Dict[str, dict]:
    """fsync each written file and record its size and sha256 (each rank describes the files it wrote)."""
    out = {}
    for path in paths:
        with open(path, "rb+") as f:
            os.fsync(f.fileno())
        out[str(path.relative_to(step_dir))] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
    return out


class CheckpointStore:
    """One run's checkpoint root. Savers write into `begin(step)`; one process then calls `commit`."""

    def __init__(self, root: Path, keep_last: int = 2, verify_sample: int = 0, seed: int = 0,
                 lineage: Optional[str] = None):
        if keep_last < 2:
            raise CheckpointError(f"checkpoint.keep_last must be at least 2, got {keep_last}")
        self.root, self.keep_last = Path(root), keep_last
        self.verify_sample, self.seed = verify_sample, seed  # 0: hash every file on load
        # the run whose checkpoints this store writes, resumes and purges (recorded in each manifest); other
        # lineages' checkpoints in the same directory are never resumed or deleted. None: a reader of any lineage
        # (load_weights, export) and a writer that records none (an import). Kept with secret values scrubbed, as
        # everything herd writes (R17): a run name may hold one, and the same name always scrubs the same way
        self.lineage = scrub(lineage) if lineage is not None else None

    def step_dir(self, step: int) -> Path:
        return self.root / step_name(step)

    def begin(self, step: int) -> Path:
        """An empty directory for step `step` (a leftover of an interrupted save of the same step is removed; a
        damaged one, whose marker does not match its manifest, is moved aside: the resume fell back past it, and
        refusing to save there would stop the run at that step on every rerun)."""
        path = self.step_dir(step)
        if path.is_symlink():
            raise CheckpointError(f"{path}: is a symlink; refusing to write through it")
        if path.exists():
            if (path / MARKER).exists() and step in self.lineages():
                raise CheckpointError(f"{path}: a committed checkpoint of step {step} exists already")
            if (path / MARKER).exists():  # kept for inspection under a name no reader takes for a step
                aside = path.with_name(f"{path.name}.damaged-{os.getpid()}-{random.randrange(1 << 30):x}")
                path.rename(aside)
            else:
                shutil.rmtree(path)
        path.mkdir(parents=True)
        fsync_dir(self.root)
        return path

    def commit(self, step: int, files: Dict[str, dict], meta: Optional[dict] = None) -> None:
        """Write the manifest, then the marker, then move `latest`, then purge (see the module docstring)."""
        path = self.step_dir(step)
        for name in files:
            self._inside(path, name)
        fields = {"format": FORMAT, "step": step, "files": files, "meta": scrub_tree(meta or {})}
        if self.lineage is not None:
            fields["lineage"] = self.lineage
        manifest = json.dumps(fields, indent=1, sort_keys=True).encode()
        write_atomic(path / MANIFEST, manifest)
        _maybe_die("after_manifest", step)
        write_atomic(path / MARKER, hashlib.sha256(manifest).hexdigest().encode())
        _maybe_die("after_marker", step)
        try:  # for people and tools only (loads go by the markers): a failure here loses nothing
            write_atomic(self.root / LATEST, step_name(step).encode())
        except OSError as e:
            _warn(f"{self.root / LATEST}: not updated to {step_name(step)} ({e.strerror or e}); resume is unaffected "
                  f"(it goes by the COMMITTED markers)")
        _maybe_die("after_latest", step)
        self.purge()

    def purge(self) -> None:
        """Remove complete checkpoints beyond the newest `keep_last`, and incomplete ones older than the newest
        complete one. A checkpoint's marker goes first, so a kill mid-purge leaves it incomplete, never loadable
        half-deleted; the newest `keep_last` complete ones are never touched."""
        lineages = self.lineages()
        complete = [step for step, lineage in lineages.items() if self._mine(lineage)]
        keep = set(complete[-self.keep_last:])
        newest = complete[-1] if complete else None
        for step in self._step_dirs():
            if step in keep or newest is None or step > newest:
                continue  # a newer incomplete directory may be a save in progress
            if step in lineages and not self._mine(lineages[step]):
                continue  # another run's complete checkpoint: never ours to delete
            path = self.step_dir(step)
            try:
                if (path / MARKER).exists():
                    (path / MARKER).unlink()
                    fsync_dir(path)
                _maybe_die("mid_purge")
                shutil.rmtree(path)
            except OSError as e:  # the new checkpoint is safe: an old one left behind costs disk, not the run
                _warn(f"{path}: an old checkpoint could not be removed ({e.strerror or e}: {e.filename}); training "
                      f"goes on, remove it by hand")

    def _step_dirs(self) -> List[int]:
        if not self.root.is_dir():
            return []
        return sorted(int(m.group(1)) for p in self.root.iterdir()
                      if (m := _STEP_DIR.fullmatch(p.name)) and p.is_dir() and not p.is_symlink())

    def lineages(self) -> Dict[int, Optional[str]]:
        """Every complete step (its marker holds the hash of its manifest; files are checked by `verify`), with
        the lineage its manifest records: "" for a manifest without one (written before lineages were recorded,
        or by an import), None for one that cannot be read as a JSON object with a string lineage."""
        found: Dict[int, Optional[str]] = {}
        for step in self._step_dirs():
            path = self.step_dir(step)
            try:
                manifest = (path / MANIFEST).read_bytes()
                marker = (path / MARKER).read_bytes().decode("ascii", "replace").strip()
            except OSError:
                continue
            if hashlib.sha256(manifest).hexdigest() != marker:
                continue
            try:
                lineage = json.loads(manifest).get("lineage", "")
            except (ValueError, AttributeError, RecursionError):  # RecursionError: nested too deep to parse
                lineage = None
            found[step] = lineage if isinstance(lineage, str) else None
        return found

    def _mine(self, lineage: Optional[str]) -> bool:
        """A reader (lineage None) takes every checkpoint; a run takes its own and those recording no lineage
        (older herd wrote none). One whose manifest cannot be read is nobody's: verify names what is wrong."""
        return self.lineage is None or lineage == "" or lineage == self.lineage

    def complete_steps(self) -> List[int]:
        """This lineage's complete steps, oldest first."""
        return [step for step, lineage in self.lineages().items() if self._mine(lineage)]

    def why_none_complete(self) -> str:
        """For the one line a reader gives when this root holds no complete checkpoint of its lineage: what the
        newest step directory lacks (a manifest that cannot be read is not a missing checkpoint), or that there
        is none."""
        steps = self._step_dirs()
        if not steps and (self.root / MANIFEST).is_file():  # a step directory given for its root (H46)
            return f"it is a step directory itself: give its checkpoint root, {self.root.parent}"
        if not steps:
            return "no step_* directories"
        path = self.step_dir(steps[-1])
        try:
            manifest = (path / MANIFEST).read_bytes()
            marker = (path / MARKER).read_bytes().decode("ascii", "replace").strip()
        except OSError as e:
            return f"the newest, {path.name}: {Path(e.filename or path).name}: {e.strerror or e}"
        if hashlib.sha256(manifest).hexdigest() != marker:
            return f"the newest, {path.name}: its manifest does not match its commit marker"
        return f"the newest, {path.name}, belongs to another run (lineage)"

    def latest_step(self) -> Optional[int]:
        """The step to resume from: the newest complete checkpoint. Its marker is the commit point, so a save
        killed after the marker but before `latest` moved still counts; `latest` is a pointer for people and
        tools, and a `latest` naming anything else is never followed."""
        complete = self.complete_steps()
        return complete[-1] if complete else None

    def verify(self, step: int, only: Optional[Sequence[str]] = None) -> dict:
        """Check step `step` before anything reads it; returns the manifest. Raises CheckpointError naming the
        file that is missing, truncated, altered or escaping the checkpoint directory. `only`: hash just these
        files (a look at the DCP metadata, not a load)."""
        path = self.step_dir(step)
        if path.is_symlink() or not path.is_dir():
            raise CheckpointError(f"{path}: not a checkpoint directory")
        try:
            raw = (path / MANIFEST).read_bytes()
            marker = (path / MARKER).read_bytes().decode("ascii", "replace").strip()
        except OSError as e:
            raise CheckpointError(f"{path}: incomplete checkpoint ({e.strerror}: {Path(e.filename).name})") from None
        if hashlib.sha256(raw).hexdigest() != marker:
            raise CheckpointError(f"{path / MANIFEST}: does not match its commit marker (altered or incomplete)")
        try:
            manifest = json.loads(raw.decode("utf-8"))
        except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError; RecursionError: too deep
            raise CheckpointError(f"{path / MANIFEST}: not valid JSON ({str(e).splitlines()[0]})") from None
        from engine.checkpoint.manifest import check_manifest  # (it imports this module)
        check_manifest(manifest, path / MANIFEST, step)
        if self.lineage is not None and not self._mine(manifest.get("lineage", "")):
            raise CheckpointError(f"{path / MANIFEST}: written by run '{manifest['lineage']}', not by this run "
                                  f"'{self.lineage}'")
        files = manifest["files"]
        for name, info in files.items():
            file = self._inside(path, name)
            if not file.is_file():
                raise CheckpointError(f"{file}: missing from checkpoint step {step}")
            if file.stat().st_size != info["bytes"]:
                raise CheckpointError(f"{file}: {file.stat().st_size} bytes, the manifest says {info['bytes']} "
                                      f"(truncated or altered)")
        for name in self._to_hash(files) if only is None else sorted(set(only) & set(files)):
            file = path / name
            if sha256_file(file) != files[name]["sha256"]:
                raise CheckpointError(f"{file}: sha256 differs from the manifest (corrupt or altered)")
        return manifest

    def _to_hash(self, files: Dict[str, dict]) -> List[str]:
        names = sorted(files)
        if self.verify_sample <= 0 or self.verify_sample >= len(names):
            return names
        # small files (metadata, states) always; a seeded sample of the rest
        small = [n for n in names if files[n]["bytes"] < (1 << 20)]
        large = [n for n in names if n not in small]
        return small + random.Random(self.seed).sample(large, min(self.verify_sample, len(large)))

    @staticmethod
    def _inside(step_dir: Path, name: str) -> Path:
        """The file `name` of a checkpoint, refusing absolute paths, `..` and symlinks anywhere on the way."""
        relative = Path(name)
        if relative.is_absolute() or ".." in relative.parts or not relative.parts:
            raise CheckpointError(f"{step_dir}: manifest path '{name}' escapes the checkpoint directory")
        current = step_dir
        for part in relative.parts:
            current = current / part
            if current.is_symlink():
                raise CheckpointError(f"{current}: is a symlink; checkpoint files must be plain files")
        return current
