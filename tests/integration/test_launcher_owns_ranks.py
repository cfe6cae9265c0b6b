"""The launcher owns its ranks (launch/local.py): `herd launch --nproc 2` is interrupted at random moments by
SIGKILL of its process group, SIGKILL of the launcher alone, SIGTERM, SIGUSR1 and SIGINT to its group (a Ctrl-C).
After each, no rank process may survive; after SIGTERM/SIGUSR1/SIGINT the launcher must have exited 75 without a
traceback, the ranks having saved a checkpoint. The same command is then run again, and every loss any attempt
logged must equal bitwise the loss of that step in an uninterrupted run. Two more cases: a second Ctrl-C kills
ranks that cannot save (one hangs) and exits 130; a job that does not save (checkpoint.every=0) ends by SIGTERM.

Each interruption waits for a state of the run chosen at random (seeded, printed): the launcher's first line (the
ranks are starting), metrics.jsonl reaching step k, or checkpoint step k committed. A test gate (GATE, a
sitecustomize module) holds the ranks at the end of the step after that state until the signal has reached them,
so the run can neither finish nor go further before it arrives, however loaded the machine. The rank processes
are found by a token in their environment (/proc/*/environ). The waits are for states, with hang guards, never
for time. Also: a rank that fails after another ended with 0 fails the launch (its code, not the first rank's),
and a rank still starting (SIGTERM blocked) when another fails is killed at once.
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
from typing import Dict, List, Optional, Tuple

import pytest

from tests.helpers import make_corpus

ROOT = Path(__file__).resolve().parents[2]
STEPS, EVERY = 48, 4
WINDOW = 7  # an attempt is interrupted within this many steps of where it resumes: five attempts fit in STEPS
HANG_GUARD_S = 300.0  # only against a hang: a launch takes seconds
INTERRUPTIONS = ("group_SIGKILL", "launcher_SIGKILL", "SIGTERM", "SIGUSR1", "group_SIGINT")
GATE = f"""# Test scaffolding of tests/integration/test_launcher_owns_ranks.py, imported at start-up by every Python
# process of a launch (PYTHONPATH). It acts only in a rank (RANK set) whose environment asks for it:
# HERD_TEST_GATE_STEP=k: the rank holds at the end of step k until its PreemptionCallback has seen a signal (the
#   path under test, the launcher's forwarding, the ranks' agreement, the save and exit 75, is untouched);
# HERD_TEST_START="<rank 0's action>;<rank 1's action>", before herd runs: "exit N" exits with N, "exit N once
#   rank R started" first waits for rank R's pid file, "... ended" also until the launcher has reaped rank R;
#   "hang" sleeps (SIGTERM blocked, as the launcher starts a rank); each writes $HERD_TEST_DIR/rank<r>.pid first.
import os

if "RANK" in os.environ and os.environ.get("HERD_TEST_GATE_STEP"):
    import sys
    import time

    from engine.callbacks.preemption import PreemptionCallback

    _on_step_end = PreemptionCallback.on_step_end

    def _gated(self, trainer, metrics):
        if trainer.state.step == int(os.environ["HERD_TEST_GATE_STEP"]):
            rank = os.environ["RANK"]
            print(f"test gate: rank {{rank}} holds at step {{trainer.state.step}} until a signal arrives",
                  file=sys.stderr, flush=True)
            guard = time.monotonic() + {HANG_GUARD_S}  # a hang guard: giving up lets the run finish, failing the test
            while not self.received and time.monotonic() < guard:
                time.sleep(0.02)
        _on_step_end(self, trainer, metrics)

    PreemptionCallback.on_step_end = _gated

if "RANK" in os.environ and os.environ.get("HERD_TEST_START"):
    import time

    _rank, _dir = os.environ["RANK"], os.environ["HERD_TEST_DIR"]
    _words = os.environ["HERD_TEST_START"].split(";")[int(_rank)].split()
    with open(os.path.join(_dir, f"rank{{_rank}}.tmp"), "w") as _f:
        _f.write(str(os.getpid()))
    os.rename(os.path.join(_dir, f"rank{{_rank}}.tmp"), os.path.join(_dir, f"rank{{_rank}}.pid"))
    _guard = time.monotonic() + {HANG_GUARD_S}
    if _words[0] == "exit" and len(_words) == 6:  # "exit N once rank R started|ended"
        _pid_file = os.path.join(_dir, f"rank{{_words[4]}}.pid")
        while not os.path.exists(_pid_file) and time.monotonic() < _guard:
            time.sleep(0.01)
        with open(_pid_file) as _f:
            _pid = int(_f.read())
        while _words[5] == "ended" and os.path.exists(f"/proc/{{_pid}}") and time.monotonic() < _guard:  # reaped
            time.sleep(0.01)
    if _words[0] == "exit":
        os._exit(int(_words[1]))
    time.sleep(max(0.0, _guard - time.monotonic()))  # "hang"
    os._exit(1)
