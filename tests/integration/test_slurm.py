"""herd's own sbatch scripts (`herd launch --slurm`) on a real one-node SLURM cluster (tests/slurm_cluster.py):
a 2-rank CPU gloo job completes with the losses of the same run started by `herd launch --nproc 2`, and a job
that gets SIGUSR1 mid-run saves, exits 75, is requeued by its script, resumes and ends with the same per-step
losses as the uninterrupted run. Only the slurm.conf side (slurmctld, slurmd, munge) is test scaffolding; the
scripts are rendered by the command users run."""

import json
import re
import time
from pathlib import Path

import pytest

from tests.helpers import STDLIB
from tests.integration.test_cli import ROOT, assert_one_line_error, herd
from tests.slurm_cluster import slurm_cluster, wait_until  # noqa: F401 (the session fixture)

STEPS = 12
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
         "PREEMPTED")  # the job states that end a job


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A real corpus and its BPE in a temporary directory, and the overrides that point configs/demo.yaml at them
    (the demo's own data/ files are not there on a fresh clone, and herd launch reads the data before rendering)."""
    root = tmp_path_factory.mktemp("slurm")
    src = [str(p) for p in sorted((STDLIB / "email").glob("*.py"))]
    prep = herd("prepare-data", *src, "--out", str(root / "e"), "--train-tokenizer", "--tokenizer-path",
                str(root / "tok.json"), "--vocab-size", "512")
    assert prep.returncode == 0, prep.stderr
    return root, [f"data.train=[{{path: {root}/e}}]", "data.valid=[]", f"data.tokenizer.path={root}/tok.json",
                  "model.vocab_size=512"]


@pytest.fixture(scope="module")
def job_args(corpus):
    """A tiny 2-rank (tp=2) CPU run on that corpus, and its per-step losses from `herd launch --nproc 2`."""
    root, data = corpus
    args = [str(ROOT / "configs/demo.yaml"), *data, "model.n_layers=2", "model.dim=64",
            "model.ffn_dim=128", "data.seq_len=32", "data.micro_batch_size=2", "data.global_batch_size=8",
            f"train.steps={STEPS}", "schedule.warmup_steps=1", "parallel.tp=2", "checkpoint.every=100",
            "log.every=1", "log.tensorboard=false", f"log.run_dir={root}/runs"]
    reference = herd("launch", "--nproc", "2", *args, "log.name=ref")
    assert reference.returncode == 0, reference.stderr[-2000:]
    return root, args, losses(root / "runs" / "ref")


def losses(run: Path):
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").open()]


def submit(cluster, root: Path, args, name: str, shape: str, export=()) -> int:
    """Render with the user's command (2 CPU ranks on one node, the test cluster's env file), then sbatch it,
    adding `export` (VAR=value strings) to the environment the job inherits."""
    script = root / f"{name}.sbatch"
    rendered = herd("launch", "--slurm", "--cpu", "--nodes", "1", "--gpus-per-node", "2", "--shape", shape,
                    "--out", str(script), *args, f"log.name={name}", "slurm.env_file=launch/clusters/local.env",
                    "slurm.signal_seconds=60", cwd=root)  # the script's --chdir: logs and runs land in root
    assert rendered.returncode == 0, rendered.stderr
    text = script.read_text()
    assert "#SBATCH --requeue" in text and "#SBATCH --signal=B:USR1@60" in text and "--kill-on-bad-exit=1" in text
    assert "#SBATCH --output=%x-%j.out" in text and "launch/clusters/local.env" in text
    assert f"#SBATCH --chdir={root}" in text
    exports = [f"--export=ALL,{','.join(export)}"] if export else []
    result = cluster.run("sbatch", "--parsable", *exports, str(script))
    return int(result.stdout.strip().split(";")[0])


def job_log(root: Path, name: str, job_id: int) -> str:
    out, err = (root / f"{name}-{job_id}.{ext}" for ext in ("out", "err"))
    return (out.read_text() if out.exists() else "") + (err.read_text() if err.exists() else "")


@pytest.mark.parametrize("shape", ["torchrun", pytest.param("srun", marks=pytest.mark.slow)])
def test_sbatch_script_runs_two_ranks_like_herd_launch(slurm_cluster, job_args, shape):  # noqa: F811
    """The srun shape runs 2 tasks (one per rank); the torchrun shape 1 task whose torchrun starts 2 ranks. The
    srun shape's run to completion is also part of its preemption test, hence slow tier here."""
    root, args, reference = job_args
    name = f"plain-{shape}"
    job = submit(slurm_cluster, root, args, name, shape)
    info = slurm_cluster.wait_for(job, ENDED)
    log = job_log(root, name, job)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), log[-3000:]
    assert "2 ranks" in log and "world size 2 (dp_replicate 1 x dp_shard 1 x pp 1 x cp 1 x tp 2)" in log
    got = losses(root / "runs" / name)
    print(f"job {job} ({shape} shape, {info['NumTasks']} task(s), 2 ranks): {len(got)} steps, largest difference from "
          f"`herd launch --nproc 2`: {max(abs(a - b) for a, b in zip(got, reference)):.1e}")
    assert got == reference


