"""Launching a sweep's runs and reading what they left: locally (one after another, or `jobs` at a time) or as a
SLURM job array whose task i trains the i-th run named in its script. Both go through `python -m scaling.task PLAN
NAME`, which returns at once for a finished run, so a sweep killed at any point resumes where it stopped: finished
runs are never redone. Runs are found by name, never by position: plan.json is rewritten by every `herd scaling`
(a budget added later renumbers the runs), while an array submitted earlier may still have tasks pending.

Locks (fcntl.flock, released when the process ends, however it ends): `herd scaling` holds <sweep>/scaling.lock
while it plans, trains and fits, so two invocations never work on one sweep at once; each task holds
runs/<run>.lock while it trains, so an array task and a local sweep never write one run directory together.

A run is finished when its metrics.jsonl holds the validation loss of its last step and its final checkpoint is
complete (the downstream task reads it). An unfinished run resumes from its newest checkpoint (herd's
checkpoint.resume=auto: a stopped run saved one at its last step boundary), or starts again when it has none.
"""

import contextlib
import fcntl
import hashlib
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import List, Optional

from engine.errors import HerdError
from engine.files import file_problem, write_atomic

PLAN_FILE = "plan.json"
LOCK_FILE = "scaling.lock"
ARRAY_SCRIPT_MARK = "# herd sbatch script, scaling array"  # second line of the rendered script (launch/slurm.py)


def check_regular_file(path: Path, what: str, advice: str) -> None:
    """`path` is absent or a regular file (or a link to one): a directory there can be neither read nor replaced,
    and opening a FIFO or device blocks or never ends. Anything else is one line naming it, never a traceback or a
    hang; it is left as it is (it may be the user's)."""
    problem = file_problem(path)
    if problem not in (None, "does not exist"):
        raise HerdError(f"{path}: {problem.replace(', not a regular file', '')}, not {what}; {advice}")


def read_json_file(path: Path, what: str, advice: str):
    """The content of a JSON file herd wrote; one that is not (not a regular file, unreadable, not UTF-8, not JSON,
    or nested beyond the parser's recursion limit, a RecursionError) is one line naming it."""
    check_regular_file(path, what, advice)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        reason = "nested too deeply" if isinstance(e, RecursionError) else (str(e).splitlines() or [""])[0]
        raise HerdError(f"{path}: not {what} ({reason}); {advice}") from None


def run_path(sweep: Path, name: str) -> Path:
    return sweep / "runs" / name


