"""`herd launch --slurm`: an sbatch script rendered from a herd config, in one of two shapes (launch/templates/):

- torchrun: one task per node runs torchrun (here `python -m launch.slurm agent`, see `agent` below) with c10d
  rendezvous on the first node of the allocation;
- srun: one task per rank; SLURM_PROCID / SLURM_LOCALID / SLURM_NTASKS become RANK / LOCAL_RANK / WORLD_SIZE.

Both ask for SIGUSR1 `slurm.signal_seconds` before the time limit (B: form, so the batch shell gets it and
forwards it through srun to every process of the step), allow requeueing, name their logs %x-%j and end the step
when a task fails; when the ranks exit with PREEMPTED_EXIT_CODE (saved at a step boundary) the script runs
`scontrol requeue`, and the requeued job resumes from the newest checkpoint (checkpoint.resume=auto).
docs/launch.md says what each piece is for and what has been verified where.
"""

import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional

from engine.callbacks.preemption import PREEMPTED_EXIT_CODE  # what herd train exits with after saving
from engine.config import JobConfig
from engine.config_checks import check_directory
from engine.errors import ConfigError, HerdError

ROOT = Path(__file__).resolve().parents[1]
TEMPLATES = Path(__file__).resolve().parent / "templates"
_TOKEN = re.compile(r"\{\{([A-Z_]+)\}\}")


def _env_file(path: str) -> Optional[Path]:
    """The per-cluster env file: as given (relative to the working directory), else relative to herd's root
    (so `launch/clusters/example_h100.env` works from anywhere)."""
    if not path:
        return None
    for candidate in (Path(path), ROOT / path):
        if candidate.is_file():
            return candidate.resolve()
    raise ConfigError("slurm.env_file", f"{path}: file not found (here or under {ROOT})")


def _resources(cfg: JobConfig, ranks_per_node: int) -> List[str]:
    s = cfg.slurm
    lines = []
    if cfg.train.device != "cpu":  # CPU ranks (gloo) ask for no GPUs; slurm.gpus_per_node then counts processes
        lines.append(f"#SBATCH --gpus-per-node={s.gpus_per_node}")
    if s.cpus_per_task:
        lines.append(f"#SBATCH --cpus-per-task={s.cpus_per_task}")
    return lines or [f"# no GPUs requested: train.device=cpu runs {ranks_per_node} CPU ranks per node on gloo"]


def _sbatch_extra(cfg: JobConfig) -> List[str]:
    s = cfg.slurm
    named = [f"#SBATCH --{opt}={value}" for opt, value in
             (("partition", s.partition), ("account", s.account), ("qos", s.qos), ("time", s.time)) if value]
    return named + [f"#SBATCH {arg}" for arg in s.sbatch_args]


def _on_exit(requeue: bool) -> str:
    if not requeue:
        return "# slurm.requeue=false: a preempted run (exit $PREEMPTED_EXIT_CODE) is not requeued"
    return "\n".join([
        'if [ "$rc" -eq "$PREEMPTED_EXIT_CODE" ]; then',
        '    echo "herd: the ranks saved and exited with $rc (preempted): requeueing job $SLURM_JOB_ID" >&2',
        '    scontrol requeue "$SLURM_JOB_ID"',
        "fi",
    ])


def render(cfg: JobConfig, config_path: str, overrides: List[str], python: str = sys.executable,
           workdir: Optional[str] = None) -> str:
    """The sbatch script for this config; `overrides` are passed on to `herd train` as given (quoted)."""
    s = cfg.slurm
    env_file = _env_file(s.env_file)
    ranks = s.gpus_per_node
    port = str(s.master_port) if s.master_port else "$((20000 + SLURM_JOB_ID % 10000))"
    train = ["-m", "launch", "train", str(Path(config_path).resolve()), *overrides]
    values: Dict[str, str] = {
        "ORIGIN": f"Rendered by `herd launch --slurm` from {config_path}; edit by hand as needed (docs/launch.md).",
        "JOB_NAME": s.job_name or cfg.log.name,
        "NODES": str(s.nodes),
        "RANKS_PER_NODE": str(ranks),
        "RESOURCES": "\n".join(_resources(cfg, ranks)),
        "SIGNAL_SECONDS": str(s.signal_seconds),
        "REQUEUE": "#SBATCH --requeue" if s.requeue else "#SBATCH --no-requeue",
        "WORKDIR": str(Path(workdir or os.getcwd()).resolve()),
        "SBATCH_EXTRA": "\n".join(_sbatch_extra(cfg)) or "# (slurm.partition/account/qos/time/sbatch_args: none)",
        "ENV_FILE": f"source {shlex.quote(str(env_file))}  # cluster settings (slurm.env_file)" if env_file
        else "# no per-cluster env file (slurm.env_file)",
        "PREEMPTED_EXIT_CODE": str(PREEMPTED_EXIT_CODE),
        "MASTER_PORT": port,
        "HERD_TRAIN": " ".join(shlex.quote(a) for a in train),
        "PYTHON": shlex.quote(python),
        "ON_EXIT": _on_exit(s.requeue),
    }
    text = (TEMPLATES / f"{s.shape}.sbatch").read_text()
    unknown = set(_TOKEN.findall(text)) - set(values)
    if unknown:  # a hand-edited template with a typo: say so rather than write a broken script
        raise HerdError(f"{TEMPLATES / s.shape}.sbatch: unknown placeholders {', '.join(sorted(unknown))}")
    return _TOKEN.sub(lambda m: values[m.group(1)], text)


