"""Resharding on resume (shared/TESTING.md R6, R7): a checkpoint saved under one layout loads under another,
the consolidated model equals the saved one exactly, and the next steps match a run that never stopped.

Each case trains the parity model (fp32) for 3 of 6 steps under layout A and stops (as a preemption would; the
checkpoint callback saves at the end of fit), then a world of layout B resumes from the same checkpoint
directory and trains steps 4-6. The reference trains 6 steps on one process without stopping.
"""

import pytest
import torch

from parallel.multiprocess import run_on_ranks
from tests.distributed import ranks
from tests.distributed.test_parity import corpus  # noqa: F401 (fixture)
from tests.distributed.test_parity import train_reference

CKPT = ["train.steps=6", "checkpoint.every=3"]
CASES = {  # name: (world A, layout A, world B, layout B)
    "dp2->tp2": (2, ["parallel.dp_shard=2"], 2, ["parallel.tp=2"]),
    "tp2->pp2": (2, ["parallel.tp=2"], 2, ["parallel.pp=2"]),
    "tp2xdp2->pp2xdp2": (4, ["parallel.tp=2", "parallel.dp_shard=2"], 4, ["parallel.pp=2", "parallel.dp_shard=2"]),
    "4 ranks->1": (4, ["parallel.tp=2", "parallel.dp_shard=2"], 1, []),
    "tp4 (padded vocab)->cp2 x dp2": (4, ["parallel.tp=4"], 4, ["parallel.cp=2", "parallel.dp_shard=2"]),
    "pp2 x 2 virtual stages x HSDP2->tp2 x dp2": (
        4, ["model.n_layers=4", "parallel.pp=2", "parallel.pp_schedule=Interleaved1F1B",
            "parallel.pp_virtual_stages=2", "parallel.dp_replicate=2", "parallel.dp_shard=1"],
        4, ["model.n_layers=4", "parallel.tp=2", "parallel.dp_shard=2"]),
}


@pytest.fixture(scope="module")
def reference6(corpus, tmp_path_factory):  # noqa: F811
    """Uninterrupted single-process runs, by the number of layers the case's model has."""
    return {layers: train_reference(corpus, tmp_path_factory.mktemp(f"ref6-{layers}"),
                                    ["train.steps=6", f"model.n_layers={layers}"]) for layers in (2, 4)}


def _jobs(tmp_path, side: str, world: int) -> dict:
    """The jobs of every case whose side `side` (A or B) runs on `world` ranks, by case name."""
    jobs = {}
    for name, (world_a, layout_a, world_b, layout_b) in CASES.items():
        ckpt = f"checkpoint.dir={tmp_path}/ckpt-{name.replace(' ', '_').replace('>', '')}"
        if side == "A" and world_a == world:
            jobs[name] = (layout_a + CKPT + [ckpt], 3)
        if side == "B" and world_b == world:
            jobs[name] = (layout_b + CKPT + [ckpt], None)
    return jobs


def _run(side, world, corpus, tmp_path):  # noqa: F811
    jobs = _jobs(tmp_path, side, world)
    if not jobs:
        return {}
    results = run_on_ranks(ranks.train_phases, world, str(corpus), str(tmp_path / f"{side}{world}"),
                           list(jobs.values()), timeout=1200)
    return {name: [r[i] for r in results] for i, name in enumerate(jobs)}


def test_resume_under_another_layout(corpus, tmp_path, reference6):  # noqa: F811
    saved, resumed = {}, {}
    for world in (2, 4):
        saved.update(_run("A", world, corpus, tmp_path))
    for world in (1, 2, 4):
        resumed.update(_run("B", world, corpus, tmp_path))
    total = 32  # global batch of the parity config
    for name, case in CASES.items():
        reference = reference6[4 if "model.n_layers=4" in case[1] else 2]
        a, b = saved[name][0], resumed[name][0]
        assert len(a["losses"]) == 3 and len(b["losses"]) == 3
        # the consolidated model B starts from is exactly the one A saved
        assert set(b["start"]) == set(a["final"])
        for key, value in a["final"].items():
            assert torch.equal(b["start"][key], value), (name, key)
        losses = a["losses"] + b["losses"]
        loss_err = max(abs(x - y) / abs(y) for x, y in zip(losses, reference["losses"]))
        param_err = max(((b["final"][k] - v).norm() / v.norm()).item() for k, v in reference["params"].items())
        # R7: every sample of steps 4-6 consumed exactly once over B's data-parallel ranks
        consumed = sorted(i for r in resumed[name] if r["holds_data"] for step in r["samples"] for i in step)
        print(f"{name}: losses of steps 1-6 within {loss_err:.2e}, final parameters within {param_err:.2e} of "
              f"the uninterrupted run; {len(consumed)} samples after resume")
        assert consumed == list(range(3 * total, 6 * total))
        assert loss_err < 1e-5 and param_err < 1e-5
