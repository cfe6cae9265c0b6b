"""Runtime guards on 4 gloo ranks (tp 2 x dp_shard 2): R9 (NaN/Inf on one rank: every rank acts at the same step,
nothing non-finite is saved), the loss-spike guard, rollback, stop, and R11 (a rank 50 ms slower per step is
flagged; a healthy run raises no flag). One world runs every job (starting ranks is the expensive part)."""

import json
import math

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from engine.checkpoint.store import CheckpointStore
from parallel.multiprocess import run_on_ranks
from tests.distributed import ranks
from tests.distributed.test_parity import corpus  # noqa: F401 (fixture)

WORLD = 4
COMMON = ["parallel.tp=2", "data.global_batch_size=8", "train.steps=6", "checkpoint.every=2",
          "guards.spike_factor=3", "guards.spike_window=3", "guards.straggler_every=2",
          "guards.straggler_patience=2"]
JOBS = {  # name: (extra overrides, HERD_FAULT, snapshot step)
    "healthy": (["train.steps=8", "guards.straggler_threshold=0.05"], None, None),
    "nan_skip": ([], "nan_grad:1:3", None),  # rank 1 = tp rank 1: its norm-weight copy is not in the global norm
    "rollback": (["guards.nonfinite=rollback"], "nan_grad:1:4", 2),
    "spike": ([], "spike:2:5", None),
    # the threshold is a fraction of the median step (here ~0.3-0.4 s on 2 shared cores): 50 ms is ~0.13 of it
    "slow": (["train.steps=8", "guards.straggler_threshold=0.05"], "slow:3:50", None),
    "stop": (["guards.nonfinite=stop", "train.steps=4"], "nan_grad:2:2", None),
}
NAMES = list(JOBS)


@pytest.fixture(scope="module")
def world(corpus, tmp_path_factory):  # noqa: F811
    run_dir = tmp_path_factory.mktemp("guards")
    jobs = [(COMMON + extra, fault, snap) for extra, fault, snap in JOBS.values()]
    per_rank = run_on_ranks(ranks.guarded_runs, WORLD, str(corpus), str(run_dir), jobs, timeout=900)
    return {name: [per_rank[r][i] for r in range(WORLD)] for i, name in enumerate(NAMES)}, run_dir


def _run_path(run_dir, name):
    return run_dir / f"job{NAMES.index(name)}" / "p"


def _finite_and_equal(results):
    finals = [r["final"] for r in results]
    for name, value in finals[0].items():
        assert torch.isfinite(value).all(), name
        for other in finals[1:]:
            assert torch.equal(value, other[name]), name


def _saved_values(step_dir, tmp_path):
    out = tmp_path / f"{step_dir.name}.pt"
    dcp_to_torch_save(step_dir, out)
    return torch.load(out, weights_only=True)


def test_nan_on_one_rank_is_skipped_by_every_rank_and_never_saved(world, tmp_path):
    jobs, run_dir = world
    results, healthy = jobs["nan_skip"], jobs["healthy"]
    events = [r["events"] for r in results]
    norms = [next(row["grad_norm"] for row in r["rows"] if row["step"] == 3) for r in results]
    print(f"NaN in rank 1's gradient at step 3: each rank's guard events {events}; the global grad norm it "
          f"reported at step 3: {norms}")
    assert all(e == [{"step": 3, "kind": "nonfinite", "action": "skip", "to": None}] for e in events)
    assert all(math.isfinite(n) for n in norms)  # the norm did not carry the NaN: the agreed flag did
    assert "guards: non-finite loss or gradients at step 3 on every rank: update skipped" in results[0]["console"]
    # steps 1-3 as in the healthy run (the guard changes nothing else); the skip leaves the LR schedule behind
    losses = [row["loss"] for row in results[0]["rows"]]
    assert losses[:3] == [row["loss"] for row in healthy[0]["rows"]][:3]
    assert [r["schedule_steps"] for r in results] == [5] * WORLD
    _finite_and_equal(results)
    store = CheckpointStore(_run_path(run_dir, "nan_skip") / "checkpoints")
    saved = store.complete_steps()
    worst = 0.0
    for step in saved:
        values = _saved_values(store.step_dir(step), tmp_path)
        assert any(k.startswith("optim.") for k in values) and any(k.startswith("model.") for k in values)
        for key, value in values.items():
            if torch.is_tensor(value) and value.is_floating_point():
                assert torch.isfinite(value).all(), (step, key)
                worst = max(worst, value.abs().max().item())
    print(f"checkpoints {saved}: every model and optimizer tensor finite (largest magnitude {worst:.3g})")
    assert saved == [4, 6] or saved == [2, 4, 6]


