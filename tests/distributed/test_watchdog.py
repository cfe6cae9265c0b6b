"""Hang watchdog (shared/TESTING.md R10): a rank that hangs before a collective is named in one merged report,
with the collective its peer waited in, and every rank exits with HANG_EXIT_CODE; a healthy run only writes
heartbeats. The end-to-end `herd launch` version is tests/integration/test_hang.py."""

import json
from pathlib import Path

import pytest
import torch.distributed as dist

from engine.callbacks.watchdog import HANG_EXIT_CODE, WatchdogCallback, find_stuck, merge_report
from engine.config import WatchdogConfig
from engine.errors import ConfigError
from parallel.multiprocess import RankFailure, run_on_ranks
from tests.distributed import ranks
from tests.distributed.test_parity import corpus  # noqa: F401 (fixture)
from tests.helpers import parity_config

ROOT = Path(__file__).resolve().parents[2]
FAST = ["watchdog.heartbeat_every=0.25", "watchdog.dump_wait=15"]


def test_collective_timeout_names_the_rank_that_never_entered(corpus, tmp_path):  # noqa: F811
    """Rank 1 sleeps at the start of step 3; rank 0 blocks in the step's first all-reduce (the loss-token count
    over the data-parallel group) until gloo's 3 s collective timeout fails it. The heartbeat timeout is long,
    so this exercises the collective-timeout path; rank 1 dumps when it sees rank 0's trigger."""
    overrides = ["parallel.dp_shard=2", "watchdog.collective_timeout=3", "watchdog.timeout=120", *FAST]
    with pytest.raises(RankFailure) as failure:
        run_on_ranks(ranks.watched_run, 2, str(corpus), str(tmp_path), overrides, timeout=300,
                     env={"HERD_FAULT": "hang:1:3", "HERD_FAULT_HANG_S": "600"})
    assert f"exit code {HANG_EXIT_CODE}" in str(failure.value)
    hang = tmp_path / "p" / "hang"
    report = (hang / "report.txt").read_text()
    headline = report.splitlines()[0]
    print(f"report headline: {headline}")
    assert headline.startswith("HANG: rank 1 never entered ") and headline.endswith("that rank(s) 0 waited in")
    assert "Timed out" in report  # rank 0's reason: gloo's timeout
    # the collective named is the one that timed out on rank 0, and rank 1's count on its group stops just below
    states = [json.loads((hang / f"rank{r}.json").read_text()) for r in (0, 1)]
    failed = states[0]["last_collective"]
    assert failed["error"] and states[0]["collective"] is None and states[0]["step"] == 3
    assert f"never entered {failed['op']} #{failed['group_seq']} on group {failed['group']}" in headline
    site_file = failed["site"].split(":")[0]  # herd's call site (last two path parts), not torch's
    assert failed["site"] in headline and any((ROOT / d / site_file).is_file() for d in (".", "engine"))
    assert states[1]["group_counts"][failed["group"]] == failed["group_seq"] - 1
    for rank in (0, 1):
        dump = (hang / f"rank{rank}.txt").read_text()
        assert "Python stacks" in dump and "most recent call first" in dump
    assert "_fault_hang" in (hang / "rank1.txt").read_text()  # rank 1's stack shows where it hangs


def test_healthy_run_writes_heartbeats_and_no_report(corpus, tmp_path):  # noqa: F811
    results = run_on_ranks(ranks.watched_run, 2, str(corpus), str(tmp_path), ["parallel.tp=2", *FAST],
                           timeout=300)
    print("final heartbeats: " + "; ".join(f"rank {r['final']['rank']} step {r['final']['step']} "
                                            f"{r['final']['status']}, last collective "
                                            f"{r['final']['last_collective']['op']}" for r in results))
    for rank, result in enumerate(results):
        assert result["during"]["rank"] == rank and result["during"]["status"] == "running"
        assert result["final"]["status"] == "ended" and result["final"]["step"] == result["step"] == 5
        assert result["unwrapped"]  # torch.distributed is itself again after the run
        assert result["final"]["last_collective"]["site"] != "?"
        assert result["final"]["collective"] is None
    assert not (tmp_path / "p" / "hang").exists()


