"""herd scaling against the bad inputs of /tmp/hunt/H43.md: run directories without a plan that planned them, a job
whose runs could never finish (a shared checkpoint.dir, no data.valid), sweep overrides the runs set again,
downstream mistakes found only after training, damaged score caches, final losses that are no loss, runs the guards
stopped for a non-finite loss, benign override edits, and small message slips. Each is one line naming the key or
file, found before anything trains, and leaves the sweep's files as they were."""

import argparse
import json
import math
from pathlib import Path

import pytest

from engine.config import ScalingConfig
from engine.errors import ConfigError, HerdError
from launch.cli import main as herd
from tests.unit.test_scaling_runs import corpus, write_sweep  # noqa: F401 (the module fixture)
from tests.unit.test_scaling_fit import law_runs

ROOT = Path(__file__).resolve().parents[2]
GUARD_LINE = ("herd: error: guards: 6 steps in a row skipped, the last at step 7 (non-finite loss or gradients); "
              "stopping (guards.max_consecutive_skips=5)\n")


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def sweep_with(root: Path, name: str, more=(), **extra) -> Path:
    """write_sweep's sweep with `more` appended to its job overrides."""
    path = write_sweep(root, name, extra=extra)
    doc = json.loads(path.read_text())
    doc["overrides"] += list(more)
    path.write_text(json.dumps(doc))
    return path


def no_training(monkeypatch) -> None:
    import scaling.runs as runs

    def refuse(*args, **kwargs):
        raise AssertionError("a run was trained")
    monkeypatch.setattr(runs, "run_local", refuse)


