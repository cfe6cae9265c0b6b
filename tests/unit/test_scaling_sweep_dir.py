"""One sweep directory over time: plan.json is rewritten by every `herd scaling` (a budget added renumbers the
runs), so an array task submitted earlier finds its run by the name written into its script; two `herd scaling`
processes, or two processes training one run, are kept apart by locks; a job YAML edited between invocations is
refused by the job's resolved config, also for runs a later plan left out, unless the edit cannot change results
(log.every) or the keys changed with herd's config schema."""

import fcntl
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from launch.cli import main as herd
from tests.unit.test_scaling_runs import corpus, load_plan, write_sweep  # noqa: F401 (the module fixture)


def names(plan: dict) -> list:
    return [run["name"] for run in plan["runs"]]


def test_array_tasks_keep_their_runs_when_a_budget_is_added(corpus, tmp_path, monkeypatch):  # noqa: F811
    """An array submitted for budgets 3e8 and 1e9; then 6e8 is added (plan.json renumbered: the 1e9 runs move).
    Each task, run from the submitted script, still trains the run it was submitted for."""
    config = write_sweep(corpus, "grown", budgets=(3e8, 1e9))
    script = tmp_path / "array.sbatch"
    assert herd(["scaling", str(config), "--slurm", "--out", str(script)]) == 0
    submitted = names(load_plan(corpus, "grown"))
    config = write_sweep(corpus, "grown", budgets=(3e8, 6e8, 1e9))
    assert herd(["scaling", str(config), "--plan-only"]) == 0
    assert names(load_plan(corpus, "grown"))[3:6] != submitted[3:6]  # the renumbering that used to misdirect
    # the script as SLURM runs it, with a stand-in for python that records the task's arguments
    recorder = tmp_path / "python"
    recorder.write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$ARGS_FILE"\n')
    recorder.chmod(0o755)
    text = script.read_text().replace(shlex.quote(sys.executable), str(recorder), 1)
    (tmp_path / "run.sh").write_text(text)
    trained = []
    monkeypatch.setattr("launch.cli.main", lambda argv: trained.append(argv[argv.index("train") + 1:]) or 0)
    from scaling.task import main as task
    for index, name in enumerate(submitted):
        env = {**os.environ, "SLURM_ARRAY_TASK_ID": str(index), "ARGS_FILE": str(tmp_path / "args")}
        subprocess.run(["bash", str(tmp_path / "run.sh")], env=env, check=True, capture_output=True)
        args = (tmp_path / "args").read_text().splitlines()
        assert args[:2] == ["-m", "scaling.task"]
        assert task(args[2:]) == 0
        assert f"log.name={name}" in trained[-1], (index, name, trained[-1])
    assert len(trained) == len(submitted)


def test_a_second_herd_scaling_on_the_sweep_is_refused(corpus, capsys):  # noqa: F811
    config = write_sweep(corpus, "locked")
    assert herd(["scaling", str(config), "--plan-only"]) == 0
    lock = corpus / "runs" / "locked" / "scaling.lock"
    capsys.readouterr()
    with open(lock, "a") as held:  # another `herd scaling` at work on the sweep
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        for mode in ("--plan-only", "jobs=2"):  # planning (plan.json) as training: nothing is written
            assert herd(["scaling", str(config), mode]) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and f"{lock} is locked" in err[0], err
    assert herd(["scaling", str(config), "--plan-only"]) == 0  # released: the lock dies with its holder


