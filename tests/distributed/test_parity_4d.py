"""4D layout parity (shared/TESTING.md): pipeline and context parallelism, alone and combined with tensor and data
parallelism, train like one process.

Same protocol as test_parity.py (5 fp32 steps, accumulation, clipping at 0.5, per-step losses, final parameters
and the validation loss the EvalCallback logs within 1e-5 relative) on the parity model with 4 layers, so pp=2 can hold 2 virtual stages
per rank (8 layers for pp=4 with virtual stages). The corpus is packed with end-of-document tokens and
data.document_mask is on, so every run attends under document masks; under cp those masks cross rank boundaries.

CI tier: every dimension alone (each pipeline schedule; both cp attention variants), every pair, and a share of
the triples and quadruples on 8 ranks. Slow tier (`make test-all`): the matrix tp x cp x pp x dp in {1,2}^4 and
pp=4 layouts, each with every schedule and both cp variants.
"""

import itertools

import pytest

from parallel.pipeline_parallel import SINGLE_STAGE
from tests.distributed.test_parity import corpus, run_world, train_reference  # noqa: F401 (fixture)

SCHEDULES = ["GPipe", "1F1B", "Interleaved1F1B", "InterleavedZeroBubble", "ZBVZeroBubble", "DualPipeV"]


def pp_layout(pp: int, schedule: str) -> list:
    virtual = 1 if schedule in SINGLE_STAGE else 2
    return [f"parallel.pp={pp}", f"parallel.pp_schedule={schedule}", f"parallel.pp_virtual_stages={virtual}"]


def layout(tp=1, cp=1, pp=1, dp_shard=1, dp_replicate=1, schedule="1F1B", cp_attention="all_gather") -> list:
    out = [f"parallel.tp={tp}", f"parallel.dp_shard={dp_shard}", f"parallel.dp_replicate={dp_replicate}"]
    if cp > 1:
        out += [f"parallel.cp={cp}", f"parallel.cp_attention={cp_attention}"]
    if pp > 1:
        out += pp_layout(pp, schedule)
    return out


LAYOUTS_2 = [layout(pp=2, schedule=s) for s in SCHEDULES] + [
    layout(cp=2, cp_attention="all_gather"),
    layout(cp=2, cp_attention="ring"),
    layout(pp=2) + ["parallel.pp_layers=[1,3]", "parallel.activation_checkpointing=selective"],
]
LAYOUTS_4 = [
    layout(pp=2, tp=2),
    layout(pp=2, dp_shard=2, schedule="InterleavedZeroBubble"),
    layout(pp=2, dp_replicate=2, schedule="Interleaved1F1B"),
    layout(pp=2, cp=2, schedule="ZBVZeroBubble", cp_attention="ring"),
    layout(cp=2, tp=2, cp_attention="all_gather"),
    layout(cp=2, tp=2, cp_attention="ring") + ["parallel.sequence_parallel=false"],
    layout(cp=2, dp_replicate=2),
    layout(cp=2, dp_shard=2, cp_attention="ring") + ["parallel.activation_checkpointing=full"],
    # selective checkpointing: stored and recomputed blocks share one block plan per forward
    layout(cp=2, dp_shard=2, cp_attention="all_gather") + ["parallel.activation_checkpointing=selective"],
    layout(cp=4, cp_attention="ring"),
]
LAYOUTS_8 = [
    layout(tp=2, cp=2, pp=2),
    layout(cp=2, pp=2, dp_shard=2, schedule="DualPipeV", cp_attention="ring"),
]


def slow_matrix() -> list:
    """tp x cp x pp x dp in {1, 2}^4 with pp or cp > 1, every schedule where pp > 1 and both cp variants where
    cp > 1 (schedules and variants paired up, so each base layout runs max(6, 2) times, not 12)."""
    layouts = []
    for tp, cp, pp, dp in itertools.product((1, 2), repeat=4):
        if pp == 1 and cp == 1:
            continue
        schedules = SCHEDULES if pp > 1 else ["1F1B"]
        variants = ["all_gather", "ring"] if cp > 1 else ["all_gather"]
        for i in range(max(len(schedules), len(variants))):
            layouts.append(layout(tp, cp, pp, dp, schedule=schedules[i % len(schedules)],
                                  cp_attention=variants[i % len(variants)]))
    return layouts


def held_share(degrees: dict) -> float:
    """Each rank's share of the parameters is about 1/(tp * dp_shard * cp) (FSDP shards over dp_shard x cp); a
    pipeline rank holds at most ~70% of the parity model (embedding and head are a third of it)."""
    split = degrees.get("parallel.tp", 1) * degrees.get("parallel.dp_shard", 1) * degrees.get("parallel.cp", 1)
    return 1.1 / split * (0.7 if degrees.get("parallel.pp", 1) > 1 else 1.0)


@pytest.fixture(scope="module")
def reference4(corpus, tmp_path_factory):  # noqa: F811
    return train_reference(corpus, tmp_path_factory.mktemp("ref4"), ["model.n_layers=4"], evaluate=True)


def with_layers(layouts: list, n_layers: int) -> list:
    return [[f"model.n_layers={n_layers}"] + lay for lay in layouts]


def test_every_dimension_alone(corpus, tmp_path, reference4):  # noqa: F811
    run_world(2, with_layers(LAYOUTS_2, 4), corpus, tmp_path, reference4, held_share)


def test_pairs(corpus, tmp_path, reference4):  # noqa: F811
    run_world(4, with_layers(LAYOUTS_4, 4), corpus, tmp_path, reference4, held_share)


def test_triples_and_quadruples(corpus, tmp_path, reference4):  # noqa: F811
    run_world(8, with_layers(LAYOUTS_8, 4), corpus, tmp_path, reference4, held_share)


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [2, 4, 8])
def test_full_4d_matrix(corpus, tmp_path, reference4, world_size):  # noqa: F811
    layouts = [lay for lay in slow_matrix() if _world(lay) == world_size]
    run_world(world_size, with_layers(layouts, 4), corpus, tmp_path, reference4, held_share)


@pytest.mark.slow
def test_four_stage_pipelines_with_virtual_stages(corpus, tmp_path, tmp_path_factory):  # noqa: F811
    reference8 = train_reference(corpus, tmp_path_factory.mktemp("ref8"), ["model.n_layers=8"], evaluate=True)
    layouts = [layout(pp=4, dp_shard=2, schedule=s) for s in SCHEDULES] + [
        layout(pp=4, cp=2, schedule="Interleaved1F1B", cp_attention="ring"),
        layout(pp=4, tp=2, schedule="ZBVZeroBubble")]
    run_world(8, with_layers(layouts, 8), corpus, tmp_path, reference8, held_share)


def _world(lay: list) -> int:
    size = 1
    for item in lay:
        key, value = item.split("=")
        if key in ("parallel.tp", "parallel.cp", "parallel.pp", "parallel.dp_shard", "parallel.dp_replicate"):
            size *= int(value)
    return size