def final_val_loss(sweep: Path, run: dict) -> Optional[float]:
    """The validation loss after the run's last step, or None while the run is not finished (no such record, or no
    complete checkpoint of that step). A non-finite loss (nan, inf: the run diverged) is returned as it is: the run
    is over (training it again gives the same loss) but failed; see `diverged`."""
    metrics = run_path(sweep, run["name"]) / "metrics.jsonl"
    if not metrics.is_file() or final_checkpoint(sweep, run) is None:
        return None
    loss = None
    with open(metrics, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            try:
                record = json.loads(line)
            except ValueError:  # a line cut by a kill: the run is not finished anyway unless a later one says so
                continue
            except RecursionError:  # herd writes flat records: no line of its own, whole or cut, nests at all
                raise HerdError(f"{metrics}:{number}: not a metrics record (JSON nested too deeply); remove that "
                                f"line, or the run's directory to train the run again") from None
            if isinstance(record, dict) and record.get("step") == run["steps"] and is_loss(record.get("val_loss")):
                loss = float(record["val_loss"])
    return loss


def is_loss(value) -> bool:
    """A validation loss as herd writes it: a positive number (nan or inf: diverged), never a bool (a bool is an
    int in Python), a string, zero or a negative number (no cross-entropy is): those are no record of a loss."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and (value > 0 or math.isnan(value))


# the last line of a run's console log when herd's guards stopped it for a non-finite loss (engine/callbacks/guards.py)
GUARD_STOP = re.compile(r"herd: error: guards: .*(non-finite loss or gradients|non-finite values in)")


def stopped_nonfinite(sweep: Path, run: dict) -> bool:
    """Whether the run's last attempt on this machine ended with herd's guards stopping it for a non-finite loss
    (the last line of its console log, runs/<run>.log): it diverged as surely as a nan loss says, and training it
    again diverges again. (An array task's log is SLURM's, not read here: such a run is trained again.)"""
    log = sweep / "runs" / f"{run['name']}.log"
    if file_problem(log) is not None:
        return False
    try:
        with open(log, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
            lines = f.read().decode("utf-8", errors="replace").strip().splitlines()
    except OSError:
        return False
    return bool(lines) and GUARD_STOP.match(lines[-1].strip()) is not None


def diverged(loss: Optional[float]) -> bool:
    """A finished run whose final validation loss is nan or inf: a failed run, never fitted."""
    return loss is not None and not math.isfinite(loss)


def final_checkpoint(sweep: Path, run: dict) -> Optional[Path]:
    """The checkpoint root holding a complete checkpoint of the run's last step, or None."""
    from engine.checkpoint.store import CheckpointStore
    root = run_path(sweep, run["name"]) / "checkpoints"
    if not root.is_dir():
        return None
    return root if run["steps"] in CheckpointStore(root, keep_last=2).complete_steps() else None


def train_args(plan: dict, run: dict) -> List[str]:
    """`herd train` arguments of one run: the sweep's job, its overrides, then the run's."""
    return ["train", plan["job"], *plan["overrides"], *run["overrides"]]


def config_fields(cfg) -> dict:
    """A job config as {dotted key: value} (lists kept whole), secret values redacted (plan.json is shared)."""
    from engine.config import config_fields as fields_of
    # no scrubbing of the environment's secrets: the same config, the same fields
    return {key: _plain(value) for key, value in fields_of(cfg, scrub_environment=False).items()}


def _plain(value):
    """A config value as strict JSON holds it: inf, nan and any non-JSON object as its text."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (str, bool, int)) or isinstance(value, float) and math.isfinite(value):
        return value
    return str(value)


def config_hash(cfg) -> str:
    """Identifies a run's resolved job config (the job YAML's contents, includes and every override)."""
    text = json.dumps(config_fields(cfg), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def write_plan(sweep: Path, plan: dict) -> Path:
    """plan.json, atomically (array tasks read it while a later `herd scaling` may rewrite it). Runs of the earlier
    plan that this one leaves out are kept under "retired", so planning them again differently is still refused."""
    sweep.mkdir(parents=True, exist_ok=True)
    path = sweep / PLAN_FILE
    names = {r["name"] for r in plan["runs"]}
    retired = [r for r in _planned_before(path).values() if r["name"] not in names]
    plan = {**plan, "retired": retired} if retired else plan
    write_atomic(path, json.dumps(plan, indent=1, allow_nan=False) + "\n")
    return path


def _read_plan(path: Path) -> Optional[dict]:
    """An existing plan.json as parsed (None when there is none); a FIFO, a directory or a file that is no JSON
    there is one line naming it."""
    if not path.exists():
        return None
    return read_json_file(path, "a herd scaling plan", "choose another name or run_dir")


def _planned_before(path: Path, old: Optional[dict] = None) -> dict:
    """{name: run} of every run an existing plan.json (`old`, its content when read already) holds (planned now or
    retired); {} when there is none."""
    old = _read_plan(path) if old is None else old
    if old is None:
        return {}
    try:
        return {r["name"]: r for r in [*old["runs"], *old.get("retired", [])]}
    except (KeyError, TypeError, AttributeError):
        raise HerdError(f"{path}: not a herd scaling plan; choose another name or run_dir") from None


def check_same_sweep(sweep: Path, plan: dict) -> None:
    """A sweep directory holds one sweep: the job of an earlier plan.json there, and its runs (planned or retired)
    that are planned again, must be the same (job and overrides, each run's overrides and resolved job config), or
    finished runs would be counted for a different experiment. Runs added or left out are fine."""
    path = sweep / PLAN_FILE
    old = _read_plan(path)
    before = _planned_before(path, old)
    _check_no_unplanned_runs(sweep, plan, before, old is None)
    if not before:
        return
    try:
        resolved = isinstance(old.get("job_config"), dict)  # the overrides are compared by what they resolve to
        same_job = [old["job"], *([] if resolved else old["overrides"])] == \
            [plan["job"], *([] if resolved else plan["overrides"])]
        again = [(before[r["name"]], r) for r in plan["runs"] if r["name"] in before]
        changed = sorted(now["name"] for then, now in again if then["overrides"] != now["overrides"])
        if isinstance(old.get("job_config"), dict):  # the job's resolved fields: compare those that shape results
            keys = _changed_fields(old["job_config"], plan["job_config"])
            rehashed = (sorted(now["name"] for _, now in again) or sorted(before)) if keys else []
        else:  # an older plan.json: its runs' hashes (none: taken as it is, and gets them now)
            keys = ""
            rehashed = sorted(now["name"] for then, now in again
                              if then.get("config_hash", now.get("config_hash")) != now.get("config_hash"))
    except (ValueError, KeyError, TypeError, AttributeError):
        raise HerdError(f"{path}: not a herd scaling plan; choose another name or run_dir") from None
    if not same_job or changed:
        what = f"planned {changed[0]} differently" if changed else "planned its job differently"
        raise HerdError(f"{path}: the sweep there {what} (job, overrides or schedule changed); use another name, or "
                        f"remove {sweep} to start over")
    if rehashed:
        edited = "the sweep's overrides" if _set_by_overrides(keys, [*old["overrides"], *plan["overrides"]]) \
            else plan["job"]
        raise HerdError(f"{path}: run {rehashed[0]} was planned from a different job config ({edited}: "
                        f"{keys or 'its resolved contents'} changed); use another name, or remove {sweep} to start "
                        f"over")


def _set_by_overrides(keys: str, overrides: list) -> bool:
    """Whether a changed key (of _changed_fields' list) is one an override sets (else the job YAML changed)."""
    named = {str(o).split("=", 1)[0].strip().lstrip("+~") for o in overrides}
    changed = [k.strip() for k in keys.split(" and ")[0].split(",") if k.strip()]
    return any(k == n or k.startswith(n + ".") for k in changed for n in named)


def _check_no_unplanned_runs(sweep: Path, plan: dict, before: dict, missing: bool) -> None:
    """A run directory the earlier plan.json does not plan (plan.json removed, or replaced by one without that run)
    may hold a run of another sweep: counted finished, or resumed with this plan's settings, it would be fitted as
    this plan's run. Refused, naming it, rather than guessed at."""
    unplanned = [r["name"] for r in plan["runs"] if r["name"] not in before and run_path(sweep, r["name"]).is_dir()]
    if unplanned:
        more = f" (and {len(unplanned) - 1} more)" if len(unplanned) > 1 else ""
        why = "there is no plan.json" if missing else f"{sweep / PLAN_FILE} does not plan it"
        raise HerdError(f"{sweep}: runs/{unplanned[0]}{more} holds a run, but {why}, so what it trained is unknown; "
                        f"restore plan.json, or remove {sweep / 'runs'} to train the runs again")


# job config keys that cannot change a run's losses: how it logs and where a job script sends it. Editing them
# between invocations of one sweep is allowed.
NOT_RESULTS = ("log.every", "log.tensorboard", "log.peak_tflops")
NOT_RESULTS_UNDER = ("watchdog.", "slurm.")


def _changed_fields(before: dict, now: dict) -> str:
    """The dotted keys, present in both (a key herd added or dropped since is not an edit of the user's), whose
    values differ and can change results (the first three), or '' when none."""
    keys = sorted(k for k in before.keys() & now.keys() if before[k] != now[k]
                  and k not in NOT_RESULTS and not k.startswith(NOT_RESULTS_UNDER))
    return ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")


@contextlib.contextmanager
def holding_lock(path: Path, what: str):
    """An exclusive flock on `path` (created, holding this pid) for the block; a second holder gets one line naming
    the file. The file stays: removing a lock file another process has open would let two holders in."""
    path.parent.mkdir(parents=True, exist_ok=True)
    check_regular_file(path, "a lock file", "move it away (herd creates its lock file there)")
    try:
        f = open(path, "a+")
    except OSError as e:  # a file made read-only, say
        raise HerdError(f"{path}: cannot open the lock file ({e.strerror or e})") from None
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip()
            raise HerdError(f"{path} is locked: another process{f' (pid {holder})' if holder.isdigit() else ''} "
                            f"is {what}; wait for it to end, or stop it") from None
        f.truncate(0)
        f.write(f"{os.getpid()}\n")
        f.flush()
        yield


def pending(sweep: Path, plan: dict) -> List[int]:
    """The runs to train: not finished, and not stopped by the guards for a non-finite loss (diverged)."""
    return [i for i, run in enumerate(plan["runs"])
            if final_val_loss(sweep, run) is None and not stopped_nonfinite(sweep, run)]


def run_local(sweep: Path, plan: dict, jobs: int) -> int:
    """Every unfinished run on this machine, `jobs` at a time, each `python -m scaling.task` in its own process
    (its console output in runs/<run>.log). SIGTERM or Ctrl-C is passed to the running runs, which save at their
    next step boundary and stop (herd's preemption); no new run starts. Returns the number of runs that failed,
    were stopped or diverged."""
    from concurrent.futures import ThreadPoolExecutor, as_completed
    todo = pending(sweep, plan)
    print(f"herd scaling: {len(plan['runs'])} runs, {len(plan['runs']) - len(todo)} finished already, {len(todo)} "
          f"to train ({jobs} at a time)", flush=True)
    threads = str(max(1, (os.cpu_count() or 1) // jobs))  # jobs x threads = the machine's cores
    children = _Children()
    with children.forwarding_signals(), ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {pool.submit(_train_one, sweep, plan["runs"][index]["name"], threads, children): index
                   for index in todo}
        failed = sum(_report(sweep, plan["runs"][futures[f]], *f.result()) for f in as_completed(futures))
    if children.stopped:
        raise HerdError(f"stopped by signal {children.stopped}: the running runs saved a checkpoint; run the same "
                        f"command again to go on (finished runs are kept)")
    return failed


class _Children:
    """The run processes alive now, and the signal that stopped the sweep (0: none). The lock makes "register a
    process" and "stop every registered process" exclusive, so a signal cannot fall between a worker's check of
    `stopped` and its registration of a new process (that run would never be told to stop). Reentrant: a second
    signal may interrupt the handler in the same (main) thread."""

    def __init__(self):
        self.alive: set = set()
        self.stopped = 0
        self.lock = threading.RLock()

    def register(self, process) -> None:
        """Add a started process; stop it at once when the sweep was stopped meanwhile."""
        with self.lock:
            self.alive.add(process)
            stop = self.stopped
        if stop:
            process.send_signal(signal.SIGTERM)

    @contextlib.contextmanager
    def forwarding_signals(self):
        def forward(signum, frame):
            with self.lock:
                self.stopped = signum
                running = list(self.alive)
            for process in running:
                process.send_signal(signal.SIGTERM)  # herd train saves at the step boundary and exits 75
        previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


def _train_one(sweep: Path, name: str, threads: str, children: _Children) -> tuple:
    """(exit code, seconds, log path) of `python -m scaling.task PLAN name` in a child process."""
    log_path = sweep / "runs" / f"{name}.log"  # beside the run's directory; appended to when it resumes
    log_path.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    if children.stopped:
        return -children.stopped, 0.0, str(log_path)
    with open(log_path, "a") as log:
        # its own session: a Ctrl-C reaches the run only through forward() (as SIGTERM, which herd train handles)
        process = subprocess.Popen([sys.executable, "-m", "scaling.task", str(sweep / PLAN_FILE), name],
                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                   env={**os.environ, "OMP_NUM_THREADS": threads})
        children.register(process)
        code = process.wait()
        children.alive.discard(process)
    return code, time.monotonic() - started, str(log_path)


def _report(sweep: Path, run: dict, code: int, seconds: float, log: str) -> int:
    loss = final_val_loss(sweep, run)
    if code == 0 and diverged(loss):
        print(f"  {run['name']}: FAILED: it diverged (final validation loss {loss}) after {seconds:.0f} s; it is not "
              f"trained again (log {log})", flush=True)
        return 1
    if code == 0 and loss is not None:
        print(f"  {run['name']}: N={run['params']:,} D={run['tokens']:,} ({run['steps']} steps) -> "
              f"validation loss {loss:.4f} in {seconds:.0f} s", flush=True)
        return 0
    if code == 0:  # herd train ended well, yet no final loss or checkpoint where the sweep looks: no retry helps
        print(f"  {run['name']}: FAILED: it ended (exit 0) after {seconds:.0f} s without the validation loss of its "
              f"last step {run['steps']} and that step's checkpoint under {run_path(sweep, run['name'])} (log {log})",
              flush=True)
        return 1
    if code != 0 and stopped_nonfinite(sweep, run):
        print(f"  {run['name']}: FAILED: it diverged (herd's guards stopped it: non-finite loss) after {seconds:.0f} "
              f"s; it is not trained again (log {log})", flush=True)
        return 1
    if code in (75, -signal.SIGTERM, -signal.SIGINT):  # herd's PREEMPTED_EXIT_CODE: saved, resumes next time
        print(f"  {run['name']}: stopped after {seconds:.0f} s (exit {code}); it resumes on the next invocation",
              flush=True)
        return 1
    tail = Path(log).read_text(errors="replace").strip().splitlines()[-1:] if Path(log).is_file() else []
    print(f"  {run['name']}: FAILED (exit {code}) after {seconds:.0f} s: {tail[0] if tail else ''} (log {log})",
          flush=True)
    return 1


def render_array(sweep: Path, names: List[str], slurm: dict, python: str = sys.executable) -> str:
    """An sbatch script of a job array over the unfinished runs, whose names it holds: task i runs `python -m
    scaling.task PLAN <the i-th name>` (one process, the job's device: one GPU or CPU). The names are fixed at
    submission (SLURM keeps the script), so a plan.json rewritten later with other runs cannot send a pending or
    requeued task to another run. Conventions of launch/slurm.py: the marked second line, logs %x-%A_%a, --signal
    before the time limit (herd saves at a step boundary, exits 75 and the task is requeued)."""
    from engine.callbacks.preemption import PREEMPTED_EXIT_CODE
    workdir = check_array_paths(sweep, slurm)
    task = " ".join(shlex.quote(a) for a in [python, "-m", "scaling.task", str((sweep / PLAN_FILE).resolve())])
    options = [f"#SBATCH --job-name={slurm['job_name']}", f"#SBATCH --array={_ranges(list(range(len(names))))}"
               + (f"%{slurm['max_parallel']}" if slurm.get("max_parallel") else ""),
               "#SBATCH --ntasks=1", f"#SBATCH --cpus-per-task={slurm.get('cpus_per_task') or 1}",
               f"#SBATCH --signal=B:USR1@{slurm.get('signal_seconds', 300)}", "#SBATCH --requeue",
               "#SBATCH --output=%x-%A_%a.out", "#SBATCH --error=%x-%A_%a.err", "#SBATCH --open-mode=append",
               f"#SBATCH --chdir={workdir}"]
    options += ["#SBATCH --gpus-per-task=1"] if slurm.get("gpus") else []
    options += [f"#SBATCH --{k}={slurm[k]}" for k in ("partition", "account", "qos", "time") if slurm.get(k)]
    return "\n".join([
        "#!/bin/bash", ARRAY_SCRIPT_MARK,
        f"# Rendered by `herd scaling --slurm` for {sweep}: one array task per unfinished run (docs/scaling.md).",
        *options, "",
        "RUNS=(" + " ".join(shlex.quote(name) for name in names) + ")  # task i trains ${RUNS[i]}",
        f"PREEMPTED_EXIT_CODE={PREEMPTED_EXIT_CODE}",
        'run="${RUNS[$SLURM_ARRAY_TASK_ID]}"',
        'echo "herd scaling: array task $SLURM_ARRAY_TASK_ID (job $SLURM_JOB_ID) on $SLURMD_NODENAME: run $run"',
        f'{task} "$run" &',
        "step=$!",
        'trap \'kill -s USR1 "$step" 2>/dev/null\' USR1',
        "trap 'kill -s TERM \"$step\" 2>/dev/null' TERM",
        'while kill -0 "$step" 2>/dev/null; do wait "$step"; done',
        'wait "$step"; rc=$?',
        'if [ "$rc" -eq "$PREEMPTED_EXIT_CODE" ]; then scontrol requeue "$SLURM_JOB_ID"; fi',
        'exit "$rc"', ""])


def check_array_paths(sweep: Path, slurm: dict) -> Path:
    """The working directory (for `#SBATCH --chdir=`), after checking what render_array pastes into the script
    besides numbers and shell-quoted arguments: the sweep directory into a comment line (a newline in run_dir ran
    the rest of it as a command), the working directory into --chdir (launch/slurm.py check_workdir: refused rather
    than quoted), and the words of `slurm` into `#SBATCH` lines (checked by herd scaling's flags already)."""
    from launch.slurm import check_line_text, check_sbatch_value, check_workdir
    check_line_text(str(sweep), "the sweep directory (run_dir/name)", "choose another run_dir")
    for key in ("job_name", "partition", "account", "qos", "time"):
        if slurm.get(key):
            check_sbatch_value(str(slurm[key]), f"the array's {key}", "choose another")
    workdir = Path.cwd().resolve()
    check_workdir(str(workdir))
    return workdir


def _ranges(indices: List[int]) -> str:
    """SLURM's --array syntax for sorted indices: 0-3,5,7-8."""
    parts, start = [], None
    for i, index in enumerate(indices):
        if start is None:
            start = index
        if i + 1 == len(indices) or indices[i + 1] != index + 1:
            parts.append(str(start) if start == index else f"{start}-{index}")
            start = None
    return ",".join(parts)
