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
from engine.files import file_problem, write_atomic

ROOT = Path(__file__).resolve().parents[1]
TEMPLATES = Path(__file__).resolve().parent / "templates"
_TOKEN = re.compile(r"\{\{([A-Z_]+)\}\}")


def _env_file(path: str) -> Optional[Path]:
    """The per-cluster env file: as given (relative to the working directory), else relative to herd's root
    (so `launch/clusters/example_h100.env` works from anywhere)."""
    if not path:
        return None
    for candidate in (Path(path), ROOT / path):
        problem = file_problem(candidate)
        if problem is None:
            _check_shell_syntax(candidate)
            return candidate.resolve()
        if problem != "does not exist":  # a directory, a FIFO, a dangling link, a name too long: said as such
            raise ConfigError("slurm.env_file", f"{candidate} {problem}")
    raise ConfigError("slurm.env_file", f"{path}: file not found (here or under {ROOT})")


def _check_shell_syntax(path: Path) -> None:
    """The script sources the env file before anything runs: a syntax error there would end every job (and every
    requeue) at its first line, so bash reads it here first (`bash -n`: parsed, not run)."""
    try:
        result = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):  # no bash on this host (the cluster's is what matters): unchecked
        return
    if result.returncode != 0:
        first = (result.stderr.strip().splitlines() or ["a syntax error"])[0]
        raise ConfigError("slurm.env_file", f"{path}: bash cannot parse it ({first.strip()[:300]})")


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
    named = [(opt, value) for opt, value in
             (("partition", s.partition), ("account", s.account), ("qos", s.qos), ("time", s.time)) if value]
    for opt, value in named:  # load_config checked them (letters, digits, . , _ + -; a time): a guard
        check_sbatch_value(value, f"slurm.{opt}", "set another value")
    check_sbatch_args(s.sbatch_args)
    return [f"#SBATCH --{opt}={value}" for opt, value in named] + [f"#SBATCH {arg}" for arg in s.sbatch_args]


# ------------------------------------------------------------------------- values pasted into the script (F7, F8)
# Every value herd writes into a script is one of: a number, a word checked against a small character set, a
# shell-quoted (shlex.quote) argument of a command line, or a path in a comment or an `#SBATCH` line. The last two
# are checked here: a newline there would end the line and run the rest as a command (and end sbatch's reading of
# the `#SBATCH` lines: nodes, signal, requeue and chdir would be ignored).

_NAMED = {"\n": "a newline", "\r": "a carriage return", "\t": "a tab", " ": "a space"}


def _describe(char: str) -> str:
    if char in _NAMED:
        return _NAMED[char]
    return f"'{char}'" if char.isprintable() else f"the non-printable character U+{ord(char):04X}"


def check_line_text(value: str, what: str, advice: str = "rename it") -> None:
    """`value` goes into one line of the script (a comment, or an `#SBATCH` line): no character that is not
    printable, i.e. no control character (below 0x20, 0x7f, 0x80-0x9f: U+0085 is a line break too), no line or
    paragraph separator (U+2028, U+2029), no format character, no lone surrogate (a file name that is not UTF-8).
    A space is printable. `what` names what carries it, in the one-line error."""
    bad = next((c for c in value if not c.isprintable()), None)
    if bad is not None:
        raise HerdError(f"{what} {value!r} contains {_describe(bad)}, which cannot go into a line of the sbatch "
                        f"script (it would end or hide part of the line); {advice}")


# Characters sbatch's own reading of an `#SBATCH` line takes as syntax (src/sbatch/opt.c, _get_argument):
# whitespace ends the value, quotes are removed (double quotes in every version, single ones only since about
# 17.11), a backslash escapes the next character and an unescaped # starts a comment.
SBATCH_SYNTAX = " \t\"'\\#"


def check_sbatch_value(value: str, what: str, advice: str) -> None:
    """`value` goes into an `#SBATCH --option=value` line as it is: printable, and none of SBATCH_SYNTAX."""
    check_line_text(value, what, advice)
    bad = next((c for c in value if c in SBATCH_SYNTAX or c.isspace()), None)
    if bad is not None:
        raise HerdError(f"{what} {value!r} contains {_describe(bad)}, which sbatch reads as syntax in an `#SBATCH` "
                        f"line (the value would be cut or changed); {advice}")


def check_workdir(workdir: str) -> None:
    """The job's working directory goes into `#SBATCH --chdir=` unquoted. Quoting it is no way out: which quotes
    sbatch removes there depends on its version (single quotes only since about 17.11). Nor is a quoted `cd` in the
    script's body instead of --chdir: SLURM opens the job's logs (%x-%j.out, relative) in the working directory
    before the script runs, so without --chdir they would land wherever sbatch was run from, and a requeued job
    would start there too. So a directory whose path sbatch cannot read whole is refused, with the reason."""
    check_sbatch_value(workdir, "the working directory", "the job runs and logs in the directory herd runs in "
                       "(#SBATCH --chdir=): run herd from one whose path has no whitespace, quotes, backslash or #")


