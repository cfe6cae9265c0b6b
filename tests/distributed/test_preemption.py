"""Preemption (shared/TESTING.md R12): SIGTERM or SIGUSR1 delivered to one rank stops every rank at the same step
boundary with a complete checkpoint, and the requeued run continues like an uninterrupted one."""

import signal

import pytest

from engine.checkpoint.store import CheckpointStore
from parallel.multiprocess import run_on_ranks
from tests.distributed import ranks
from tests.distributed.test_parity import corpus, reference  # noqa: F401 (fixtures)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_signal_to_one_rank_saves_at_a_step_boundary_and_resumes(corpus, tmp_path, reference, signum):  # noqa: F811
    overrides = ["parallel.tp=2", "checkpoint.every=100", f"checkpoint.dir={tmp_path}/ckpt"]
    first = run_on_ranks(ranks.preempted_run, 2, str(corpus), str(tmp_path / "a"), overrides, (1, 2, int(signum)),
                         timeout=600)
    print(f"signal {signum.name} to rank 1 after step 2: ranks stopped at steps {[r['step'] for r in first]}")
    assert [r["step"] for r in first] == [2, 2]  # every rank stopped at the same boundary
    assert all(r["preempted"] == int(signum) for r in first)
    assert CheckpointStore(tmp_path / "ckpt").latest_step() == 2
    second = run_on_ranks(ranks.preempted_run, 2, str(corpus), str(tmp_path / "b"), overrides, None, timeout=600)
    losses = first[0]["losses"] + second[0]["losses"]
    error = max(abs(a - b) / abs(b) for a, b in zip(losses, reference["losses"]))
    print(f"requeued run finished steps 3-5; losses within {error:.2e} of the uninterrupted single process")
    assert len(losses) == 5 and error < 1e-5
