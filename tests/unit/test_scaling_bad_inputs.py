"""herd scaling on damaged sweep directories and impossible budgets: each is one line naming the file (and line of a
JSONL file) or the key, never a traceback or a hang. The sweep files are made by hand; nothing is trained."""

import argparse
import json
import os
import re
import threading
from pathlib import Path

import pytest

from engine.errors import HerdError

DEMO_JOB = str(Path(__file__).resolve().parents[2] / "configs/demo.yaml")
DEEP = "[" * 200_000  # beyond the JSON parser's recursion limit: RecursionError, not ValueError


def one_line(error: pytest.ExceptionInfo) -> str:
    text = str(error.value)
    assert "\n" not in text, text
    return text


def test_a_plan_nested_too_deeply_is_one_line_naming_it(tmp_path):
    from scaling.runs import check_same_sweep, write_plan
    (tmp_path / "plan.json").write_text(DEEP)
    plan = {"job": "job.yaml", "overrides": [], "job_config": {}, "runs": []}
    for call in (check_same_sweep, write_plan):
        with pytest.raises(HerdError) as e:
            call(tmp_path, plan)
        assert re.fullmatch(rf"{tmp_path / 'plan.json'}: not a herd scaling plan \(nested too deeply\); .+",
                            one_line(e))
    assert (tmp_path / "plan.json").read_text() == DEEP  # left as it was


def test_a_plan_that_is_a_fifo_is_refused_without_reading_it(tmp_path):
    from scaling.runs import check_same_sweep
    os.mkfifo(tmp_path / "plan.json")
    outcome = []

    def check():  # in a thread: a read of the FIFO would block forever
        try:
            check_same_sweep(tmp_path, {"job": "job.yaml", "overrides": [], "runs": []})
        except HerdError as e:
            outcome.append(str(e))
    thread = threading.Thread(target=check, daemon=True)
    thread.start()
    thread.join(10)
    if thread.is_alive():  # unblock the reader so the test process can end
        with open(tmp_path / "plan.json", "w"):
            pass
        pytest.fail("check_same_sweep blocked reading a FIFO")
    assert outcome and outcome[0].startswith(f"{tmp_path / 'plan.json'}: is a FIFO, not a herd "
                                             f"scaling plan"), outcome


def test_a_lock_file_that_is_a_directory_is_one_line(tmp_path):
    from scaling.runs import holding_lock
    (tmp_path / "scaling.lock").mkdir()
    with pytest.raises(HerdError) as e:
        with holding_lock(tmp_path / "scaling.lock", "working on the sweep"):
            pytest.fail("locked a directory")
    assert one_line(e).startswith(f"{tmp_path / 'scaling.lock'}: is a directory, not a lock file")
    assert (tmp_path / "scaling.lock").is_dir()


def test_slurm_out_that_is_a_fifo_or_directory_is_refused_without_reading_it(tmp_path):
    from scaling.command import _script_path
    os.mkfifo(tmp_path / "fifo.sbatch")
    (tmp_path / "dir.sbatch").mkdir()
    for name in ("fifo.sbatch", "dir.sbatch"):
        outcome = []

        def check():  # in a thread: a read of the FIFO would block forever
            try:
                _script_path(argparse.Namespace(out=str(tmp_path / name)), tmp_path)
            except HerdError as e:
                outcome.append(str(e))
        thread = threading.Thread(target=check, daemon=True)
        thread.start()
        thread.join(10)
        if thread.is_alive():
            with open(tmp_path / name, "w"):
                pass
            pytest.fail(f"--out {name}: blocked reading it")
        assert outcome and outcome[0].startswith(f"--out {tmp_path / name}: exists and is not a herd scaling array "
                                                 f"script"), outcome
    # an earlier array script (its mark on the second line) is still replaced; a user's file is still refused
    (tmp_path / "ours.sbatch").write_text("#!/bin/bash\n# herd sbatch script, scaling array\n")
    assert _script_path(argparse.Namespace(out=str(tmp_path / "ours.sbatch")), tmp_path) == tmp_path / "ours.sbatch"
    (tmp_path / "user.sbatch").write_text("#!/bin/bash\necho mine\n")
    with pytest.raises(HerdError, match="not a herd scaling array script"):
        _script_path(argparse.Namespace(out=str(tmp_path / "user.sbatch")), tmp_path)


def finished_run(sweep: Path, monkeypatch) -> dict:
    """A run whose metrics.jsonl holds its last step's validation loss (its checkpoint taken as complete)."""
    import scaling.runs as runs
    run = {"name": "c1e09-d16", "steps": 5}
    (sweep / "runs" / run["name"]).mkdir(parents=True)
    (sweep / "runs" / run["name"] / "metrics.jsonl").write_text('{"step": 5, "val_loss": 3.5}\n')
    monkeypatch.setattr(runs, "final_checkpoint", lambda sweep, run: sweep)  # not under test
    return run


