"""The long-context evaluations under context parallelism (cp=2: every haystack cut into zigzag shards whose answer
losses sum) and data parallelism (dp=2: both ranks score the same haystack, eval_loss counts it twice) equal one
process: short-context loss and the true answers' loss within the parity tolerance (fp32, 1e-5 relative), needle
accuracy exactly, at the start and the end of the run."""

import pytest

from parallel.multiprocess import run_on_ranks
from tests.distributed.long_eval_ranks import long_eval_config, train_and_read, train_layouts
from tests.helpers import make_corpus

LAYOUTS = [["parallel.cp=2"], ["parallel.dp_shard=2"]]
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("long_eval_layouts"))


def test_two_rank_layouts_equal_one_process(corpus, tmp_path):
    reference = train_and_read(long_eval_config(corpus, tmp_path / "one"))["records"]
    results = run_on_ranks(train_layouts, 2, str(corpus), str(tmp_path / "two"), LAYOUTS, timeout=900)
    for index, layout in enumerate(LAYOUTS):
        records = results[0][index]["records"]
        # one line per evaluation: rank 0 alone writes (rank 1 evaluates too: the collectives need it)
        _assert_equal(records, reference, layout)
        assert results[1][index]["losses"] == results[0][index]["losses"]


def _assert_equal(records: list, reference: list, layout: list) -> None:
    assert [(r["step"], r["when"]) for r in records] == [(0, "start"), (6, "end")]
    for got, want in zip(records, reference):
        for key in ("short_loss", "needle_answer_loss"):
            error = abs(got[key] - want[key]) / abs(want[key])
            print(f"{' '.join(layout)} {want['when']}: {key} {got[key]:.6f} vs {want[key]:.6f} ({error:.1e})")
            assert error < TOLERANCE, (layout, key)
        assert got["short_tokens"] == want["short_tokens"]
        assert got["needle"] == want["needle"] and got["needle_mean"] == want["needle_mean"], layout


@pytest.mark.slow  # two more 2-rank runs: the evaluations through tensor and pipeline parallelism
def test_tensor_and_pipeline_layouts_equal_one_process(corpus, tmp_path):
    layouts = [["parallel.tp=2"], ["parallel.pp=2"]]
    reference = train_and_read(long_eval_config(corpus, tmp_path / "one"))["records"]
    results = run_on_ranks(train_layouts, 2, str(corpus), str(tmp_path / "two"), layouts, timeout=900)
    for index, layout in enumerate(layouts):
        _assert_equal(results[0][index]["records"], reference, layout)