def test_a_run_trained_by_another_process_is_not_trained_twice(corpus, monkeypatch, capsys):  # noqa: F811
    """An array task and a local sweep on one run: the second to come gets one line naming the run's lock."""
    from scaling.task import main as task
    config = write_sweep(corpus, "shared")
    assert herd(["scaling", str(config), "--plan-only"]) == 0
    sweep, name = corpus / "runs" / "shared", names(load_plan(corpus, "shared"))[0]
    monkeypatch.setattr("launch.cli.main", lambda argv: pytest.fail("trained a run another process holds"))
    lock = sweep / "runs" / f"{name}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    capsys.readouterr()
    with open(lock, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert task([str(sweep / "plan.json"), name]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{lock} is locked" in err[0] and f"training run {name}" in err[0], err
    assert task([str(sweep / "plan.json"), "c9e99-d16"]) == 2
    assert "no run c9e99-d16" in capsys.readouterr().err


def job_file(root: Path, grad_clip: float) -> Path:
    """The sweep's job: configs/demo.yaml with one value of the file's own."""
    path = root / "job.yaml"
    path.write_text(f"include: [demo.yaml]\noptim: {{grad_clip: {grad_clip}}}\n")
    return path


def test_an_edited_job_file_is_refused(corpus, capsys):  # noqa: F811
    """Same job path, same overrides, other contents: every finished run would belong to another experiment."""
    root = corpus / "edited"
    root.mkdir()
    config = write_sweep(corpus, "edited", extra={"job": str(job_file(root, 1.0))})
    assert herd(["scaling", str(config), "--plan-only"]) == 0
    assert all(len(run["config_hash"]) == 16 for run in load_plan(corpus, "edited")["runs"])
    job_file(root, 0.5)
    capsys.readouterr()
    assert herd(["scaling", str(config), "--plan-only"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "run c1e09-d16 was planned from a different job config" in err[0], err
    assert "optim.grad_clip changed" in err[0] and str(root / "job.yaml") in err[0], err
    job_file(root, 1.0)  # back as it was: the same sweep again
    assert herd(["scaling", str(config), "--plan-only"]) == 0


def test_runs_left_out_of_a_plan_are_still_checked(corpus, capsys):  # noqa: F811
    """Budget 1e9 left out (its runs kept under "retired" in plan.json), then planned again with another batch size:
    its run directories hold another experiment's results, so that is refused as for a run planned throughout."""
    config = write_sweep(corpus, "shrunk", budgets=(3e8, 1e9))
    assert herd(["scaling", str(config), "--plan-only"]) == 0
    config = write_sweep(corpus, "shrunk", budgets=(3e8,))
    assert herd(["scaling", str(config), "--plan-only"]) == 0
    plan = load_plan(corpus, "shrunk")
    assert names(plan) == ["c3e08-d16", "c3e08-d32", "c3e08-d48"]
    assert [r["name"] for r in plan["retired"]] == ["c1e09-d16", "c1e09-d32", "c1e09-d48"]
    config = write_sweep(corpus, "shrunk", budgets=(3e8, 1e9), extra={"batch_sizes": [4, 8]})
    capsys.readouterr()
    assert herd(["scaling", str(config), "--plan-only"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "planned c1e09-d16 differently" in err[0], err
    assert json.loads((corpus / "runs" / "shrunk" / "plan.json").read_text()) == plan  # nothing written


def test_edits_that_cannot_change_results_and_schema_changes_are_not_refused(corpus, capsys):  # noqa: F811
    """log.every edited in the job file, and a plan.json written by a herd whose config schema had a key this one
    lacks and lacked one this one has (its runs' hashes then all differ): the same sweep. A value that shapes the
    results (optim.grad_clip) is still refused."""
    root = corpus / "benign"
    root.mkdir()
    job = root / "job.yaml"
    job.write_text("include: [demo.yaml]\nlog: {every: 1}\n")
    config = write_sweep(corpus, "benign", extra={"job": str(job)})
    assert herd(["scaling", str(config), "--plan-only"]) == 0
    job.write_text("include: [demo.yaml]\nlog: {every: 5, tensorboard: false}\n")
    assert herd(["scaling", str(config), "--plan-only"]) == 0
    path = corpus / "runs" / "benign" / "plan.json"
    plan = json.loads(path.read_text())
    plan["job_config"]["train.a_key_herd_dropped"] = 3
    del plan["job_config"]["optim.grad_clip"]
    plan["runs"] = [{**run, "config_hash": "0" * 16} for run in plan["runs"]]
    path.write_text(json.dumps(plan))
    assert herd(["scaling", str(config), "--plan-only"]) == 0
    assert all(run["config_hash"] != "0" * 16 for run in load_plan(corpus, "benign")["runs"])  # written anew
    job.write_text("include: [demo.yaml]\nlog: {every: 5}\noptim: {grad_clip: 0.5}\n")
    capsys.readouterr()
    assert herd(["scaling", str(config), "--plan-only"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "was planned from a different job config" in err[0], err
    assert "optim.grad_clip changed" in err[0] and "log.every" not in err[0], err
