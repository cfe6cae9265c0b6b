"""herd scaling's runs and results: a finished run is detected and never trained again, an unfinished one is
pending; the SLURM array covers the unfinished runs only; a sweep directory refuses a different sweep; the report
of a sweep recovers the law its losses came from. The whole command end to end (a tiny sweep trained for real,
resumed, fitted and plotted) and its SLURM array on the test cluster are in the slow tier."""

import json
from pathlib import Path

import numpy as np
import pytest

from launch.cli import main as herd
from scaling.runs import _ranges, final_val_loss, pending, render_array
from tests.helpers import STDLIB

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The email package's sources as a tiny corpus with a held-out split and a 512-token BPE."""
    root = tmp_path_factory.mktemp("scaling")
    src = [str(p) for p in sorted((STDLIB / "email").glob("*.py"))]
    assert herd(["prepare-data", *src, "--out", str(root / "e"), "--train-tokenizer", "--tokenizer-path",
                 str(root / "tok.json"), "--vocab-size", "512", "--valid-fraction", "0.25"]) == 0
    return root


def write_sweep(root: Path, name: str, budgets=(3e8, 1e9), extra=()) -> Path:
    """A sweep of 1-3 layer models (dims 16, 32, 48) on the tiny corpus: a few to a hundred steps per run."""
    job_overrides = [f"data.train=[{{path: {root}/e.train}}]", f"data.valid=[{{path: {root}/e.valid}}]",
                     f"data.tokenizer.path={root}/tok.json", "model.vocab_size=512", "data.seq_len=32",
                     "data.micro_batch_size=4", "train.device=cpu", "train.dtype=fp32", "log.tensorboard=false",
                     "log.every=1000"]
    path = root / f"{name}.yaml"
    path.write_text(json.dumps({
        "name": name, "run_dir": str(root / "runs"), "job": str(ROOT / "configs/demo.yaml"),
        "overrides": job_overrides, "budgets": list(budgets), "batch_sizes": [4] * len(budgets), "dims": [16, 32, 48],
        "head_dim": 8, "aspect_ratio": 16, "min_steps": 3, "eval_batches": 2,
        "downstream": {"items": 12, "choices": 4, "context_tokens": 24, "min_line_chars": 12}, **dict(extra)}))
    return path


def load_plan(root: Path, name: str) -> dict:
    return json.loads((root / "runs" / name / "plan.json").read_text())


def test_finished_run_is_not_trained_again(corpus, capsys):
    from scaling.task import main as task
    config = write_sweep(corpus, "resume")
    assert herd(["scaling", str(config), "--plan-only"]) == 0
    plan, sweep = load_plan(corpus, "resume"), corpus / "runs" / "resume"
    assert pending(sweep, plan) == list(range(len(plan["runs"])))
    last = len(plan["runs"]) - 1  # the largest model of the largest budget: a few steps
    name = plan["runs"][last]["name"]
    assert task([str(sweep / "plan.json"), name]) == 0
    loss = final_val_loss(sweep, plan["runs"][last])
    assert loss is not None and 0 < loss < 7  # trained: below ln(512) = 6.24 plus noise of a fresh model
    assert last not in pending(sweep, plan)
    metrics = sweep / "runs" / plan["runs"][last]["name"] / "metrics.jsonl"
    before = metrics.read_bytes()
    capsys.readouterr()
    assert task([str(sweep / "plan.json"), name]) == 0
    assert "is finished" in capsys.readouterr().out and metrics.read_bytes() == before
    # the array over the unfinished runs leaves the finished one out: one task per unfinished run, named in the script
    unfinished = [plan["runs"][i]["name"] for i in pending(sweep, plan)]
    script = render_array(sweep, unfinished, {"job_name": "resume"})
    assert f"#SBATCH --array=0-{len(plan['runs']) - 2}\n" in script
    assert f"RUNS=({' '.join(unfinished)})" in script and name not in script
    # a run whose final checkpoint is gone is not finished (the downstream task needs it)
    checkpoints = sweep / "runs" / plan["runs"][last]["name"] / "checkpoints"
    from engine.checkpoint.store import MARKER
    for marker in checkpoints.glob(f"step_*/{MARKER}"):
        marker.unlink()  # the checkpoint is no longer complete
    assert final_val_loss(sweep, plan["runs"][last]) is None and last in pending(sweep, plan)