def test_a_metrics_line_nested_too_deeply_names_the_file_and_line(tmp_path, monkeypatch):
    from scaling.runs import final_val_loss
    run = finished_run(tmp_path, monkeypatch)
    metrics = tmp_path / "runs" / run["name"] / "metrics.jsonl"
    assert final_val_loss(tmp_path, run) == 3.5
    with open(metrics, "a") as f:
        f.write('{"step": 5, "val_l')  # a line cut by a kill: skipped, as before
    assert final_val_loss(tmp_path, run) == 3.5
    with open(metrics, "a") as f:
        f.write("\n" + DEEP + "\n")
    with pytest.raises(HerdError) as e:
        final_val_loss(tmp_path, run)
    assert one_line(e).startswith(f"{metrics}:3: not a metrics record (JSON nested too deeply)")


def test_a_downstream_cache_nested_too_deeply_is_scored_again(tmp_path, monkeypatch):
    """downstream.json is herd's cache of a score: one it cannot parse (cut, or nested too deeply) is scored again
    and rewritten, as before for a cut one."""
    import scaling.downstream as downstream
    monkeypatch.setattr(downstream, "task_fingerprint", lambda questions: "abc")
    monkeypatch.setattr(downstream, "load_final_model", lambda root: None)
    monkeypatch.setattr(downstream, "score_model", lambda model, questions, tokenizer: {"accuracy": 0.5})
    cache = tmp_path / "downstream.json"
    cache.write_text(DEEP)
    assert downstream.score_run(tmp_path, [], None, cache) == {"accuracy": 0.5, "task": "abc"}
    assert json.loads(cache.read_text()) == {"accuracy": 0.5, "task": "abc"}


def test_a_downstream_cache_that_is_a_directory_is_one_line(tmp_path, monkeypatch):
    import scaling.downstream as downstream
    monkeypatch.setattr(downstream, "load_final_model", lambda root: pytest.fail("scored a run it cannot cache"))
    (tmp_path / "downstream.json").mkdir()
    with pytest.raises(HerdError) as e:
        downstream.score_run(tmp_path, [], None, tmp_path / "downstream.json")
    assert one_line(e).startswith(f"{tmp_path / 'downstream.json'}: is a directory, not a downstream score cache")


@pytest.mark.parametrize("name", ["scaling.json", "scaling.md", "isoflop.png"])
def test_a_result_file_that_is_a_directory_is_one_line_before_fitting(tmp_path, name):
    from scaling.report import check_outputs, write_results
    (tmp_path / name).mkdir()
    with pytest.raises(HerdError) as e:
        check_outputs(tmp_path)
    assert one_line(e).startswith(f"{tmp_path / name}: is a directory, not a result file")
    with pytest.raises(HerdError) as e:  # and again when writing (made after the check, say)
        write_results(tmp_path, [], {"budgets": []}, "herd scaling sweep.yaml")
    assert one_line(e).startswith(f"{tmp_path / name}: is a directory, not a result file")
    assert (tmp_path / name).is_dir()


def test_fit_only_refuses_a_result_directory_in_one_line(tmp_path, monkeypatch, capsys):
    """Through the command: exit 2 and one line, before plan.json is written."""
    import scaling.command as command
    from launch.cli import main as herd
    sweep = tmp_path / "runs" / "s"
    sweep.mkdir(parents=True)
    (sweep / "scaling.json").mkdir()
    monkeypatch.setattr(command, "_finished_runs", lambda args, sweep, plan: [])
    from engine.data.tokenizer import train_bpe
    train_bpe(["def f(x):\n    return x + 1\n" * 20], 300, str(tmp_path / "tok.json"))  # the job loads one
    config = tmp_path / "sweep.yaml"
    config.write_text(json.dumps({"name": "s", "run_dir": str(tmp_path / "runs"), "job": DEMO_JOB,
                                  "overrides": ["train.device=cpu", "train.dtype=fp32", "model.vocab_size=300",
                                                f"data.tokenizer.path={tmp_path / 'tok.json'}"],
                                  "budgets": [1e12], "dims": [16, 32, 48], "head_dim": 16, "aspect_ratio": 16,
                                  "kv_group": 1, "min_steps": 1, "targets": [],
                                  "downstream": {"enabled": False}}))
    assert herd(["scaling", str(config), "--fit-only"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"herd: error: {sweep / 'scaling.json'}: is a directory"), err
    assert not (sweep / "plan.json").exists()


def test_a_budget_too_large_for_the_grid_names_the_budget(tmp_path):
    from engine.config import load_config, load_scaling
    from engine.errors import ConfigError
    from scaling.plan import plan_runs
    config = tmp_path / "sweep.yaml"
    config.write_text(json.dumps({"name": "s", "run_dir": str(tmp_path), "job": DEMO_JOB,
                                  "budgets": [1e300, 1e301, 1e302], "dims": [16, 32, 48], "head_dim": 16,
                                  "aspect_ratio": 16, "kv_group": 1}))
    cfg = load_scaling(str(config), [])
    job = load_config(DEMO_JOB, [])
    with pytest.raises(ConfigError) as e:
        plan_runs(cfg, job)
    text = one_line(e)
    assert text.startswith("budgets[0]: 1e+300 FLOPs is too large for the grid") and "64-bit" in text, text
    assert len(text) < 300, text  # no 300-digit step count
