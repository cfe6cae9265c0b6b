"""PreemptionCallback leaves the process's signals as it found them, whether fit ends or aborts: the handlers it
installed are replaced by the previous ones, and signals it unblocked (a rank of `herd launch --nproc` starts
with SIGTERM and SIGUSR1 blocked, launch/local.py) are blocked again, so a rank hung while it aborts does not
swallow the launcher's SIGTERM, and no stale handler outlives a fit in one process."""

import signal

import pytest
import torch

from engine.callbacks.base import Callback
from engine.callbacks.preemption import PreemptionCallback
from engine.trainer import Trainer, TrainState
from tests.helpers import StepsFailingAt, StubLoader

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class _Seen(Callback):
    """What the signals were while the fit trained (so the test shows the callback did change them)."""

    def on_step_end(self, trainer, metrics) -> None:
        self.handlers = {sig: signal.getsignal(sig) for sig in SIGNALS}
        self.blocked = set(SIGNALS) & signal.pthread_sigmask(signal.SIG_BLOCK, [])


def _previous(signum, frame) -> None:
    pass


@pytest.mark.parametrize("start_blocked", [True, False], ids=["launched_rank", "one_process"])
@pytest.mark.parametrize("fail_at", [2, 99], ids=["aborted", "ended"])
def test_fit_restores_handlers_and_mask(start_blocked, fail_at):
    handlers = {sig: signal.getsignal(sig) for sig in SIGNALS}
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    try:
        for sig in SIGNALS:
            signal.signal(sig, _previous)
        signal.pthread_sigmask(signal.SIG_BLOCK if start_blocked else signal.SIG_UNBLOCK, SIGNALS)
        seen = _Seen()
        trainer = Trainer(StepsFailingAt(fail_at), StubLoader(), TrainState(total_steps=3), torch.device("cpu"),
                          [PreemptionCallback(), seen])
        if fail_at == 2:
            with pytest.raises(RuntimeError, match="the step failed"):
                trainer.fit()
        else:
            trainer.fit()
        assert all(handler != _previous for handler in seen.handlers.values()) and seen.blocked == set()
        assert {sig: signal.getsignal(sig) for sig in SIGNALS} == {sig: _previous for sig in SIGNALS}
        blocked = set(SIGNALS) & signal.pthread_sigmask(signal.SIG_BLOCK, [])
        assert blocked == (set(SIGNALS) if start_blocked else set())
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