def test_ranges_syntax():
    assert _ranges([0, 1, 2, 3, 5, 7, 8]) == "0-3,5,7-8"
    assert _ranges([4]) == "4"


def test_a_different_sweep_in_the_same_directory_is_refused(corpus, capsys):
    config = write_sweep(corpus, "same")
    assert herd(["scaling", str(config), "--plan-only"]) == 0
    capsys.readouterr()
    assert herd(["scaling", str(config), "--plan-only", "min_lr_ratio=0.2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "planned c1e09-d16 differently" in err[0], err


def test_fit_only_before_the_runs_finish_is_one_line(corpus, capsys):
    config = write_sweep(corpus, "early")
    assert herd(["scaling", str(config), "--fit-only"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "6 of 6 runs are not finished" in err[0], err


def test_report_recovers_the_law_of_its_runs(tmp_path):
    """fit_sweep + write_results on runs whose losses follow Chinchilla's law exactly (tests/unit/test_scaling_fit.py):
    the JSON holds alpha = 0.548 and the budgets' optima; the plots are PNG files."""
    from scaling.report import fit_sweep, write_results
    from tests.unit.test_scaling_fit import ALPHA, K, law
    runs = []
    for budget in (1e18, 1e19, 1e20):
        n_opt = budget / (6 * K * budget ** ALPHA)
        for i, n in enumerate(n_opt * 10 ** np.linspace(-0.5, 0.5, 7)):
            runs.append({"name": f"c{budget:.0e}-{i}", "budget": budget, "params": float(n), "dim": 64,
                         "n_layers": 2, "tokens": budget / (6 * n), "steps": 10,
                         "val_loss": float(law(n, budget / (6 * n))),
                         "downstream": {"nll_correct": 3.0 - 0.1 * np.log10(budget) + 0.01 * i,
                                        "accuracy": min(1.0, 0.25 + 0.1 * np.log10(budget / 1e17) - 0.01 * i),
                                        "choices": 4}})
    fits = fit_sweep(runs, [3.8e25])
    paths = write_results(tmp_path, runs, fits, "test")
    document = json.loads((tmp_path / "scaling.json").read_text())
    assert document["power_law"]["alpha"] == pytest.approx(ALPHA, abs=0.01)
    assert [b["tokens_opt"] for b in document["budgets"]] == pytest.approx(
        [K * c ** ALPHA for c in (1e18, 1e19, 1e20)], rel=0.03)
    assert document["predictions"][0]["params"] == pytest.approx(3.8e25 / (6 * K * 3.8e25 ** ALPHA), rel=0.3)
    assert {p.name for p in paths} >= {"isoflop.png", "power_law.png", "downstream.png", "scaling.md"}
    for png in tmp_path.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "alpha = 0.54" in (tmp_path / "scaling.md").read_text()


def test_minima_beyond_the_grid_are_flagged_and_fitted_without(tmp_path):
    """A budget whose sizes all lie above its optimum has its vertex extrapolated: the main fit counts it and says
    so; the interior-only fit (here 3 budgets of exact Chinchilla losses) recovers alpha."""
    from scaling.report import fit_sweep
    from tests.unit.test_scaling_fit import ALPHA, K, law
    runs = []
    for budget, shift in ((1e18, 0.0), (1e19, 0.0), (1e20, 0.0), (1e21, 0.9)):  # the last: 0.4 to 1.4 decades above
        n_opt = budget / (6 * K * budget ** ALPHA)
        for n in n_opt * 10 ** (np.linspace(-0.5, 0.5, 7) + shift):
            runs.append({"name": f"r{len(runs)}", "budget": budget, "params": float(n),
                         "val_loss": float(law(n, budget / (6 * n)))})
    fits = fit_sweep(runs, [])
    assert [b["parabola"]["interior"] for b in fits["budgets"]] == [True, True, True, False]
    assert fits["power_law"]["extrapolated_minima"] == 1 and fits["power_law"]["budgets_fitted"] == 4
    only = fits["power_law_interior_only"]
    assert only["budgets_fitted"] == 3 and only["alpha"] == pytest.approx(ALPHA, abs=0.01)


def test_a_stop_signal_while_a_run_starts_reaches_that_run(tmp_path, monkeypatch):
    """A SIGTERM that lands after _train_one checked `stopped` but before it registered the new process (here: the
    handler runs while the process starts) must still stop that run, exactly once."""
    import signal
    import scaling.runs as runs
    children = runs._Children()

    class Process:  # the run's process: its exit code says whether it was told to stop
        def __init__(self, *args, **kwargs):
            self.signals = []
            signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)  # the signal arrives now

        def send_signal(self, signum):
            self.signals.append(signum)

        def wait(self):
            return -self.signals[0] if self.signals else 0

    started = []
    monkeypatch.setattr(runs.subprocess, "Popen", lambda *a, **k: started.append(Process()) or started[-1])
    with children.forwarding_signals():
        code, _, _ = runs._train_one(tmp_path, "c1e09-d16", "1", children)
    assert children.stopped == signal.SIGTERM and started[0].signals == [signal.SIGTERM]
    assert code == -signal.SIGTERM


def test_a_diverged_run_is_a_failed_run_and_never_fitted(tmp_path, monkeypatch, capsys):
    """A final validation loss of nan: the run is over (not pending: training it again gives the same), reported
    as FAILED, and the fit refuses the sweep with one line naming it."""
    import argparse
    import math
    import scaling.runs as runs
    from engine.errors import HerdError
    from scaling.command import _finished_runs
    plan = {"runs": [{"name": f"c1e09-d{dim}", "steps": 5, "params": 1000, "tokens": 640} for dim in (16, 32)]}
    for run, loss in zip(plan["runs"], ("NaN", "3.5")):
        (tmp_path / "runs" / run["name"]).mkdir(parents=True)
        (tmp_path / "runs" / run["name"] / "metrics.jsonl").write_text(f'{{"step": 5, "val_loss": {loss}}}\n')
    monkeypatch.setattr(runs, "final_checkpoint", lambda sweep, run: sweep)  # complete checkpoints: not under test
    assert math.isnan(final_val_loss(tmp_path, plan["runs"][0])) and pending(tmp_path, plan) == []
    with pytest.raises(HerdError, match=r"^1 run\(s\) diverged \(final validation loss not finite: c1e09-d16 "
                                        r"\(nan\)"):
        _finished_runs(argparse.Namespace(config="sweep.yaml"), tmp_path, plan)
    assert runs._report(tmp_path, plan["runs"][0], 0, 2.0, "c1e09-d16.log") == 1
    assert "c1e09-d16: FAILED: it diverged" in capsys.readouterr().out
    assert runs._report(tmp_path, plan["runs"][1], 0, 2.0, "c1e09-d32.log") == 0


def test_results_are_strict_json(tmp_path):
    """scaling.json never holds a bare NaN (not JSON): a two-budget power law has no standard error, written as
    null; a budget with a diverged run's loss gets no parabola instead of a nan one."""
    from scaling.report import fit_sweep, write_results
    from tests.unit.test_scaling_fit import ALPHA, K, law_runs
    runs = law_runs()
    runs[7]["val_loss"] = float("nan")  # the middle budget
    fits = fit_sweep(runs, [1e21])
    write_results(tmp_path, runs, fits, "test")

    def refuse(constant):
        raise AssertionError(f"scaling.json holds {constant}")
    document = json.loads((tmp_path / "scaling.json").read_text(), parse_constant=refuse)
    assert "not finite" in document["budgets"][1]["error"] and document["runs"][7]["val_loss"] is None
    assert document["power_law"]["budgets_fitted"] == 2 and document["power_law"]["alpha_stderr"] is None
    assert document["predictions"][0]["tokens_95"] == [None, None]
    assert document["power_law"]["alpha"] == pytest.approx(ALPHA, abs=0.01)
