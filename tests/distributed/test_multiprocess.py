"""The gloo multi-process harness that every parallel-parity test builds on."""

import pytest

from parallel.multiprocess import RankFailure, run_on_ranks
from tests.distributed import ranks


def test_collectives_and_mesh_on_four_ranks():
    results = run_on_ranks(ranks.collectives, 4)
    assert [r["sum"] for r in results] == [10.0] * 4  # 1 + 2 + 3 + 4
    assert all(r["gathered"] == [0.0, 1.0, 2.0, 3.0] for r in results)
    # mesh (dp=2, tp=2), tp innermost: ranks {0,1} and {2,3} form the tp groups
    assert [r["tp_sum"] for r in results] == [1.0, 1.0, 5.0, 5.0]
    assert [r["tp_rank"] for r in results] == [0, 1, 0, 1]


def test_a_failing_rank_is_reported_and_the_rest_stopped():
    with pytest.raises(RankFailure, match=r"rank 1 of 2 failed:(.|\n)*ValueError: rank one is broken"):
        run_on_ranks(ranks.fails_on_rank_one, 2, timeout=120)


def test_a_hanging_rank_times_out_by_name():
    with pytest.raises(TimeoutError, match=r"ranks \[1\] did not finish"):
        run_on_ranks(ranks.hangs_on_rank_one, 2, timeout=30)
