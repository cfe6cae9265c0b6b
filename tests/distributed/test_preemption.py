"""Preemption (shared/TESTING.md R12): SIGTERM or SIGUSR1 delivered to one rank stops every rank at the same step
boundary with a complete checkpoint, and the requeued run continues like an uninterrupted one."""

import signal

import pytest

from engine.checkpoint.store import CheckpointStore
from parallel.multiprocess import run_on_ranks
from tests.distributed import ranks
from tests.distributed.test_parity import corpus, reference  # noqa: F401 (fixtures)


@pytest.mark.parametrize("signum,save", [(signal.SIGTERM, "sync"), (signal.SIGUSR1, "async")])
def test_signal_to_one_rank_saves_at_a_step_boundary_and_resumes(corpus, tmp_path, reference, signum,  # noqa: F811
                                                                 save):
    overrides = ["parallel.tp=2", "checkpoint.every=2", f"checkpoint.dir={tmp_path}/ckpt",
                 f"checkpoint.async_save={str(save == 'async').lower()}"]
    first = run_on_ranks(ranks.preempted_run, 2, str(corpus), str(tmp_path / "a"), overrides, (1, 3, int(signum)),
                         timeout=600)
    print(f"signal {signum.name} to rank 1 after step 3 ({save} saves every 2 steps): ranks stopped at steps "
          f"{[r['step'] for r in first]}")
    assert [r["step"] for r in first] == [3, 3]  # every rank stopped at the same boundary
    assert all(r["preempted"] == int(signum) for r in first)
    assert CheckpointStore(tmp_path / "ckpt").complete_steps() == [2, 3]
    second = run_on_ranks(ranks.preempted_run, 2, str(corpus), str(tmp_path / "b"), overrides, None, timeout=600)
    losses = first[0]["losses"] + second[0]["losses"]
    error = max(abs(a - b) / abs(b) for a, b in zip(losses, reference["losses"]))
    print(f"requeued run finished steps 4-5; losses within {error:.2e} of the uninterrupted single process")
    assert len(losses) == 5 and error < 1e-5
