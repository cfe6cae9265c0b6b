"""`make scaling-demo`'s summary (scaling/demo.py) counts the runs its own invocation trained: after a budget is
added to a finished sweep, that is the new budget's runs, not the old plan.json's (finished, so empty) pending
list. The sweep itself is stood in for: what is under test is the count, not the training."""

import json
import sys
from pathlib import Path

import scaling.demo as demo
import scaling.runs as runs
from engine.config import load_scaling
from scaling.plan import load_job, plan_runs

ROOT = Path(__file__).resolve().parents[2]
THREE_BUDGETS = ["budgets=[3e11,1e12,3e12]", "batch_sizes=[8,16,32]"]  # the demo's first invocation


def test_runs_trained_counts_what_this_invocation_trained(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the demo's config and job are relative to the repository
    run_dir = [f"run_dir={tmp_path}"]
    old = load_scaling(demo.CONFIG, run_dir + THREE_BUDGETS)
    old_runs = [r.as_dict() for r in plan_runs(old, load_job(old))]
    sweep = tmp_path / "scaling-demo"
    sweep.mkdir()
    (sweep / "plan.json").write_text(json.dumps({"job": old.job, "overrides": list(old.overrides), "runs": old_runs}))
    finished = {r["name"] for r in old_runs}  # the earlier invocation trained all of its runs
    monkeypatch.setattr(runs, "final_val_loss", lambda sweep, run: 3.0 if run["name"] in finished else None)

    def sweep_command(argv):  # `herd scaling` of the demo's four budgets: trains what is not finished, writes results
        assert argv[:2] == ["scaling", demo.CONFIG]
        cfg = load_scaling(demo.CONFIG, argv[2:])
        finished.update(r.name for r in plan_runs(cfg, load_job(cfg)))
        (sweep / "scaling.json").write_text("{}\n")
        (sweep / "scaling.md").write_text("# IsoFLOP sweep\n")
        return 0
    monkeypatch.setattr(demo, "herd", sweep_command)
    monkeypatch.setattr(demo, "prepare_corpus", lambda: 0)
    monkeypatch.setattr(demo, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(sys, "argv", ["scaling.demo", *run_dir])
    assert demo.main() == 0
    new = load_scaling(demo.CONFIG, run_dir)
    added = len(plan_runs(new, load_job(new))) - len(old_runs)
    assert added == 4  # the 2e12 budget's sizes
    measured = json.loads((tmp_path / "results" / "scaling_demo.json").read_text())["measured"]
    assert measured["runs_trained"] == added
    assert f"{added} runs trained in this invocation" in (tmp_path / "results" / "scaling_demo.md").read_text()