SCRIPT_MARK = "# herd sbatch script"  # the templates' second line: a file with it is one herd rendered


def check_script_destination(out: str, config_path: str) -> Path:
    """The sbatch script may replace only an earlier herd script: never the config it is rendered from, nor any
    other file of the user's (R21), nor a path under a file."""
    path = Path(out)
    if path.exists() and Path(config_path).exists() and path.resolve() == Path(config_path).resolve():
        raise HerdError(f"--out {out}: that is the config the script is rendered from; choose another path")
    if path.is_dir():
        raise HerdError(f"--out {out}: is a directory; name the script file")
    if path.exists() and not path.is_file():  # a FIFO would block the read below, a device never end it
        raise HerdError(f"--out {out}: exists and is not a file; choose another path")
    if path.exists() and not is_rendered_script(path, SCRIPT_MARK):
        raise HerdError(f"--out {out}: exists and is not a herd sbatch script; choose another path or remove it")
    check_directory(str(path.parent), "--out")
    return path


def is_rendered_script(path: Path, mark: str) -> bool:
    """A regular file whose second line starts with `mark` (the line herd's templates begin with it). Only a
    regular file is opened (a FIFO would block the read forever, a device never end it), and only its first two
    lines are read (the path may name any big file of the user's); an unreadable file is not known to be ours."""
    if not path.is_file():
        return False
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            f.readline(4096)
            return f.readline(4096).startswith(mark)
    except OSError:
        return False


def write_and_submit(script: str, out: str, submit: bool) -> int:
    """Writes the script atomically (a reader, or sbatch, never sees half of it) and submits it."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp{os.getpid()}")
    temporary.write_text(script)
    temporary.chmod(0o755)
    os.replace(temporary, path)
    print(f"herd launch: wrote {path}", flush=True)
    if not submit:
        print(f"submit it with: sbatch {path}", flush=True)
        return 0
    try:
        result = subprocess.run(["sbatch", "--parsable", str(path)], capture_output=True, text=True)
    except FileNotFoundError:
        raise HerdError("--submit: sbatch not found on PATH (is this a SLURM login node?)") from None
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines()
        raise HerdError(f"sbatch {path} failed: {lines[-1] if lines else f'exit {result.returncode}'}")
    job_id = result.stdout.strip().split(";")[0]
    print(f"submitted job {job_id} (logs: {_log_hint(script, job_id)})", flush=True)
    return 0


def _log_hint(script: str, job_id: str) -> str:
    name = re.search(r"^#SBATCH --job-name=(\S+)", script, re.M)
    workdir = re.search(r"^#SBATCH --chdir=(\S+)", script, re.M)
    stem = f"{name.group(1) if name else 'job'}-{job_id}"
    return f"{workdir.group(1) if workdir else '.'}/{stem}.out and .err"


# ---------------------------------------------------------------------------------------------- the agent

def agent(argv: List[str]) -> int:
    """torchrun, for the torchrun shape. Two differences that SLURM needs:

    - SIGUSR1 is ignored by this process. SLURM signals every process of the step (torchrun and its ranks); the
      ranks act on it (PreemptionCallback), and torchrun must not die of it (its default action) and orphan them.
      The ranks inherit the ignore until the callback installs its handler, so a signal during start-up is lost
      rather than fatal.
    - torchrun exits 1 whatever its ranks' codes were; this exits with the code of the first rank to end
      (launch/local.py's launcher_exit_code, as `herd launch --nproc` does): 75 when it was preempted and saved,
      so that the batch script requeues.
    """
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run
    from launch.local import launcher_exit_code
    args = get_args_parser().parse_args(argv)
    try:
        run(args)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        print(f"herd agent: rank {rank} exited with {failure.exitcode}", file=sys.stderr, flush=True)
        return launcher_exit_code(failure.exitcode)  # 75 (saved: requeue) passes through, as under herd launch
    return 0


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] != "agent":
        sys.exit("usage: python -m launch.slurm agent TORCHRUN_ARGS...")
    sys.exit(agent(sys.argv[2:]))
