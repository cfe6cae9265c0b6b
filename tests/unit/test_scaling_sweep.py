"""`herd scaling` end to end, for real (slow tier): a tiny sweep (2 budgets x 3 widths of 1-3 layer models on the
email package's sources) is stopped by SIGTERM while a run trains, resumes that run from the checkpoint it saved,
finishes, is fitted and plotted, and a second invocation trains nothing; and the same kind of sweep as a SLURM job
array on the test cluster (tests/slurm_cluster.py), fitted afterwards with --fit-only."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from scaling.runs import pending
from tests.slurm_cluster import slurm_cluster, wait_until  # noqa: F401 (the session fixture)
from tests.unit.test_scaling_runs import ROOT, corpus, load_plan, write_sweep  # noqa: F401 (the module fixture)


def scaling(*args, cwd=ROOT) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "launch", "scaling", *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish(process: subprocess.Popen) -> tuple:
    out, err = process.communicate(timeout=1800)  # a hang guard only
    return process.returncode, out, err


@pytest.mark.slow
def test_sweep_stops_resumes_fits_and_is_not_redone(corpus):  # noqa: F811
    config = write_sweep(corpus, "e2e", budgets=(3e9, 1e9))
    # the first run is long enough (1,290 steps) to be caught training: the smallest model of the larger budget
    process = scaling(str(config), "jobs=1")
    sweep = corpus / "runs" / "e2e"
    first = sweep / "runs" / "c3e09-d16" / "metrics.jsonl"
    wait_until(lambda: first.is_file() and len(first.read_text().splitlines()) >= 3 or process.poll() is not None,
               lambda: f"{first} to hold 3 steps")
    process.send_signal(signal.SIGTERM)
    code, out, err = finish(process)
    assert code == 2 and "stopped by signal 15" in err and "resumes on the next invocation" in out, (out, err)
    plan = load_plan(corpus, "e2e")
    assert 0 in pending(sweep, plan)

    code, out, err = finish(scaling(str(config), "jobs=2"))
    assert code == 0, err[-3000:]
    assert "resumed from" in (sweep / "runs" / "c3e09-d16.log").read_text()
    document = json.loads((sweep / "scaling.json").read_text())
    assert len(document["runs"]) == 6 and all(0 < r["val_loss"] < 7 for r in document["runs"])
    for run in document["runs"]:
        assert 0 <= run["downstream"]["accuracy"] <= 1 and run["downstream"]["nll_correct"] > 0
    assert [b["budget"] for b in document["budgets"]] == [1e9, 3e9]
    assert all(("parabola" in b) != ("error" in b) for b in document["budgets"])
    assert (sweep / "isoflop.png").read_bytes()[:4] == b"\x89PNG"

    mtimes = {p: p.stat().st_mtime_ns for p in (sweep / "runs").glob("*/metrics.jsonl")}
    code, out, err = finish(scaling(str(config)))
    assert code == 0 and "6 finished already, 0 to train" in out, (out, err)
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes


@pytest.mark.slow
def test_sweep_as_a_slurm_array(slurm_cluster, corpus, tmp_path):  # noqa: F811
    config = write_sweep(corpus, "array", budgets=(3e8,))
    script = tmp_path / "array.sbatch"
    code, out, err = finish(scaling(str(config), "--slurm", "--out", str(script), cwd=tmp_path))
    assert code == 0, err
    text = script.read_text()
    assert "#SBATCH --array=0-2" in text and "#SBATCH --signal=B:USR1@300" in text and "scaling.task" in text
    job = int(slurm_cluster.run("sbatch", "--parsable", str(script)).stdout.strip().split(";")[0])
    sweep, plan = corpus / "runs" / "array", load_plan(corpus, "array")
    wait_until(lambda: not slurm_cluster.run("squeue", "-h", "-j", str(job)).stdout.strip(),
               lambda: f"array job {job} to leave the queue")
    logs = "".join(p.read_text() for p in tmp_path.glob("array-*"))
    assert pending(sweep, plan) == [], logs[-3000:]
    assert logs.count("herd scaling: array task") == 3
    code, out, err = finish(scaling(str(config), "--fit-only"))
    assert code == 0 and (sweep / "scaling.json").is_file(), err
    code, out, err = finish(scaling(str(config), "--slurm", "--out", str(script), cwd=tmp_path))
    assert code == 0 and "every run is finished" in out