def files(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------ 1. run directories that no plan.json planned

@pytest.mark.parametrize("plan_text", [None, json.dumps({"job": "job.yaml", "overrides": [], "runs": []})])
def test_run_directories_that_no_plan_planned_are_refused(tmp_path, plan_text):
    """plan.json removed (or planning no runs) while runs/ holds the runs of a sweep: their settings are unknown,
    so they are never counted finished or resumed with this plan's settings."""
    from scaling.runs import check_same_sweep
    (tmp_path / "runs" / "c1e09-d16" / "checkpoints").mkdir(parents=True)
    (tmp_path / "runs" / "c1e09-d16" / "config.yaml").write_text("optim: {lr: 0.001}\n")
    if plan_text is not None:
        (tmp_path / "plan.json").write_text(plan_text)
    before = files(tmp_path)
    plan = {"job": "job.yaml", "overrides": [], "job_config": {},
            "runs": [{"name": "c1e09-d16", "overrides": []}, {"name": "c1e09-d32", "overrides": []}]}
    with pytest.raises(HerdError) as e:
        check_same_sweep(tmp_path, plan)
    line = one_line(str(e.value))
    assert line.startswith(f"{tmp_path}: runs/c1e09-d16 holds a run, but ") and "restore plan.json" in line, line
    assert f"remove {tmp_path / 'runs'}" in line
    assert files(tmp_path) == before
    check_same_sweep(tmp_path, {**plan, "runs": plan["runs"][1:]})  # a run with no directory yet: fine


# ------------------------------------------------------------------ 7. a job whose runs could never finish

@pytest.mark.parametrize("override,key", [("checkpoint.dir=ckshared", "checkpoint.dir"),
                                          ("data.valid=[]", "data.valid")])
def test_a_job_whose_runs_cannot_finish_is_refused_before_training(corpus, monkeypatch, capsys, override, key):
    no_training(monkeypatch)
    config = sweep_with(corpus, f"never-{key.replace('.', '-')}", [override])
    assert herd(["scaling", str(config)]) == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith(f"herd: error: {key}: "), line
    assert not (corpus / "runs" / f"never-{key.replace('.', '-')}").exists()


def test_a_run_that_ends_well_without_a_final_loss_is_not_told_to_retry(tmp_path, capsys):
    from scaling.runs import _report
    run = {"name": "c1e09-d16", "steps": 5, "params": 1000, "tokens": 640}
    assert _report(tmp_path, run, 0, 2.0, str(tmp_path / "c1e09-d16.log")) == 1
    out = capsys.readouterr().out
    assert "without the validation loss of its last step 5" in out and "FAILED (exit 0)" not in out, out


# ------------------------------------------------------------------ 5. sweep overrides of keys each run sets

def scaling_cfg(**changes) -> ScalingConfig:
    values = dict(job=str(ROOT / "configs/demo.yaml"), budgets=[1e12, 4e12], dims=[64, 128, 192], head_dim=16,
                  aspect_ratio=32, batch_sizes=[8, 16], min_steps=10)
    return ScalingConfig(**{**values, **changes})


@pytest.mark.parametrize("override,expected", [
    ("optim.weight_decay=0.0", "set the sweep's weight_decay instead"),
    ("schedule.kind=linear", "the sweep fixes it"),
    ("schedule.warmup_steps=5", "warmup_fraction and warmup_steps"),
    ("train.steps=7", "set the sweep's budgets instead"),
    ("checkpoint.every=2", "the sweep fixes it"),
    ("train.eval_every=3", "the sweep fixes it"),
    ("train.eval_batches=3", "eval_batches"),
    ("model.dim=64", "dims"),
    ("log.name=mine", "set the sweep's name instead"),
    ("log.run_dir=elsewhere", "run_dir"),
    ("data.global_batch_size=8", "batch_sizes"),  # the sweep gives batch_sizes
    ("schedule={kind: linear}", "schedule.kind"),  # a whole section holds a key the runs set
])
def test_overrides_of_keys_each_run_sets_are_refused(override, expected):
    from scaling.plan import check_overrides
    cfg = scaling_cfg(overrides=["log.every=5", override])
    with pytest.raises(ConfigError) as e:
        check_overrides(cfg)
    line = one_line(str(e.value))
    assert line.startswith(f"overrides[1]: '{override}': every run of the sweep sets ") and expected in line, line


def test_overrides_the_plan_reads_from_the_job_are_allowed():
    from scaling.plan import check_overrides
    check_overrides(scaling_cfg(batch_sizes=[], overrides=["data.global_batch_size=8", "optim.lr=0.01",
                                                           "log.every=5", "model.vocab_size=512"]))


def test_the_refused_keys_are_those_each_run_sets():
    from scaling.plan import RUN_KEYS, load_job, plan_runs
    cfg = scaling_cfg()
    run = plan_runs(cfg, load_job(cfg))[0]
    assert {item.split("=", 1)[0] for item in run.overrides(cfg)} == set(RUN_KEYS)


def test_an_override_the_runs_set_is_refused_on_the_command_line(corpus, capsys):
    config = write_sweep(corpus, "owned")
    assert herd(["scaling", str(config), "--plan-only", "overrides=[optim.weight_decay=0.0]"]) == 2
    assert "optim.weight_decay" in one_line(capsys.readouterr().err)
    assert not (corpus / "runs" / "owned").exists()


# ------------------------------------------------------------------ 8. downstream mistakes before training

@pytest.mark.parametrize("change,key", [("downstream.items=100000", "downstream.items"),
                                        ("downstream.min_line_chars=100000", "downstream.items")])
def test_downstream_mistakes_are_found_before_any_run_trains(corpus, monkeypatch, capsys, change, key):
    no_training(monkeypatch)
    config = write_sweep(corpus, "late-task")
    assert herd(["scaling", str(config), change]) == 2
    assert one_line(capsys.readouterr().err).startswith(f"herd: error: {key}: "), key


# ------------------------------------------------------------------ 10, 11. damaged downstream caches

@pytest.mark.parametrize("cache", [
    {"task": "abc"}, {"task": "abc", "nll_correct": 1.0, "accuracy": "high", "items": 1, "choices": 2},
    {"task": "abc", "nll_correct": 1.0, "accuracy": float("nan"), "items": 1, "choices": 2},
    {"task": "abc", "nll_correct": 1.0, "accuracy": 5, "items": 1, "choices": 2},
    {"task": "abc", "nll_correct": -1.0, "accuracy": 0.5, "items": 1, "choices": 2},
    {"task": "abc", "nll_correct": 1.0, "accuracy": 0.5, "items": True, "choices": 2},
    {"task": "abc", "nll_correct": 1.0, "accuracy": 0.5, "items": 7, "choices": 2},
])
def test_a_cache_that_is_no_score_of_these_questions_is_scored_again(tmp_path, monkeypatch, cache):
    import scaling.downstream as downstream
    score = {"nll_correct": 1.25, "accuracy": 1.0, "items": 1, "choices": 2}
    monkeypatch.setattr(downstream, "task_fingerprint", lambda questions: "abc")
    monkeypatch.setattr(downstream, "load_final_model", lambda root: None)
    monkeypatch.setattr(downstream, "score_model", lambda model, questions, tokenizer: dict(score))
    path = tmp_path / "downstream.json"
    path.write_text(json.dumps(cache))
    questions = [downstream.Question([1, 2], ["a\n", "b\n"], 0)]
    assert downstream.score_run(tmp_path, questions, None, path) == {**score, "task": "abc"}
    assert json.loads(path.read_text()) == {**score, "task": "abc"}
    path.write_text(json.dumps({**score, "task": "abc", "accuracy": 0.0}))  # a valid cache is used as it is
    assert downstream.score_run(tmp_path, questions, None, path)["accuracy"] == 0.0


# ------------------------------------------------------------------ 12. final losses that are no loss

def finished(tmp_path: Path, monkeypatch, loss: str) -> dict:
    import scaling.runs as runs
    run = {"name": "c1e09-d16", "steps": 5}
    (tmp_path / "runs" / run["name"]).mkdir(parents=True)
    (tmp_path / "runs" / run["name"] / "metrics.jsonl").write_text(f'{{"step": 5, "val_loss": {loss}}}\n')
    monkeypatch.setattr(runs, "final_checkpoint", lambda sweep, run: sweep)  # complete: not under test
    return run


@pytest.mark.parametrize("loss", ["true", "false", "-3", "0", '"5.1"', "null"])
def test_a_final_loss_that_is_no_loss_is_not_finished(tmp_path, monkeypatch, loss):
    from scaling.runs import final_val_loss
    assert final_val_loss(tmp_path, finished(tmp_path, monkeypatch, loss)) is None


def test_a_positive_or_non_finite_loss_is_read(tmp_path, monkeypatch):
    from scaling.runs import final_val_loss
    run = finished(tmp_path, monkeypatch, "4")
    assert final_val_loss(tmp_path, run) == 4.0
    (tmp_path / "runs" / run["name"] / "metrics.jsonl").write_text('{"step": 5, "val_loss": NaN}\n')
    assert math.isnan(final_val_loss(tmp_path, run))


def test_an_absurd_loss_gives_no_parabola_and_never_a_nan_law():
    from scaling.report import fit_sweep
    runs = [run for i, run in enumerate(law_runs()) if i % 5 in (0, 2, 4)]  # 3 sizes per budget
    runs[3]["val_loss"] = 1e308  # the middle budget's smallest model: the parabola overflowed to a nan vertex
    fits = fit_sweep(runs, [1e21])
    assert "error" in fits["budgets"][1] and math.isfinite(fits["power_law"]["alpha"])


def test_a_non_finite_power_law_is_one_line(monkeypatch):
    import scaling.report as report
    from scaling.fit import PowerLaw
    nan = float("nan")
    monkeypatch.setattr(report, "fit_power_law", lambda c, d: PowerLaw(nan, nan, nan, nan, [[nan] * 2] * 2, 3))
    with pytest.raises(HerdError) as e:
        report.fit_sweep(law_runs(), [])
    assert one_line(str(e.value)).startswith("the power law D*(C) = A C^alpha over the budgets' optima gave alpha")


# ------------------------------------------------------------------ 18. runs the guards stopped for a nan loss

def test_a_run_the_guards_stopped_for_a_non_finite_loss_is_diverged(tmp_path, capsys):
    import scaling.runs as runs
    from scaling.command import _finished_runs
    plan = {"runs": [{"name": f"c1e09-d{dim}", "steps": 5, "params": 1000, "tokens": 640} for dim in (16, 32)]}
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "c1e09-d16.log").write_text("herd scaling: c1e09-d16: N=1,000\n" + GUARD_LINE)
    (tmp_path / "runs" / "c1e09-d32.log").write_text("herd: error: guards: loss spike (9 > 5 x 1); stopping\n")
    assert runs.pending(tmp_path, plan) == [1]  # the spike is not a divergence: trained again
    with pytest.raises(HerdError) as e:
        _finished_runs(argparse.Namespace(config="sweep.yaml"), tmp_path, plan)
    assert one_line(str(e.value)).startswith("1 run(s) diverged (final validation loss not finite: c1e09-d16 "
                                             "(herd's guards stopped it))")
    assert runs._report(tmp_path, plan["runs"][0], 2, 2.0, str(tmp_path / "runs" / "c1e09-d16.log")) == 1
    assert "c1e09-d16: FAILED: it diverged (herd's guards stopped it" in capsys.readouterr().out


