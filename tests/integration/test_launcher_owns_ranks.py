"""The launcher owns its ranks (launch/local.py): `herd launch --nproc 2` is interrupted at random moments by
SIGKILL of its process group, SIGKILL of the launcher alone, SIGTERM, SIGUSR1 and SIGINT to its group (a Ctrl-C).
After each, no rank process may survive; after SIGTERM/SIGUSR1/SIGINT the launcher must have exited 75 without a
traceback, the ranks having saved a checkpoint. The same command is then run again, and every loss any attempt
logged must equal bitwise the loss of that step in an uninterrupted run. Two more cases: a second Ctrl-C kills
ranks that cannot save (one hangs) and exits 130; a job that does not save (checkpoint.every=0) ends by SIGTERM.

Each interruption waits for a state of the run chosen at random (seeded, printed): the launcher's first line (the
ranks are starting), metrics.jsonl reaching step k, or checkpoint step k committed. The rank processes are found
by a token in their environment (/proc/*/environ). The waits are for states, with hang guards, never for time.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Dict, List, Tuple

import pytest

from tests.helpers import make_corpus

ROOT = Path(__file__).resolve().parents[2]
STEPS, EVERY = 48, 4
WINDOW = 7  # an attempt is interrupted within this many steps of where it resumes: five attempts fit in STEPS
HANG_GUARD_S = 300.0  # only against a hang: a launch takes seconds
INTERRUPTIONS = ("group_SIGKILL", "launcher_SIGKILL", "SIGTERM", "SIGUSR1", "group_SIGINT")


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """The command's arguments on a tiny CPU config (tp=2, a checkpoint every 4 steps) and the per-step losses of
    the same command run without interruption."""
    root = tmp_path_factory.mktemp("owns")
    corpus = make_corpus(root)
    args = ["launch", "--nproc", "2", "configs/demo.yaml", f"data.train=[{{path: {corpus}/corpus.train}}]",
            "data.valid=[]", f"data.tokenizer.path={corpus}/tok.json", "model.vocab_size=512",
            "model.n_layers=1", "model.dim=64", "model.ffn_dim=128", "data.seq_len=32", "data.micro_batch_size=2",
            "data.global_batch_size=4", "schedule.warmup_steps=1", "parallel.tp=2", "train.device=cpu",
            f"train.steps={STEPS}", f"checkpoint.every={EVERY}", "log.every=1", "log.tensorboard=false",
            f"log.run_dir={root}/runs"]
    reference = subprocess.run([sys.executable, "-m", "launch", *args, "log.name=reference"], cwd=ROOT, env=_env(),
                               capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert reference.returncode == 0, reference.stderr[-3000:]
    losses = {step: values[0] for step, values in _logged(root / "runs" / "reference").items()}
    assert sorted(losses) == list(range(1, STEPS + 1))
    return args, root / "runs", losses


def _env(token: str = "") -> Dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HERD_TEST_RANKS": token}


def _logged(run: Path) -> Dict[int, List[float]]:
    """Every loss logged for each step, by every attempt (a resumed run appends to the same metrics.jsonl)."""
    losses: Dict[int, List[float]] = {}
    if (run / "metrics.jsonl").exists():
        for line in (run / "metrics.jsonl").read_text().split("\n")[:-1]:  # not a line still being written
            row = json.loads(line)
            if "loss" in row:
                losses.setdefault(row["step"], []).append(row["loss"])
    return losses


def _committed(run: Path) -> int:
    latest = run / "checkpoints" / "latest"
    return int(latest.read_text().strip().split("_")[-1]) if latest.exists() else 0


def _marked(token: str) -> List[int]:
    """Live processes whose environment holds the token: the launcher and its ranks."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if f"HERD_TEST_RANKS={token}".encode() in (entry / "environ").read_bytes().split(b"\0"):
                    pids.append(int(entry.name))
            except OSError:  # gone, or a zombie
                pass
    return pids


def _until(condition, what: str, proc=None) -> None:
    """Polls `condition` (a hang guard, not a timing assumption); fails at once if `proc` ended first."""
    deadline = time.monotonic() + HANG_GUARD_S
    while not condition():
        assert proc is None or proc.poll() is None, f"the launcher ended ({proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"hang guard: {what}"
        time.sleep(0.02)


def _reached(state: Tuple[str, int], run: Path, out: Path):
    kind, k = state
    if kind == "started":
        return lambda: out.exists() and out.stat().st_size > 0
    if kind == "step":
        return lambda: max(_logged(run), default=0) >= k
    return lambda: _committed(run) >= k


def _choose_state(rng: random.Random, run: Path) -> Tuple[str, int]:
    """A moment of the coming attempt, which resumes from the committed checkpoint. Steps are drawn from the next
    WINDOW, and room is left after the last one, so the run cannot finish before a signal sent there arrives."""
    start = _committed(run)
    steps = range(start + 1, min(start + WINDOW, STEPS - 6) + 1)
    kind = rng.choice(["started", "step", "checkpoint"])
    if kind == "step" and steps:
        return kind, rng.choice(steps)
    saves = [k for k in steps if k % EVERY == 0]
    if kind == "checkpoint" and saves:
        return kind, rng.choice(saves)
    return "started", 0


def _start(args: List[str], out: Path, env: Dict[str, str]) -> subprocess.Popen:
    """The launcher in a session (and process group) of its own, as a shell would start a job."""
    with out.open("w") as sink:
        return subprocess.Popen([sys.executable, "-m", "launch", *args], cwd=ROOT, env=env, stdout=sink,
                                stderr=subprocess.STDOUT, start_new_session=True)