GATE_STEP = 4
GATE_GUARD_S = 300  # below the watchdog's 600 s, so that a gate that gives up fails the test, not the watchdog
GATE = f"""# Test scaffolding of tests/integration/test_slurm.py, imported at start-up by every Python process of the
# preemption job (PYTHONPATH): in the job's first run each rank holds at the end of step {GATE_STEP} until its
# PreemptionCallback has seen the signal, so the job can neither finish nor get past that step before the test's
# SIGUSR1 arrives, however fast or loaded the machine. The path under test (the batch shell's trap, srun's
# forwarding, the ranks' agreement, the save, exit 75, the requeue and the resume) is untouched.
import os

if os.environ.get("SLURM_RESTART_COUNT", "0") == "0":
    import sys
    import time

    from engine.callbacks.preemption import PreemptionCallback

    _on_step_end = PreemptionCallback.on_step_end

    def _gated(self, trainer, metrics):
        if trainer.state.step == {GATE_STEP}:
            rank = os.environ.get("RANK", "?")
            print(f"test gate: rank {{rank}} holds at step {GATE_STEP} until a preemption signal arrives",
                  file=sys.stderr, flush=True)
            guard = time.monotonic() + {GATE_GUARD_S}  # a hang guard: giving up lets the job finish, and fail the test
            while not self.received and time.monotonic() < guard:
                time.sleep(0.05)
            print(f"test gate: rank {{rank}} goes on with signal {{self.received}}", file=sys.stderr, flush=True)
        _on_step_end(self, trainer, metrics)

    PreemptionCallback.on_step_end = _gated
"""


def wait_for_log(cluster, root: Path, name: str, job: int, pattern: str, count: int = 1) -> str:
    """Wait until `pattern` occurs `count` times in the job's output; fail at once if the job leaves RUNNING or
    PENDING first (it ended without getting there)."""
    log = ""

    def seen() -> bool:
        nonlocal log
        log = job_log(root, name, job)
        if len(re.findall(pattern, log, re.M)) >= count:
            return True
        state = cluster.job(job).get("JobState")
        assert state in ("PENDING", "CONFIGURING", "RUNNING"), (state, log[-3000:])
        return False

    wait_until(seen, lambda: f"{count} x {pattern!r} in the output of job {job}; output so far: {log[-3000:]}")
    return log


def release_requeued(cluster, job: int) -> None:
    """Lift the hold SLURM puts on a requeued job (BeginTime about 2 minutes out) so the test does not wait for it,
    once that is safe: slurmd refuses a batch launch whose credential is not strictly newer, in whole seconds,
    than the revocation of the previous run's (stamped when that run was ended, before its node went idle). So:
    wait for the node to be idle, then for the clock's next whole second, then lift it."""
    wait_until(lambda: cluster.node_state() == "idle", lambda: "the node to be idle after the first run")
    idle_second = int(time.time())
    wait_until(lambda: int(time.time()) > idle_second, lambda: "the next whole second")
    cluster.run("scontrol", "update", f"jobid={job}", "StartTime=now")