"""


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


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """A directory holding GATE as sitecustomize.py, for PYTHONPATH."""
    path = tmp_path_factory.mktemp("site")
    (path / "sitecustomize.py").write_text(GATE)
    return path


def _env(token: str = "", site: Optional[Path] = None, **extra: str) -> Dict[str, str]:
    path = f"{site}{os.pathsep}{ROOT}" if site is not None else str(ROOT)
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "HERD_TEST_RANKS": token, **extra}


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
    WINDOW, and one step is left after the last one for the gate (_gate_step) to hold the ranks at."""
    start = _committed(run)
    steps = range(start + 1, min(start + WINDOW, STEPS - 1) + 1)
    kind = rng.choice(["started", "step", "checkpoint"])
    if kind == "step" and steps:
        return kind, rng.choice(steps)
    saves = [k for k in steps if k % EVERY == 0]
    if kind == "checkpoint" and saves:
        return kind, rng.choice(saves)
    return "started", 0


def _gate_step(state: Tuple[str, int], run: Path) -> int:
    """Where GATE holds the ranks until the signal reaches them: the end of the step after the state (step k is
    logged, and checkpoint k committed, before step k + 1 ends), or of the attempt's first step."""
    kind, k = state
    return (k if kind != "started" else _committed(run)) + 1


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


def _interrupt(args: List[str], run: Path, how: str, state: Tuple[str, int], attempt: int, site: Path) -> None:
    token = uuid.uuid4().hex
    out = run.parent / f"{run.name}.attempt{attempt}.out"
    proc = _start(args, out, _env(token, site, HERD_TEST_GATE_STEP=str(_gate_step(state, run))))
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


def _interrupted_and_resumed(job, site: Path, seed: int) -> None:
    args, runs, reference = job
    rng = random.Random(seed)
    order = rng.sample(INTERRUPTIONS, len(INTERRUPTIONS))
    name = f"seed{seed}"
    run = runs / name
    print(f"seed {seed}: {' -> '.join(order)}")
    for attempt, how in enumerate(order):
        _interrupt([*args, f"log.name={name}"], run, how, _choose_state(rng, run), attempt, site)
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


def test_launcher_interrupted_four_ways_leaves_no_rank_and_resumes_bitwise(job, site):
    _interrupted_and_resumed(job, site, int(os.environ.get("HERD_TEST_SEED", "16")))


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(1, 6))
def test_launcher_interrupted_at_more_random_moments(job, site, seed):
    _interrupted_and_resumed(job, site, seed)


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


def _started(job, site: Path, tmp_path: Path, actions: str) -> Tuple[int, str]:
    """A launch whose ranks do `actions` (GATE's HERD_TEST_START) instead of training: its code and output."""
    args, _, _ = job
    token = uuid.uuid4().hex
    out = tmp_path / "launch.out"
    proc = _start([*args, f"log.run_dir={tmp_path}", "log.name=start"], out,
                  _env(token, site, HERD_TEST_START=actions, HERD_TEST_DIR=str(tmp_path)))
    return _ended(proc, token), out.read_text()


def test_a_rank_failing_after_another_finished_fails_the_launch(job, site, tmp_path):
    """Rank 0 exits 0; only once the launcher has reaped it (so it has seen a rank end with 0 first) does rank 1
    exit 134, as rank 1 of a finished job once did in its teardown (SIGABRT). The launch fails with 134."""
    code, text = _started(job, site, tmp_path, "exit 0;exit 134 once rank 0 ended")
    print(f"rank 0 exited 0, then rank 1 134: launcher exit {code}")
    assert code == 134, text[-3000:]
    assert "herd launch: rank 1 exited with 134: stopping the other ranks" in text and "Traceback" not in text


def test_a_rank_still_starting_when_another_fails_is_killed_at_once(job, site, tmp_path):
    """Rank 0 hangs in start-up, where the launcher's SIGTERM stays blocked; rank 1 exits 3. The launcher kills
    rank 0 at once (rather than after FAILURE_GRACE_S) and exits with rank 1's code."""
    code, text = _started(job, site, tmp_path, "hang;exit 3 once rank 0 started")
    print(f"rank 1 exited 3 while rank 0 was starting: launcher exit {code}")
    assert code == 3, text[-3000:]
    assert "herd launch: rank 1 exited with 3: stopping the other ranks" in text, text[-3000:]
    assert "herd launch: rank 0 is not training (SIGTERM blocked): killing it" in text and "Traceback" not in text