def _ended(proc: subprocess.Popen, token: str) -> int:
    """The launcher's exit code, once no process of the job is left (it is SIGKILLed on a failed assertion)."""
    try:
        code = proc.wait(timeout=HANG_GUARD_S)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    _until(lambda: not _marked(token), "every rank process ended")
    return code


def _interrupt(args: List[str], run: Path, how: str, state: Tuple[str, int], attempt: int) -> None:
    token = uuid.uuid4().hex
    out = run.parent / f"{run.name}.attempt{attempt}.out"
    proc = _start(args, out, _env(token))
    try:
        _until(_reached(state, run, out), f"state {state}", proc)
        alive = len(_marked(token))
        {"group_SIGKILL": lambda: os.killpg(proc.pid, signal.SIGKILL), "launcher_SIGKILL": proc.kill,
         "SIGTERM": lambda: proc.send_signal(signal.SIGTERM), "SIGUSR1": lambda: proc.send_signal(signal.SIGUSR1),
         "group_SIGINT": lambda: os.killpg(proc.pid, signal.SIGINT)}[how]()
    finally:
        code = _ended(proc, token)
    text = out.read_text()
    print(f"attempt {attempt}: {how} at {state} ({alive} processes of the job alive then): exit {code}, "
          f"checkpoint step {_committed(run)}, last logged step {max(_logged(run), default=0)}")
    if how.endswith("SIGKILL"):
        assert code == -signal.SIGKILL
        return
    assert code == 75, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    received = how.split("_")[-1]
    assert f"herd launch: {received} received" in text and "exited with 75 (preempted)" in text
    sent = {"SIGUSR1": signal.SIGUSR1}.get(received, signal.SIGTERM)  # what the launcher sends its ranks
    assert f"preempted by signal {int(sent)} at step {_committed(run)}: checkpoint saved" in text


def _interrupted_and_resumed(job, seed: int) -> None:
    args, runs, reference = job
    rng = random.Random(seed)
    order = rng.sample(INTERRUPTIONS, len(INTERRUPTIONS))
    name = f"seed{seed}"
    run = runs / name
    print(f"seed {seed}: {' -> '.join(order)}")
    for attempt, how in enumerate(order):
        _interrupt([*args, f"log.name={name}"], run, how, _choose_state(rng, run), attempt)
    saved = _committed(run)
    final = subprocess.run([sys.executable, "-m", "launch", *args, f"log.name={name}"], cwd=ROOT, env=_env(),
                           capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert final.returncode == 0, final.stderr[-3000:]
    assert f"resumed from {run / 'checkpoints' / f'step_{saved:08d}'} at step {saved}" in final.stdout
    logged = _logged(run)
    assert sorted(logged) == list(range(1, STEPS + 1))
    differing = {step: values for step, values in logged.items() if set(values) != {reference[step]}}
    print(f"{sum(map(len, logged.values()))} losses logged over {len(order) + 1} attempts, all equal to the "
          f"uninterrupted run's: {not differing}")
    assert not differing, (differing, reference)


def test_launcher_interrupted_four_ways_leaves_no_rank_and_resumes_bitwise(job):
    _interrupted_and_resumed(job, int(os.environ.get("HERD_TEST_SEED", "16")))


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(1, 6))
def test_launcher_interrupted_at_more_random_moments(job, seed):
    _interrupted_and_resumed(job, seed)


def test_second_ctrl_c_kills_ranks_that_cannot_save(job, tmp_path):
    """Rank 1 hangs before step 3's collectives, so no rank reaches a step end: the first SIGINT to the group
    (a Ctrl-C) cannot be acted on, the second kills the ranks, and the launcher exits 130 with no rank left."""
    args, _, _ = job
    token = uuid.uuid4().hex
    out = tmp_path / "launch.out"
    proc = _start([*args, f"log.run_dir={tmp_path}", "log.name=hung"], out,
                  {**_env(token), "HERD_FAULT": "hang:1:3", "HERD_FAULT_HANG_S": "900"})
    try:
        _until(lambda: "HERD_FAULT: rank 1 hangs" in out.read_text(), "rank 1 hanging", proc)
        os.killpg(proc.pid, signal.SIGINT)
        _until(lambda: "herd launch: SIGINT received" in out.read_text(), "the first SIGINT handled", proc)
        os.killpg(proc.pid, signal.SIGINT)
    finally:
        code = _ended(proc, token)
    text = out.read_text()
    print(f"second SIGINT: exit {code}")
    assert code == 130, text[-3000:]
    assert "herd launch: SIGINT again: killing the ranks" in text and "Traceback" not in text, text[-3000:]


def test_sigterm_ends_a_job_that_does_not_save(job, tmp_path):
    """checkpoint.every=0: the ranks have no preemption handler and keep SIGTERM's default action; the launcher
    forwards it, they end, and it exits 128 + 15 saying nothing was saved."""
    args, _, _ = job
    token = uuid.uuid4().hex
    out = tmp_path / "launch.out"
    proc = _start([*args, f"log.run_dir={tmp_path}", "log.name=nosave", "checkpoint.every=0"], out, _env(token))
    try:
        _until(lambda: max(_logged(tmp_path / "nosave"), default=0) >= 2, "step 2", proc)
        proc.send_signal(signal.SIGTERM)
    finally:
        code = _ended(proc, token)
    text = out.read_text()
    print(f"SIGTERM without checkpoints: exit {code}")
    assert code == 128 + signal.SIGTERM, text[-3000:]
    assert "herd launch: the ranks ended by SIGTERM (nothing saved)" in text and "Traceback" not in text
    assert not (tmp_path / "nosave" / "checkpoints").exists()