def test_rollback_reloads_the_last_checkpoint_and_skips_the_data_since(world):
    jobs, _ = world
    results = jobs["rollback"]
    events = [r["events"] for r in results]
    print(f"NaN in rank 1's gradient at step 4 with guards.nonfinite=rollback: events per rank {events}")
    assert all(e == [{"step": 4, "kind": "nonfinite", "action": "rollback", "to": 2}] for e in events)
    snaps = results[0]["snapshots"]
    assert all(torch.equal(snaps["after_rollback"][k], snaps["step2"][k]) for k in snaps["step2"])
    assert any(not torch.equal(snaps["step3"][k], snaps["step2"][k]) for k in snaps["step2"])
    rows = results[0]["rows"]
    steps, positions = [row["step"] for row in rows], [row["position"] for row in rows]
    print(f"steps run {steps}, each starting at sample {positions}")
    assert steps == [1, 2, 3, 4, 3, 4, 5, 6]
    assert positions == sorted(set(positions))  # no batch replayed
    assert [r["step"] for r in results] == [6] * WORLD and [r["schedule_steps"] for r in results] == [6] * WORLD
    assert "rolled back to the checkpoint of step 2" in results[0]["console"]
    _finite_and_equal(results)


def test_loss_spike_seen_by_one_rank_is_skipped_by_all(world):
    jobs, _ = world
    events = [r["events"] for r in jobs["spike"]]
    print(f"rank 2 judges a 100x loss at step 5 (spike_factor 3, window 3): events per rank {events}")
    assert all(e == [{"step": 5, "kind": "spike", "action": "skip", "to": None}] for e in events)
    assert "loss spike" in jobs["spike"][0]["console"]
    assert all(r["events"] == [] for r in jobs["healthy"])  # the same guard on a healthy run: no false spike
    _finite_and_equal(jobs["spike"])


def test_stop_policy_stops_every_rank_at_the_step(world):
    jobs, _ = world
    errors = [r["error"] for r in jobs["stop"]]
    print(f"guards.nonfinite=stop, NaN on rank 2 at step 2: {errors[0]}")
    assert errors == ["guards: non-finite loss or gradients at step 2; stopping (guards.nonfinite=stop)"] * WORLD


def test_a_slow_rank_is_flagged_and_a_healthy_run_is_not(world):
    jobs, run_dir = world
    flags = jobs["slow"][0]["flags"]
    healthy = [r["flags"] for r in jobs["healthy"]]
    excess = [row.get("straggler_worst_excess") for row in jobs["healthy"][0]["rows"] if "stragglers" in row]
    print(f"healthy run: largest excess per window {[f'{e:.3f}' for e in excess]} (threshold 0.05), flags "
          f"{healthy}")
    assert all(f == [] for f in healthy)
    assert flags, "the slow rank was not flagged"
    first = flags[0]
    print(f"rank 3 sleeping 50 ms per step: flagged at step {first['step']} in {first['section']} "
          f"({first['ms'][first['section']]:.1f} ms vs median {first['median_ms'][first['section']]:.1f} ms, "
          f"excess {first['excess']:.2f} of a {first['median_ms']['step']:.1f} ms step)")
    assert {f["rank"] for f in flags} == {3} and first["step"] <= 8
    assert all(r["flags"] == flags for r in jobs["slow"])  # every rank reached the same verdict
    line = f"straggler: rank 3 on {first['host']}"
    assert line in jobs["slow"][0]["console"]
    report = [json.loads(x) for x in (_run_path(run_dir, "slow") / "stragglers.jsonl").read_text().splitlines()]
    assert [r["rank"] for r in report] == [3] and report[0]["step"] == first["step"]
