"""R10 through the command a user runs: `herd launch --nproc 2` with one rank hanging before a collective. The
heartbeat timeout (4 s) fires long before the collective timeout (120 s): the job ends by itself with the
watchdog's exit code and one merged report naming the hung rank and the collective its peer waited in."""

import json
import os
import subprocess
import sys

from engine.callbacks.watchdog import HANG_EXIT_CODE
from tests.helpers import STDLIB
from tests.integration.test_cli import ROOT, herd


def test_launch_with_a_hung_rank_ends_with_the_hang_report(tmp_path):
    src = [str(p) for p in sorted((STDLIB / "email").glob("*.py"))]
    assert herd("prepare-data", *src, "--out", str(tmp_path / "e"), "--train-tokenizer", "--tokenizer-path",
                str(tmp_path / "tok.json"), "--vocab-size", "300").returncode == 0
    args = ["launch", "--nproc", "2", "configs/demo.yaml", f"data.train=[{{path: {tmp_path}/e}}]", "data.valid=[]",
            f"data.tokenizer.path={tmp_path}/tok.json", "model.vocab_size=300", "model.n_layers=1", "model.dim=64",
            "model.ffn_dim=128", "data.seq_len=32", "data.micro_batch_size=2", "data.global_batch_size=4",
            "train.steps=6", "schedule.warmup_steps=1", "parallel.tp=2", f"log.run_dir={tmp_path}/runs",
            "log.name=hang", "log.every=1", "log.tensorboard=false", "watchdog.timeout=4",
            "watchdog.collective_timeout=120", "watchdog.heartbeat_every=0.5", "watchdog.dump_wait=15"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HERD_FAULT": "hang:1:3",
           "HERD_FAULT_HANG_S": "900"}
    result = subprocess.run([sys.executable, "-m", "launch", *args], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=600)  # generous: the hang itself must never reach this
    run = tmp_path / "runs" / "hang"
    report = (run / "hang" / "report.txt").read_text()
    headline = report.splitlines()[0]
    print(f"exit code {result.returncode}; report headline: {headline}")
    assert result.returncode == HANG_EXIT_CODE, result.stderr[-3000:]
    assert f"hang report {run / 'hang' / 'report.txt'}" in result.stderr
    assert headline.startswith("HANG: rank 1 never entered ") and headline.endswith("that rank(s) 0 waited in")
    # the collective named is the one rank 0's own dump says it was blocked in, and rank 1 never reached it
    dumps = [json.loads((run / "hang" / f"rank{r}.json").read_text()) for r in (0, 1)]
    waited = dumps[0]["collective"]
    assert f"never entered {waited['op']} #{waited['group_seq']} on group {waited['group']}" in headline
    assert waited["site"] in headline and dumps[1]["collective"] is None
    assert dumps[1]["group_counts"][waited["group"]] == waited["group_seq"] - 1
    assert "innermost frame of the training thread" in report and "_fault_hang" in report
    assert sorted(p.name for p in (run / "heartbeat").iterdir()) == ["rank0.json", "rank1.json"]
    steps = [line.split("|")[0].split()[1] for line in result.stdout.splitlines() if line.startswith("step ")]
    assert steps == ["1/6", "2/6"], result.stdout  # steps 1-2 ran, step 3 never ended