@pytest.mark.parametrize("shape", ["srun", pytest.param("torchrun", marks=pytest.mark.slow)])
def test_preempted_job_is_requeued_and_resumes_bitwise(slurm_cluster, job_args, tmp_path, shape):  # noqa: F811
    """SIGUSR1 to the batch shell (what `--signal=B:USR1@N` does ahead of the time limit) while the ranks train:
    every rank saves at one step boundary and exits 75, the script runs `scontrol requeue`, the requeued job
    resumes from that checkpoint and finishes; its per-step losses equal the uninterrupted run's. Every wait is
    for a state (a line in the job's output, a job or node state); the GATE holds the ranks at step GATE_STEP until
    the signal has reached them, so the step they stop at does not depend on timing."""
    root, args, reference = job_args
    name = f"preempt-{shape}"
    (tmp_path / "sitecustomize.py").write_text(GATE)
    job = submit(slurm_cluster, root, args, name, shape, export=[f"PYTHONPATH={tmp_path}"])
    wait_for_log(slurm_cluster, root, name, job, rf"^test gate: rank \d+ holds at step {GATE_STEP}\b", count=2)
    slurm_cluster.run("scancel", "--signal=USR1", "--batch", str(job))
    # the script requeues the job: it is PENDING again (no longer COMPLETING) with one restart; a job that ends
    # instead fails the test at once
    info = slurm_cluster.wait_for(job, ("PENDING", *ENDED), done=lambda i: i["JobState"] != "PENDING"
                                  or i.get("Restarts") == "1")
    log = job_log(root, name, job)
    assert (info["JobState"], info.get("Restarts")) == ("PENDING", "1"), (info, log[-3000:])
    assert "herd: SIGUSR1 received, forwarding it to the ranks" in log, log[-3000:]
    assert "exiting with 75 (requeue)" in log and f"requeueing job {job}" in log, (info, log[-3000:])
    release_requeued(slurm_cluster, job)
    info = slurm_cluster.wait_for(job, ENDED)
    log = job_log(root, name, job)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), log[-3000:]
    assert log.count("test gate: rank") == 4, log[-3000:]  # held and released once per rank, in the first run only
    stopped = re.search(r"preempted by signal 10 at step (\d+)", log)
    resumed = re.search(r"resumed from \S+ at step (\d+)", log)
    assert stopped and resumed and stopped.group(1) == resumed.group(1) == str(GATE_STEP), log[-3000:]
    assert "restart 1 on" in log  # SLURM_RESTART_COUNT seen by the second run of the script
    got = losses(root / "runs" / name)
    print(f"job {job} ({shape} shape): SIGUSR1 while the ranks were held at step {GATE_STEP}, stopped and saved at "
          f"step {stopped.group(1)}, requeued, resumed at step {resumed.group(1)}, finished {STEPS} steps; steps "
          f"logged {len(got)}, largest loss difference from the uninterrupted run "
          f"{max(abs(a - b) for a, b in zip(got, reference)):.1e}")
    assert got == reference


@pytest.mark.parametrize("flags,overrides,expected", [
    (["--nodes", "2", "--gpus-per-node", "3"], ["parallel.tp=2"],
     "data.global_batch_size: 16 is not divisible by micro_batch_size*dp = 24"),
    (["--nodes", "2", "--gpus-per-node", "8"], ["parallel.tp=16"], "parallel.tp: tp=16 does not divide"),
    (["--nodes", "0"], [], "slurm.nodes: must be at least 1, got 0"),
    ([], ["slurm.time=4:00:00"], "slurm.time: override 'slurm.time=4:00:00': '4:00:00' is read by YAML 1.1 as a "
                                 "base-60 number (14400): quote it"),
    (["--gpus-per-node", "2"], ["slurm.env_file=launch/clusters/nope.env"],
     "slurm.env_file: launch/clusters/nope.env: file not found"),
    ([], ["slurm.sbatch_args=['--wrap=rm -rf x']"], "slurm.sbatch_args[0]: '--wrap=rm -rf x' must be one"),
])
def test_bad_slurm_launch_is_one_line_and_writes_nothing(corpus, tmp_path, flags, overrides, expected):
    """On real data in a temporary directory (corpus), so that what is refused is the SLURM setting, whether or not
    the demo's data/ files exist."""
    result = herd("launch", "--slurm", *flags, "--out", str(tmp_path / "job.sbatch"), "--submit",
                  "configs/demo.yaml", *corpus[1], *overrides)
    assert_one_line_error(result, expected)
    assert not (tmp_path / "job.sbatch").exists()


def test_rendered_shapes_for_a_gpu_cluster(tmp_path):
    """What only a GPU cluster can run, checked as text: GPUs asked per node, the cluster's env file sourced,
    torchrun's c10d rendezvous on the first node, SLURM's ids mapped onto ranks."""
    scripts = {}
    for shape in ("torchrun", "srun"):
        out = tmp_path / f"{shape}.sbatch"
        # the data of a GPU cluster is on the cluster: not read here
        result = herd("launch", "--slurm", "--no-data-check", "--nodes", "2", "--gpus-per-node", "8", "--shape",
                      shape, "--out", str(out), "configs/demo.yaml", "parallel.tp=8", "slurm.time=04:00:00",
                      "slurm.env_file=launch/clusters/example_h100.env", "slurm.partition=h100")
        assert result.returncode == 0, result.stderr
        scripts[shape] = out.read_text()
    for text in scripts.values():
        assert "#SBATCH --nodes=2" in text and "#SBATCH --gpus-per-node=8" in text
        assert "#SBATCH --time=04:00:00" in text and "#SBATCH --partition=h100" in text
        assert re.search(r"^source \S+/launch/clusters/example_h100.env", text, re.M)
        assert 'scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1' in text
    assert "#SBATCH --ntasks-per-node=1" in scripts["torchrun"]
    assert '--rdzv-backend=c10d --rdzv-endpoint="$HEAD_NODE:$RDZV_PORT"' in scripts["torchrun"]
    assert "--nproc-per-node=8" in scripts["torchrun"]
    assert '--nnodes="$SLURM_JOB_NUM_NODES"' in scripts["torchrun"]
    assert "#SBATCH --ntasks-per-node=8" in scripts["srun"]
    assert "RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS" in scripts["srun"]
