"""Launching a sweep's runs and reading what they left: locally (one after another, or `jobs` at a time) or as a
SLURM job array whose task i trains run i. Both go through `python -m scaling.task PLAN INDEX`, which returns at once
for a finished run, so a sweep killed at any point resumes where it stopped: finished runs are never redone.

A run is finished when its metrics.jsonl holds the validation loss of its last step and its final checkpoint is
complete (the downstream task reads it). An unfinished run resumes from its newest checkpoint (herd's
checkpoint.resume=auto: a stopped run saved one at its last step boundary), or starts again when it has none.
"""

import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional

from engine.errors import HerdError

PLAN_FILE = "plan.json"
ARRAY_SCRIPT_MARK = "# herd sbatch script, scaling array"  # second line of the rendered script (launch/slurm.py)


def run_path(sweep: Path, name: str) -> Path:
    return sweep / "runs" / name


def final_val_loss(sweep: Path, run: dict) -> Optional[float]:
    """The validation loss after the run's last step, or None while the run is not finished (no such record, or no
    complete checkpoint of that step)."""
    metrics = run_path(sweep, run["name"]) / "metrics.jsonl"
    if not metrics.is_file() or final_checkpoint(sweep, run) is None:
        return None
    loss = None
    with open(metrics, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:  # a line cut by a kill: the run is not finished anyway unless a later one says so
                continue
            if isinstance(record, dict) and record.get("step") == run["steps"] and \
                    isinstance(record.get("val_loss"), (int, float)):
                loss = float(record["val_loss"])
    return loss


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


def write_plan(sweep: Path, plan: dict) -> Path:
    """plan.json, atomically (array tasks read it while a later `herd scaling` may rewrite it with the same runs)."""
    sweep.mkdir(parents=True, exist_ok=True)
    path = sweep / PLAN_FILE
    temporary = path.with_name(f".{PLAN_FILE}.tmp{os.getpid()}")
    temporary.write_text(json.dumps(plan, indent=1) + "\n")
    os.replace(temporary, path)
    return path


def check_same_sweep(sweep: Path, plan: dict) -> None:
    """A sweep directory holds one sweep: the runs of an earlier plan.json there must be the ones planned now
    (same names, same overrides), or finished runs would be counted for a different experiment."""
    path = sweep / PLAN_FILE
    if not path.exists():
        return
    try:
        old = json.loads(path.read_text())
        before = {r["name"]: r["overrides"] for r in old["runs"]} | {"@job": [old["job"], *old["overrides"]]}
    except (OSError, ValueError, KeyError, TypeError):
        raise HerdError(f"{path}: not a herd scaling plan; choose another name or run_dir") from None
    now = {r["name"]: r["overrides"] for r in plan["runs"]} | {"@job": [plan["job"], *plan["overrides"]]}
    changed = sorted(k for k in before.keys() & now.keys() if before[k] != now[k])
    if changed:
        raise HerdError(f"{path}: the sweep there planned {changed[0]} differently (job, overrides or schedule "
                        f"changed); use another name, or remove {sweep} to start over")


def pending(sweep: Path, plan: dict) -> List[int]:
    return [i for i, run in enumerate(plan["runs"]) if final_val_loss(sweep, run) is None]


def run_local(sweep: Path, plan: dict, jobs: int) -> int:
    """Every unfinished run on this machine, `jobs` at a time, each `python -m scaling.task` in its own process
    (its console output in runs/<run>.log). SIGTERM or Ctrl-C is passed to the running runs, which save at their
    next step boundary and stop (herd's preemption); no new run starts. Returns the number of runs not finished."""
    from concurrent.futures import ThreadPoolExecutor, as_completed
    todo = pending(sweep, plan)
    print(f"herd scaling: {len(plan['runs'])} runs, {len(plan['runs']) - len(todo)} finished already, {len(todo)} "
          f"to train ({jobs} at a time)", flush=True)
    threads = str(max(1, (os.cpu_count() or 1) // jobs))  # jobs x threads = the machine's cores
    children = _Children()
    with children.forwarding_signals(), ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {pool.submit(_train_one, sweep, plan["runs"][index]["name"], index, threads, children): index
                   for index in todo}
        failed = sum(_report(sweep, plan["runs"][futures[f]], *f.result()) for f in as_completed(futures))
    if children.stopped:
        raise HerdError(f"stopped by signal {children.stopped}: the running runs saved a checkpoint; run the same "
                        f"command again to go on (finished runs are kept)")
    return failed


class _Children:
    """The run processes alive now, and the signal that stopped the sweep (0: none)."""

    def __init__(self):
        self.alive: set = set()
        self.stopped = 0

    @contextlib.contextmanager
    def forwarding_signals(self):
        def forward(signum, frame):
            self.stopped = signum
            for process in list(self.alive):
                process.send_signal(signal.SIGTERM)  # herd train saves at the step boundary and exits 75
        previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


def _train_one(sweep: Path, name: str, index: int, threads: str, children: _Children) -> tuple:
    """(exit code, seconds, log path) of `python -m scaling.task PLAN index` in a child process."""
    log_path = sweep / "runs" / f"{name}.log"  # beside the run's directory; appended to when it resumes
    log_path.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    if children.stopped:
        return -children.stopped, 0.0, str(log_path)
    with open(log_path, "a") as log:
        # its own session: a Ctrl-C reaches the run only through forward() (as SIGTERM, which herd train handles)
        process = subprocess.Popen([sys.executable, "-m", "scaling.task", str(sweep / PLAN_FILE), str(index)],
                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                   env={**os.environ, "OMP_NUM_THREADS": threads})
        children.alive.add(process)
        code = process.wait()
        children.alive.discard(process)
    return code, time.monotonic() - started, str(log_path)


def _report(sweep: Path, run: dict, code: int, seconds: float, log: str) -> int:
    loss = final_val_loss(sweep, run)
    if code == 0 and loss is not None:
        print(f"  {run['name']}: N={run['params']:,} D={run['tokens']:,} ({run['steps']} steps) -> "
              f"validation loss {loss:.4f} in {seconds:.0f} s", flush=True)
        return 0
    if code in (75, -signal.SIGTERM, -signal.SIGINT):  # herd's PREEMPTED_EXIT_CODE: saved, resumes next time
        print(f"  {run['name']}: stopped after {seconds:.0f} s (exit {code}); it resumes on the next invocation",
              flush=True)
        return 1
    tail = Path(log).read_text(errors="replace").strip().splitlines()[-1:] if Path(log).is_file() else []
    print(f"  {run['name']}: FAILED (exit {code}) after {seconds:.0f} s: {tail[0] if tail else ''} (log {log})",
          flush=True)
    return 1


def render_array(sweep: Path, plan: dict, indices: List[int], slurm: dict, python: str = sys.executable) -> str:
    """An sbatch script of a job array over the unfinished runs: task i runs `python -m scaling.task PLAN i`
    (one process, the job's device: one GPU or CPU). Conventions of launch/slurm.py: the marked second line, logs
    %x-%A_%a, --signal before the time limit (herd saves at a step boundary, exits 75 and the task is requeued)."""
    from engine.callbacks.preemption import PREEMPTED_EXIT_CODE
    task = " ".join(shlex.quote(a) for a in [python, "-m", "scaling.task", str((sweep / PLAN_FILE).resolve())])
    options = [f"#SBATCH --job-name={slurm['job_name']}", f"#SBATCH --array={_ranges(indices)}"
               + (f"%{slurm['max_parallel']}" if slurm.get("max_parallel") else ""),
               "#SBATCH --ntasks=1", f"#SBATCH --cpus-per-task={slurm.get('cpus_per_task') or 1}",
               f"#SBATCH --signal=B:USR1@{slurm.get('signal_seconds', 300)}", "#SBATCH --requeue",
               "#SBATCH --output=%x-%A_%a.out", "#SBATCH --error=%x-%A_%a.err", "#SBATCH --open-mode=append",
               f"#SBATCH --chdir={Path.cwd().resolve()}"]
    options += [f"#SBATCH --gpus-per-task=1"] if slurm.get("gpus") else []
    options += [f"#SBATCH --{k}={slurm[k]}" for k in ("partition", "account", "qos", "time") if slurm.get(k)]
    return "\n".join([
        "#!/bin/bash", ARRAY_SCRIPT_MARK,
        f"# Rendered by `herd scaling --slurm` for {sweep}: one array task per unfinished run (docs/scaling.md).",
        *options, "",
        f"PREEMPTED_EXIT_CODE={PREEMPTED_EXIT_CODE}",
        'echo "herd scaling: array task $SLURM_ARRAY_TASK_ID (job $SLURM_JOB_ID) on $SLURMD_NODENAME"',
        f'{task} "$SLURM_ARRAY_TASK_ID" &',
        "step=$!",
        'trap \'kill -s USR1 "$step" 2>/dev/null\' USR1',
        "trap 'kill -s TERM \"$step\" 2>/dev/null' TERM",
        'while kill -0 "$step" 2>/dev/null; do wait "$step"; done',
        'wait "$step"; rc=$?',
        'if [ "$rc" -eq "$PREEMPTED_EXIT_CODE" ]; then scontrol requeue "$SLURM_JOB_ID"; fi',
        'exit "$rc"', ""])


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