# ------------------------------------------------------------------ 13. override edits that cannot change results

def test_benign_override_edits_are_the_same_sweep_and_a_real_one_is_named(corpus, capsys):
    config = sweep_with(corpus, "benign-overrides")
    assert herd(["scaling", str(config), "--plan-only"]) == 0
    doc = json.loads(config.read_text())
    overrides = doc["overrides"]
    for edited in ([*reversed(overrides), "log.every=7"], [*overrides, "optim.lr=2.0e-3"]):  # the job's own lr
        config.write_text(json.dumps({**doc, "overrides": edited}))
        assert herd(["scaling", str(config), "--plan-only"]) == 0
    config.write_text(json.dumps({**doc, "overrides": [*overrides, "optim.grad_clip=0.5"]}))
    capsys.readouterr()
    assert herd(["scaling", str(config), "--plan-only"]) == 2
    line = one_line(capsys.readouterr().err)
    assert "(the sweep's overrides: optim.grad_clip changed)" in line, line


# ------------------------------------------------------------------ 19. small slips

def test_slurm_says_herd_scaling_wrote_the_script(corpus, tmp_path, capsys):
    config = write_sweep(corpus, "slurm-name")
    assert herd(["scaling", str(config), "--slurm", "--out", str(tmp_path / "a.sbatch")]) == 0
    out = capsys.readouterr().out
    assert f"herd scaling: wrote {tmp_path / 'a.sbatch'}" in out and "herd launch" not in out, out


def test_a_target_listed_twice_is_refused():
    from scaling.plan import check_scaling
    with pytest.raises(ConfigError) as e:
        check_scaling(scaling_cfg(targets=[1e20, 1e20]))
    assert one_line(str(e.value)) == "targets: a target is listed twice"
