"""Running the passes of curate/pipeline.py on datatrove's LocalPipelineExecutor or SlurmPipelineExecutor."""

import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import List

from datatrove.executor import LocalPipelineExecutor, SlurmPipelineExecutor

from curate.pipeline import FAULT_ENV, HOLD, FaultPoint, Layout, build_stages, fault_is_hold
from curate.read import list_corpus
from curate.schema import CurateConfig
from engine.errors import HerdError
from engine.files import write_atomic

FILES_LIST = "inputs.json"  # the corpus's file list, fixed at the first run so a resumed run shards alike
PIPELINE_RECORD = "pipeline.json"  # the settings the outputs were made with
RUNTIME_KEYS = ("kind", "workers", "partition", "time", "cpus_per_task", "mem_per_cpu_gb", "venv_path")
FILES_KEY = "files"  # in pipeline.json: the sha256 of each file a setting names (absent in records before it)
NAMED_FILES = (("heuristics", "dirty_words_file"), ("models", "quality_model"), ("models", "language_model"),
               ("models", "domain_model"), ("tokenize", "tokenizer_path"))
LOCK = ".herd-lock"  # flock'ed by the run writing into output_dir (kept open for the run's lifetime)
_held_locks = {}  # output_dir -> the lock file's descriptor, open in this process


def _settings(cfg: CurateConfig) -> dict:
    """What the outputs depend on: everything but how the tasks are scheduled (executor.tasks stays: the
    shards), plus the content of each file a setting names (a retrained model or edited word list behind the
    same path changes the outputs as much as another path)."""
    settings = dataclasses.asdict(cfg)
    for key in RUNTIME_KEYS:
        settings["executor"].pop(key)
    settings.pop("examples")
    settings[FILES_KEY] = {f"{section}.{key}": _sha256(settings[section][key])
                           for section, key in NAMED_FILES if settings[section][key]}
    return settings


