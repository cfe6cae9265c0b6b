"""Rejection sampling under tensor parallelism (2 gloo ranks, fp32) equals one process: the same prompts, answers,
copied fields and row order, greedy and seeded sampling, with scores within fp32 rounding (the row-parallel sums
of tp round differently, so the scores' last bits and hence the file's bytes may differ; everything else is
identical). FSDP (dp_shard=2: prompts split over ranks, lockstep forwards, rows gathered to rank 0) and context
parallelism (cp=2: zigzag-sharded scoring) are held to the same standard."""

import io
import json

import pytest

from align.rejection import run_rejection_sampling
from parallel.multiprocess import run_on_ranks
from tests.distributed import rejection_ranks
from tests.distributed.rejection_ranks import GREEDY, K, SAMPLED

LAYOUTS = [["parallel.tp=2"], ["parallel.dp_shard=2"], ["parallel.cp=2"]]
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The checkpoints and, per sampling mode, the one-process output file's text."""
    root = tmp_path_factory.mktemp("rejection-tp")
    world = rejection_ranks.make_world(root)
    cfg = rejection_ranks.job(world, "reference")
    references = {}
    for name, sampling in (("greedy", GREEDY), ("sampled", SAMPLED)):
        output = root / f"reference-{name}.jsonl"
        run_rejection_sampling(cfg, world["sft"], world["rm"], world["prompts"], str(output), K, sampling,
                               io.StringIO())
        references[name] = output.read_text()
    return world, references


@pytest.fixture(scope="module")
def layouts(world, tmp_path_factory):
    return run_on_ranks(rejection_ranks.sample_in_layouts, 2, world[0], str(tmp_path_factory.mktemp("ranks")),
                        LAYOUTS, timeout=300)


def _rows(text):
    return [json.loads(line) for line in text.splitlines()]


def _score_error(got, want):
    return max(abs(g[k] - w[k]) for g, w in zip(got, want) for k in ("score", "mean_score"))


@pytest.mark.parametrize("index", range(2 * len(LAYOUTS)))
def test_layout_output_equals_one_process(world, layouts, index):
    references = world[1]
    got = layouts[0][index]
    want_rows, got_rows = _rows(references[got["name"]]), _rows(got["text"])
    error = _score_error(got_rows, want_rows)
    print(f"{' '.join(got['layout'])} {got['name']}: max |score difference| {error:.1e} "
          f"(file bytes {'identical' if got['text'] == references[got['name']] else 'differ'})")
    assert len(got_rows) == len(want_rows)
    strip = (lambda row: {k: v for k, v in row.items() if k not in ("score", "mean_score")})
    assert [strip(r) for r in got_rows] == [strip(r) for r in want_rows]
    assert error < TOLERANCE
    # every rank returns the same stats and read the same finished file
    assert layouts[1][index]["stats"]["mean_best_score"] == got["stats"]["mean_best_score"]
    assert layouts[1][index]["text"] == got["text"]
