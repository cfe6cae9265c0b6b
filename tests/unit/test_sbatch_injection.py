"""Values herd pastes into an sbatch script (helper H41's hunt, F7 and F8). Before:

- F7: a config file named $'a\\ntouch PWNED1\\n#.yaml' (in the comment naming the config), a working directory named
  $'w\\ntouch PWNED2\\n#' (in `#SBATCH --chdir=`), or a sweep's run_dir holding a newline (`herd scaling --slurm`)
  rendered a script that passed `bash -n` and ran `touch PWNED1` when the job started; the injected line also ended
  sbatch's reading of the `#SBATCH` lines (nodes, signal, requeue, chdir ignored). A working directory with a space
  gave `--chdir=/my dir`, which sbatch reads as /my.
- F8: slurm.sbatch_args=[--nodes=4] (or --ntasks-per-node, --signal, --no-requeue, --chdir, --output, ...) was
  written after herd's own lines, so sbatch used it: another world size than the one checked, no SIGUSR1 before the
  time limit.

Now each is one line `herd: error: ...` naming what carries the value, with exit code 2 and no script written; a
legitimate path with spaces or quotes is shell-quoted in the command lines, parses with `bash -n`, and reaches the
ranks' command line whole when the script runs (with stand-ins for srun and scontrol)."""

import os
import shlex
import subprocess
from pathlib import Path

import pytest

from engine.errors import HerdError
from launch.cli import main
from tests.unit.test_launch_plan_refusals import JOB, RANK_VARIABLES, refused, tokenizer  # noqa: F401 (a fixture)
from tests.unit.test_scaling_runs import corpus, write_sweep  # noqa: F401 (the module fixture)

SLURM = ["launch", "--slurm", "--no-data-check", "--nodes", "1", "--gpus-per-node", "1", "--out", "job.sbatch"]


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """An empty working directory (named by the test) with no launcher's variables in the environment."""
    for key in RANK_VARIABLES:
        monkeypatch.delenv(key, raising=False)

    def enter(name: str = "work") -> Path:
        path = tmp_path / name
        path.mkdir()
        monkeypatch.chdir(path)
        return path
    return enter


def write_job(directory: Path, tokenizer: Path, name: str = "job.yaml") -> Path:
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(JOB.replace("TOKENIZER", str(tokenizer)))
    return path


def nothing_written(directory: Path, *expected: str) -> None:
    """No script (nor its temporary) anywhere under `directory`, only the files the test put there."""
    found = sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())
    assert found == sorted(expected), found