def _sha256(path: str) -> str:
    """The file's sha256 (a 126 MB lid.176.bin takes well under a second)."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except OSError as e:
        raise HerdError(f"{path}: cannot be read ({e.strerror or e})") from None
    return digest.hexdigest()


def _changed_file(old: dict, new: dict) -> str:
    """The first setting whose named file changed since the recorded run; "" when none (or the record is older
    than fingerprints: nothing to compare)."""
    recorded = old.get(FILES_KEY)
    if not isinstance(recorded, dict):
        return ""
    for key, digest in new[FILES_KEY].items():
        if recorded.get(key) not in (None, digest):
            return f"{key}: the file '{_lookup(new, key)}' changed since that run"
    return ""


def _lookup(settings: dict, dotted: str) -> str:
    section, key = dotted.split(".")
    return settings[section][key]


def _first_difference(old, new, prefix: str = "") -> str:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            found = _first_difference(old.get(key), new.get(key), f"{prefix}{key}.")
            if found:
                return found
        return ""
    return "" if old == new else f"{prefix[:-1]} was {old!r}, now {new!r}"


def claim_output(cfg: CurateConfig, hold: bool = False) -> None:
    """The output directory is new, empty, or an earlier run of the same pipeline (which this run resumes); a
    directory of other files, or a run with other settings or other files behind its settings' paths (its
    finished tasks would be kept as they are), is refused in one line and left untouched (R21). The run then
    holds the directory's lock while it claims it, and after it returns when `hold` (a run: a second run into
    the directory is refused until release_output)."""
    root = Layout(cfg.output_dir).root
    record = root / PIPELINE_RECORD
    if root.exists() and not root.is_dir():
        raise HerdError(f"output_dir {root} is a file")
    if not record.is_file() and root.is_dir() and any(p.name != LOCK for p in root.iterdir()):
        raise HerdError(f"output_dir {root} exists and is not a herd curate output; choose another or remove it")
    settings = _settings(cfg)
    root.mkdir(parents=True, exist_ok=True)
    created = not os.path.lexists(root / LOCK)
    taken = lock_output(root)  # then the record is read: a run that finished meanwhile has written its own
    try:
        if record.is_file():
            old = _read_json(record, dict)
            recorded = {k: v for k, v in old.items() if k != FILES_KEY}
            difference = _first_difference(recorded, {k: v for k, v in settings.items() if k != FILES_KEY}) or \
                _changed_file(old, settings)
            if difference:
                raise HerdError(f"output_dir {root} holds a run of another pipeline ({difference}); use a new "
                                f"output_dir, or remove it to start over")
            return
        write_atomic(record, json.dumps(settings, indent=2) + "\n")
    except HerdError:
        if taken:
            release_output(root, remove=created)  # a refused run leaves the directory as it found it
        raise
    finally:
        if taken and not hold:
            release_output(root)


def lock_output(root: Path) -> bool:
    """An exclusive flock on OUT/.herd-lock until release_output (the kernel drops it when the process dies);
    another live run holding it is one line naming its pid. The file is never written (a rerun changes no file
    of a finished run): the holder is looked up in /proc/locks. False when this process held it already (or the
    filesystem cannot lock)."""
    key = str(root.resolve())
    if key in _held_locks:
        return False
    path = root / LOCK
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise HerdError(f"{path}: cannot be opened as herd curate's lock file ({e.strerror or e}); move it away"
                        ) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        holder = _lock_holder(fd)
        os.close(fd)
        if e.errno in (errno.EAGAIN, errno.EACCES):
            raise HerdError(f"output_dir {root} is in use by another herd curate run ({holder}); wait for it to "
                            f"end, or use another output_dir") from None
        print(f"herd curate: warning: {path} cannot be locked ({e.strerror}); a concurrent run would go "
              f"undetected", file=sys.stderr, flush=True)
        return False
    _held_locks[key] = fd
    return True


def _lock_holder(fd: int) -> str:
    """'pid N on HOST' of the process holding a flock on the open file `fd`, from /proc/locks (Linux)."""
    st = os.fstat(fd)
    inode = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        fields = line.split()
        if len(fields) > 5 and fields[1] == "FLOCK" and fields[5] == inode and fields[4].isdigit():
            return f"held by pid {fields[4]} on {socket.gethostname()}"
    return "holder unknown"


def release_output(root: Path, remove: bool = False) -> None:
    """Let go of the lock taken by lock_output; `remove`: also delete the lock file (one this run created)."""
    fd = _held_locks.pop(str(Path(root).resolve()), None)
    if fd is not None:
        if remove:
            with contextlib.suppress(OSError):
                os.unlink(Path(root) / LOCK)
        os.close(fd)


def _read_json(path: Path, kind: type):
    """A record herd wrote under output_dir; anything else there is one line naming it, never a traceback."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        raise HerdError(f"{path}: not a record herd curate wrote ({str(e).splitlines()[0]}); use a new output_dir, "
                        f"or remove it to start over") from None
    if not isinstance(value, kind) or (kind is list and not all(isinstance(v, str) for v in value)):
        raise HerdError(f"{path}: not a record herd curate wrote; use a new output_dir, or remove it to start over")
    return value


def corpus_files(cfg: CurateConfig, hold: bool = False) -> List[str]:
    """The input files, listed once per output directory: a rerun (resume) uses the same list and sharding even
    if files were added meanwhile (and says how many it leaves out)."""
    listing = Layout(cfg.output_dir).root / FILES_LIST
    current = list_corpus(cfg.input.paths, cfg.input.include)
    if current == [] and not listing.is_file():
        raise HerdError(f"input.paths: no file matching {', '.join(cfg.input.include)} in {', '.join(cfg.input.paths)}")
    claim_output(cfg, hold)  # before anything is written
    if listing.is_file():
        files = _read_json(listing, list)
        left_out = len(set(current) - set(files))
        if left_out:
            print(f"herd curate: {left_out} file{'s' if left_out > 1 else ''} under input.paths "
                  f"{'are' if left_out > 1 else 'is'} not in this run ({listing}, fixed at its first run); use a new "
                  f"output_dir to include {'them' if left_out > 1 else 'it'}", flush=True)
        return files
    write_atomic(listing, json.dumps(current))
    return current


def _redo_report(lay: Layout) -> None:
    """The report pass is always run again (it is cheap): a rerun with other `examples`, or after report.md was
    removed, gets a fresh report instead of the old one."""
    shutil.rmtree(lay.logs("report") / "completions", ignore_errors=True)