# The options herd writes itself (the templates' `#SBATCH` lines), and what sets each. Given again in
# slurm.sbatch_args, an option would win (sbatch takes the later one): another world size than the one the config
# was checked for, no SIGUSR1 before the time limit (progress lost), no requeue, the job and its logs elsewhere.
# Options that ask for the same resources another way (--gres, --gpus, --ntasks, --ntasks-per-gpu...) are
# refused with the one they would override. {sbatch option: (herd's option, what sets it)}
_RANKS = "slurm.nodes, slurm.gpus_per_node and slurm.shape"
_GPUS = ("gpus-per-node", "slurm.gpus_per_node")
_WORKDIR = ("chdir", "the directory herd runs in")
_REQUEUE = ("requeue/--no-requeue", "slurm.requeue")
HERD_OPTIONS = {
    "job-name": ("job-name", "slurm.job_name"), "nodes": ("nodes", "slurm.nodes"),
    **{o: ("ntasks-per-node", _RANKS) for o in ("ntasks", "ntasks-per-node", "ntasks-per-core", "ntasks-per-socket",
                                               "ntasks-per-gpu", "ntasks-per-tres")},
    **{o: _GPUS for o in ("gpus-per-node", "gres", "gpus", "gpus-per-task", "gpus-per-socket", "tres-per-task")},
    "cpus-per-task": ("cpus-per-task", "slurm.cpus_per_task"),
    **{o: (o, f"slurm.{o}") for o in ("partition", "account", "qos", "time")},
    "signal": ("signal", "slurm.signal_seconds"), "requeue": _REQUEUE, "no-requeue": _REQUEUE,
    "chdir": _WORKDIR, "workdir": _WORKDIR,  # (--workdir: its name before SLURM 17.11)
    "output": ("output", "%x-%j.out in the working directory"), "error": ("error", "%x-%j.err there"),
    "open-mode": ("open-mode", "append: a requeued job adds to its logs"),
}
_ADVICE = {_WORKDIR[1]: "run herd in the directory the job should run in instead"}
_SHORT = {"J": "job-name", "N": "nodes", "n": "ntasks", "G": "gpus", "c": "cpus-per-task", "p": "partition",
          "A": "account", "q": "qos", "t": "time", "D": "chdir", "o": "output", "e": "error"}


def _herd_option(arg: str) -> Optional[str]:
    """The key of HERD_OPTIONS that sbatch would read `arg` as, or None. sbatch parses with getopt_long, which takes
    any unambiguous prefix of a long option for it (--sig=USR2@10 is --signal); a prefix of one of these options is
    refused as that option (where it is ambiguous, sbatch would refuse it anyway)."""
    name = arg.split("=", 1)[0]
    if name.startswith("--") and len(name) > 2:
        if name[2:] in HERD_OPTIONS:  # an exact name wins over a longer one it is a prefix of (--gpus)
            return name[2:]
        return next((o for o in HERD_OPTIONS if o.startswith(name[2:])), None)
    return _SHORT.get(name[1:2]) if name.startswith("-") else None


def check_sbatch_args(args: List[str]) -> None:
    """slurm.sbatch_args: each a printable option line sbatch reads as written (no # or backslash, which it takes
    as a comment and an escape), and none that overrides an option herd writes itself (HERD_OPTIONS)."""
    for i, arg in enumerate(args):
        key = f"slurm.sbatch_args[{i}]"
        check_line_text(arg, key, "remove it")
        bad = next((c for c in arg if c in "#\\"), None)
        if bad is not None:
            raise HerdError(f"{key} {arg!r} contains {_describe(bad)}, which sbatch reads as a comment or an escape "
                            f"in an `#SBATCH` line (the option would be cut or changed); remove it")
        option = _herd_option(arg)
        if option is None:
            continue
        ours, source = HERD_OPTIONS[option]
        given = arg.split("=", 1)[0]
        read_as = "" if given == f"--{option}" else f" (sbatch reads {given} as --{option})"
        advice = _ADVICE.get(source, f"set {source} instead" if source.startswith("slurm.") else "remove it")
        raise HerdError(f"{key} {arg!r}{read_as} would override herd's own --{ours} ({source}): sbatch takes the "
                        f"later one; {advice}")


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
    check_line_text(config_path, "config path")  # a line of its own, a comment (ORIGIN); quoted in HERD_TRAIN
    workdir = str(Path(workdir or os.getcwd()).resolve())
    check_workdir(workdir)
    check_sbatch_value(s.job_name or cfg.log.name, "slurm.job_name", "set another")  # (checked by load_config)
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
        "WORKDIR": workdir,
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


def check_script_destination(out: str, config_path: str, flag: str = "--out") -> Path:
    """The sbatch script may replace only an earlier herd script: never the config it is rendered from, nor any
    other file of the user's (R21), nor a path under a file. `flag`: what named the path (--out, or
    slurm.job_name for the default JOB_NAME.sbatch)."""
    from plan.paths import check_name_lengths
    path = Path(out)
    if not out or path.name in ("", ".", ".."):
        raise HerdError(f"{flag} {out!r}: name the script file")
    check_name_lengths(path, flag)  # ENAMETOOLONG from the first stat otherwise
    if path.exists() and Path(config_path).exists() and path.resolve() == Path(config_path).resolve():
        raise HerdError(f"{flag} {out}: that is the config the script is rendered from; choose another path")
    if path.is_dir():
        raise HerdError(f"{flag} {out}: is a directory; name the script file")
    if path.exists() and not path.is_file():  # a FIFO would block the read below, a device never end it
        raise HerdError(f"{flag} {out}: exists and is not a file; choose another path")
    if path.exists() and not is_rendered_script(path, SCRIPT_MARK):
        raise HerdError(f"{flag} {out}: exists and is not a herd sbatch script; choose another path or remove it")
    check_directory(str(path.parent), flag)
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


def write_and_submit(script: str, out: str, submit: bool, command: str = "herd launch") -> int:
    """Writes the script atomically (a reader, or sbatch, never sees half of it) and submits it; `command` names
    the herd command in what is printed."""
    path = Path(out)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, script, mode=0o755)  # (its temporary is exclusive: never a planted file or symlink)
    except OSError as e:  # a full disk, a directory made read-only meanwhile: nothing replaced, one line
        raise HerdError(f"--out {out}: {e.strerror or e}") from None
    print(f"{command}: wrote {path}", flush=True)
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