def run_script(script: Path, tmp_path: Path, env=None) -> list:
    """The script as SLURM runs it, with srun and scontrol replaced by recorders: srun's arguments, one per item."""
    bin_dir = tmp_path / "stub-bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "srun").write_text('#!/bin/bash\nprintf "%s\\0" "$@" > "$SRUN_ARGS"\n')
    (bin_dir / "scontrol").write_text('#!/bin/bash\necho node1\n')
    for stub in ("srun", "scontrol"):
        (bin_dir / stub).chmod(0o755)
    args_file = tmp_path / "srun.args"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SRUN_ARGS": str(args_file),
           "SLURM_JOB_ID": "7", "SLURM_JOB_NUM_NODES": "1", "SLURM_JOB_NODELIST": "node1", **(env or {})}
    result = subprocess.run(["bash", str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    return args_file.read_text().split("\0")[:-1]


def bash_parses(script: Path) -> None:
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# ------------------------------------------------------------------------------- F7: herd launch --slurm, paths

@pytest.mark.parametrize("name, what", [
    ("a\ntouch PWNED1\n#.yaml", "a newline"),
    ("a\rb.yaml", "a carriage return"),
    ("a\tb.yaml", "a tab"),
    ("a\x7fb.yaml", "U+007F"),
    ("a\x85b.yaml", "U+0085"),
    ("a\u2028touch PWNED1.yaml", "U+2028"),
    ("a\u2029b.yaml", "U+2029"),
])
def test_config_path_with_a_control_character_is_refused(name, what, workdir, tokenizer, capsys):
    here = workdir()
    write_job(here, tokenizer, name)
    err = refused(main([*SLURM, name]), capsys, f"herd: error: config path {name!r} contains ")
    assert what in err and "rename it" in err
    nothing_written(here, name)


@pytest.mark.parametrize("name, what", [
    ("w\ntouch PWNED2\n#", "a newline"),
    ("w\u2028x", "U+2028"),
    ("my dir", "a space"),
    ("my\tdir", "a tab"),
    ("a#b", "'#'"),
    ("it's", "'''"),
    ('say "x"', "a space"),
    ('say"x"', "'\"'"),
    ("back\\slash", "'\\'"),
])
def test_working_directory_sbatch_cannot_read_whole_is_refused(name, what, workdir, tokenizer, capsys):
    here = workdir(name)
    job = write_job(here.parent, tokenizer)  # the config's own path is harmless
    err = refused(main([*SLURM, str(job)]), capsys, "herd: error: the working directory ")
    assert f"{str(here)!r} contains " in err and what in err and "run herd from one whose path has no whitespace" in err
    nothing_written(here)
    assert not list(here.parent.rglob("PWNED*"))


def test_legitimate_paths_are_quoted_and_reach_the_command_whole(workdir, tokenizer, capsys, tmp_path):
    """Spaces, quotes and shell syntax in the config's path (and an override) are quoted in the command lines: the
    script parses, and srun gets the path and the override as one argument each, with nothing run on the way."""
    here = workdir()
    name = "my configs/it's a \"job\" $(touch PWNED3) #1.yaml"
    job = write_job(here, tokenizer, name)
    override = "log.name=job"
    extra = "slurm.sbatch_args=[--exclusive, '--constraint=h100']"
    assert main([*SLURM, name, override, extra]) == 0, capsys.readouterr().err
    script = here / "job.sbatch"
    text = script.read_text()
    assert shlex.quote(str(job.resolve())) in text
    assert f"# Rendered by `herd launch --slurm` from {name};" in text
    assert f"#SBATCH --chdir={here.resolve()}\n" in text
    assert "#SBATCH --exclusive\n#SBATCH --constraint=h100\n" in text
    bash_parses(script)
    args = run_script(script, tmp_path)
    assert args[args.index("train") + 1:] == [str(job.resolve()), override, extra, "slurm.nodes=1",
                                              "slurm.gpus_per_node=1"]
    assert not list(tmp_path.rglob("PWNED*"))


# ------------------------------------------------------------------------- F8: slurm.sbatch_args and herd's own

@pytest.mark.parametrize("arg, expected", [
    ("--nodes=4", "' would override herd's own --nodes (slurm.nodes): sbatch takes the later one; set slurm.nodes "
                  "instead"),
    ("--nodes", "' would override herd's own --nodes (slurm.nodes)"),
    ("--ntasks-per-node=8", "' would override herd's own --ntasks-per-node (slurm.nodes, slurm.gpus_per_node and "
                            "slurm.shape)"),
    ("--ntasks=16", "' would override herd's own --ntasks-per-node"),
    ("--ntasks-per-gpu=2", "' would override herd's own --ntasks-per-node"),
    ("--gpus-per-node=4", "' would override herd's own --gpus-per-node (slurm.gpus_per_node)"),
    ("--gres=gpu:8", "' would override herd's own --gpus-per-node (slurm.gpus_per_node)"),
    ("--gpus=8", "' would override herd's own --gpus-per-node (slurm.gpus_per_node)"),
    ("--cpus-per-task=4", "set slurm.cpus_per_task instead"),
    ("--job-name=x", "set slurm.job_name instead"),
    ("--partition=gpu", "set slurm.partition instead"),
    ("--account=a", "set slurm.account instead"),
    ("--qos=high", "set slurm.qos instead"),
    ("--time=01:00:00", "set slurm.time instead"),
    ("--signal=USR2@10", "' would override herd's own --signal (slurm.signal_seconds)"),
    ("--sig=USR2@10", "' (sbatch reads --sig as --signal) would override herd's own --signal"),
    ("--no-requeue", "' would override herd's own --requeue/--no-requeue (slurm.requeue)"),
    ("--requeue", "set slurm.requeue instead"),
    ("--chdir=/x", "' would override herd's own --chdir (the directory herd runs in): sbatch takes the later one; "
                   "run herd in the directory the job should run in instead"),
    ("--workdir=/x", "' would override herd's own --chdir"),
    ("--output=x.out", "' would override herd's own --output (%x-%j.out in the working directory): sbatch takes "
                       "the later one; remove it"),
    ("--error=x.err", "' would override herd's own --error"),
    ("--open-mode=truncate", "' would override herd's own --open-mode"),
    ("--out=x.out", "' (sbatch reads --out as --output) would override herd's own --output"),
])
def test_sbatch_args_cannot_override_herds_own_options(arg, expected, workdir, tokenizer, capsys):
    here = workdir()
    write_job(here, tokenizer)
    err = refused(main([*SLURM, "job.yaml", f"slurm.sbatch_args=['{arg}']"]), capsys,
                  f"herd: error: slurm.sbatch_args[0] '{arg}'")
    assert expected in err, err
    nothing_written(here, "job.yaml")


def test_the_refused_sbatch_arg_is_named_by_its_index(workdir, tokenizer, capsys):
    here = workdir()
    write_job(here, tokenizer)
    code = main([*SLURM, "job.yaml", "slurm.sbatch_args=[--exclusive, '--constraint=h100', '--nodes=2']"])
    refused(code, capsys, "herd: error: slurm.sbatch_args[2] '--nodes=2' would override herd's own --nodes")
    nothing_written(here, "job.yaml")


def test_sbatch_arg_with_a_hash_is_refused(workdir, tokenizer, capsys):
    """sbatch takes an unescaped # in an `#SBATCH` line as a comment: --comment=run#3 would be --comment=run."""
    here = workdir()
    write_job(here, tokenizer)
    refused(main([*SLURM, "job.yaml", "slurm.sbatch_args=['--comment=run#3']"]), capsys,
            "herd: error: slurm.sbatch_args[0] '--comment=run#3' contains '#', which sbatch reads as a comment or "
            "an escape")
    nothing_written(here, "job.yaml")


@pytest.mark.parametrize("arg, expected", [
    ("--comment=a\x01b", "contains the non-printable character U+0001"),
    ("--comment=a\\b", "contains '\\'"),
    ("-N4", "would override herd's own --nodes"),
    ("-t", "would override herd's own --time"),
])
def test_sbatch_args_checked_at_render_time(arg, expected):
    """What the config check lets through (a control character, a backslash) or would refuse anyway (a short
    option) is refused by the renderer too."""
    from launch.slurm import check_sbatch_args
    with pytest.raises(HerdError) as caught:
        check_sbatch_args(["--exclusive", arg])
    message = str(caught.value)
    assert message.startswith("slurm.sbatch_args[1] ") and expected in message and "\n" not in message, message


@pytest.mark.parametrize("arg", ["--exclusive", "--constraint=h100", "--mem=0", "--gres-flags=enforce-binding",
                                 "--time-min=01:00:00", "--cpus-per-gpu=8", "--mem-per-gpu=80G", "--nodelist=n1",
                                 "--exclude=n2", "--mail-type=END", "--reservation=r", "--no-kill"])
def test_other_sbatch_args_are_kept(arg, workdir, tokenizer, capsys):
    here = workdir()
    write_job(here, tokenizer)
    assert main([*SLURM, "job.yaml", f"slurm.sbatch_args=['{arg}']"]) == 0, capsys.readouterr().err
    text = (here / "job.sbatch").read_text()
    assert f"\n#SBATCH {arg}\n" in text
    bash_parses(here / "job.sbatch")


# ----------------------------------------------------------------------------- F7: herd scaling --slurm (array)

def test_array_sweep_directory_with_a_newline_is_refused(tmp_path, monkeypatch):
    from scaling.runs import render_array
    monkeypatch.chdir(tmp_path)
    sweep = tmp_path / "r\ntouch PWNED4\n#" / "s"
    with pytest.raises(HerdError) as caught:
        render_array(sweep, ["c1e+09-d16"], {"job_name": "s"})
    message = str(caught.value)
    assert message.startswith(f"the sweep directory (run_dir/name) {str(sweep)!r} contains a newline")
    assert message.endswith("choose another run_dir") and "\n" not in message


@pytest.mark.parametrize("name, what", [("my dir", "a space"), ("w\ntouch PWNED5\n#", "a newline"), ("a#b", "'#'")])
def test_array_working_directory_sbatch_cannot_read_whole_is_refused(name, what, tmp_path, monkeypatch):
    from scaling.runs import render_array
    here = tmp_path / name
    here.mkdir()
    monkeypatch.chdir(here)
    with pytest.raises(HerdError) as caught:
        render_array(tmp_path / "sweep", ["c1e+09-d16"], {"job_name": "s"})
    message = str(caught.value)
    assert message.startswith(f"the working directory {str(here)!r} contains {what}") and "\n" not in message


def test_array_with_a_space_in_the_sweep_directory_runs_its_run(tmp_path, monkeypatch):
    """The sweep directory (and so plan.json's path) may hold spaces and quotes: quoted in the task's command line,
    named in a comment; the task gets the plan's path and its run's name whole."""
    from scaling.runs import render_array
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    sweep = tmp_path / "my runs" / "it's $(touch PWNED6)"
    recorder = tmp_path / "python"
    recorder.write_text('#!/bin/bash\nprintf "%s\\0" "$@" > "$SRUN_ARGS"\n')
    recorder.chmod(0o755)
    script = tmp_path / "array.sbatch"
    script.write_text(render_array(sweep, ["c1e+09-d16", "c1e+09-d32"], {"job_name": "s"}, python=str(recorder)))
    text = script.read_text()
    assert shlex.quote(str((sweep / "plan.json").resolve())) in text and f"#SBATCH --chdir={work}\n" in text
    bash_parses(script)
    args = run_script(script, tmp_path, {"SLURM_ARRAY_TASK_ID": "1"})
    assert args == ["-m", "scaling.task", str((sweep / "plan.json").resolve()), "c1e+09-d32"]
    assert not list(tmp_path.rglob("PWNED*"))


def test_scaling_slurm_refuses_a_run_dir_with_a_newline(corpus, tmp_path, monkeypatch, capsys):  # noqa: F811
    """End to end: `herd scaling --slurm` with run_dir holding a newline writes no array script (plan.json is written
    before the script is rendered: scaling/command.py)."""
    import json
    monkeypatch.chdir(tmp_path)
    config = write_sweep(corpus, "newline")
    spec = json.loads(config.read_text())
    spec["run_dir"] = str(tmp_path / "r\ntouch PWNED7\n#")
    config.write_text(json.dumps(spec))
    capsys.readouterr()
    refused(main(["scaling", str(config), "--slurm"]), capsys,
            "herd: error: the sweep directory (run_dir/name) ")
    assert not list(tmp_path.rglob("*.sbatch")) and not list(tmp_path.rglob("PWNED*"))