def run_local(cfg: CurateConfig) -> None:
    """Every pass in order, each on a local multi-process executor; finished tasks are skipped."""
    lay = Layout(cfg.output_dir)
    if fault_is_hold():
        raise HerdError(f"{FAULT_ENV}=PASS:RANK:{HOLD} waits to be cancelled: it is for the slurm executor")
    if os.environ.get(FAULT_ENV) and os.getpgid(0) != os.getpid():
        raise HerdError(f"{FAULT_ENV} kills the run's process group: start herd curate in a session of its own")
    stages = build_stages(cfg, corpus_files(cfg, hold=True))
    _redo_report(lay)
    for stage in stages:
        for p in stage.passes:
            print(f"herd curate: {stage.name} / {p.name} ({p.tasks} task{'s' if p.tasks > 1 else ''})", flush=True)
            fault = FaultPoint(p.name, str(lay.logs(p.name)))
            executor = LocalPipelineExecutor(p.steps() + [fault], tasks=p.tasks,
                                             workers=max(1, min(cfg.executor.workers if cfg.executor.workers > 0
                                                                else p.tasks, p.tasks)),
                                             logging_dir=str(lay.logs(p.name)), start_method="fork")
            try:
                executor.run()
            except Exception as e:  # noqa: BLE001 - one line naming the pass; the tasks' logs hold the traceback
                raise HerdError(f"{p.name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} (task "
                                f"logs in {lay.logs(p.name)}/logs; a rerun resumes)") from None
            incomplete = executor.get_incomplete_ranks()
            if incomplete:
                raise HerdError(f"{p.name}: tasks {incomplete} did not finish; see {lay.logs(p.name)}/logs "
                                f"(a rerun resumes them)")


class _HerdSlurmExecutor(SlurmPipelineExecutor):
    """datatrove's SLURM executor without the memory request when mem_per_cpu_gb is 0 (a cluster that does not
    schedule memory rejects any), and without its stats-merging job: herd's report pass reads the outputs."""

    def get_sbatch_args(self, max_array: int = 1) -> dict:
        args = super().get_sbatch_args(max_array)
        if not self.mem_per_cpu_gb:
            args.pop("mem-per-cpu", None)
        return args

    def launch_merge_stats(self):
        pass


def submit_slurm(cfg: CurateConfig) -> List[str]:
    """Every pass as a SLURM job array, each depending on the one before (afterok); returns the job ids. Passes
    already complete are not submitted again."""
    lay, ex = Layout(cfg.output_dir), cfg.executor
    if shutil.which("sbatch") is None:  # before output_dir is claimed: nothing written
        raise HerdError("executor.kind: slurm needs sbatch on PATH (run on a SLURM login node, or use "
                        "executor.kind=local)")
    venv = ex.venv_path or str(Path(sys.prefix) / "bin" / "activate")
    previous, executors = None, []
    for stage in build_stages(cfg, corpus_files(cfg, hold=True)):
        for p in stage.passes:
            fault = FaultPoint(p.name, str(lay.logs(p.name)))
            previous = _HerdSlurmExecutor(
                p.steps() + [fault], tasks=p.tasks, time=ex.time, partition=ex.partition,
                cpus_per_task=ex.cpus_per_task, mem_per_cpu_gb=ex.mem_per_cpu_gb, workers=ex.workers,
                job_name=f"{cfg.name}-{p.name}", qos="", venv_path=venv, logging_dir=str(lay.logs(p.name)),
                depends=previous, requeue_signals=None)
            executors.append(previous)
    try:
        previous.run()  # launches its dependencies first, each array after the one before (afterok)
    except (OSError, subprocess.CalledProcessError) as e:
        why = f"exit status {e.returncode}, its message above" if isinstance(e, subprocess.CalledProcessError) \
            else (e.strerror or str(e))
        raise HerdError(f"executor.kind: slurm: sbatch failed ({why}); any pass submitted before it is queued as "
                        f"{cfg.name}-<pass>: scancel it before running herd curate again") from None
    return [str(e.job_id) for e in executors]  # -1: that pass was complete and not submitted