def _state(rank, step, counts, collective=None, progress=100.0, group_ranks=(0, 1, 2, 3)):
    return {"rank": rank, "host": "h", "pid": rank, "time": 200.0, "step": step, "section": "train_step",
            "progress_time": progress, "collective": collective, "last_collective": None,
            "group_counts": counts, "groups": {"g": {"ranks": list(group_ranks), "desc": "dp"}}}


def test_find_stuck_names_the_ranks_that_never_entered():
    waiting = {"op": "all_reduce", "group": "g", "group_seq": 7, "site": "x.py:1 f", "entered": 150.0,
               "exited": None, "error": None, "async": False}
    states = {0: _state(0, 4, {"g": 7}, waiting), 1: _state(1, 4, {"g": 7}, waiting),
              2: _state(2, 4, {"g": 6}), 3: _state(3, 4, {"g": 7}, waiting)}
    found = find_stuck(states, 4)
    assert found["stuck"] == [2] and found["waiting"] == [0, 1, 3] and found["entry"]["group_seq"] == 7
    del states[2]  # rank 2 died before writing anything: it is still the one missing
    assert find_stuck(states, 4)["stuck"] == [2]
    idle = {r: _state(r, 4, {"g": 7}, progress=100.0 + r) for r in range(4)}  # nobody in a collective
    assert find_stuck(idle, 4)["stuck"] == [0]  # the oldest progress


def test_report_from_heartbeats_when_a_rank_left_no_dump(tmp_path):
    beats, hang = tmp_path / "heartbeat", tmp_path / "hang"
    beats.mkdir()
    hang.mkdir()
    waiting = {"op": "barrier", "group": "g", "group_seq": 3, "site": "a.py:2 g", "entered": 150.0,
               "exited": None, "error": None, "async": False}
    (hang / "rank0.json").write_text(json.dumps({**_state(0, 9, {"g": 3}, waiting, group_ranks=(0, 1)),
                                                 "reason": "no progress"}))
    (beats / "rank1.json").write_text(json.dumps(_state(1, 9, {"g": 2}, group_ranks=(0, 1))))
    report = merge_report(hang, beats, 2)
    print(report.splitlines()[0])
    assert report.startswith("HANG: rank 1 never entered barrier #3 on group g dp [0, 1] at a.py:2 g")
    assert "heartbeat only" in report and "<-- STUCK" in report.split("rank 1 on")[1].splitlines()[0]


def test_watchdog_stands_down_when_fit_raises():
    """A fit() ended by an exception leaves a process that lives on (a test, a notebook): the watchdog thread must
    stop and unwrap torch.distributed instead of declaring a hang later and ending the process."""
    original = dist.all_reduce
    cfg = WatchdogConfig(timeout=0.6, heartbeat_every=0.1)
    watchdog = WatchdogCallback(cfg, Path("/nonexistent-herd-run"), rank=0, world_size=1)
    watchdog.heartbeat_dir = Path(__import__("tempfile").mkdtemp())

    class Trainer:
        class state:
            step = 0

        def fit(self):
            watchdog.on_fit_start(self)
            assert dist.all_reduce is not original  # recorded while fit runs
            raise RuntimeError("a failing step")

    with pytest.raises(RuntimeError, match="a failing step"):
        Trainer().fit()
    # the state, not a time: the thread ends by itself once it sees fit() gone (a watchdog still armed would
    # instead declare a hang after 0.6 s and end this process); the join's limit only turns a hang into a failure
    watchdog._thread.join(timeout=300)
    assert not watchdog._thread.is_alive()
    assert dist.all_reduce is original


@pytest.mark.parametrize("override,key", [("watchdog.timeout=0", "watchdog.timeout"),
                                          ("watchdog.heartbeat_every=700", "watchdog.heartbeat_every"),
                                          ("watchdog.trace_buffer=-1", "watchdog.trace_buffer")])
def test_bad_watchdog_values_are_rejected(tmp_path, override, key):
    with pytest.raises(ConfigError) as error:
        parity_config(tmp_path, tmp_path, [override])
    assert str(error.value).startswith(f"{key}: ")
