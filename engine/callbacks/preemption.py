"""Preemption (SLURM sends SIGTERM, or SIGUSR1 ahead of the time limit with `--signal=USR1@<s>`): a signal
delivered to any rank makes every rank stop at the same step boundary; the checkpoint callback then saves, and
`herd train` exits with PREEMPTED_EXIT_CODE so the launch script can requeue (the requeued job resumes by itself).

The handler only sets a flag. At each step end the flag is reduced over all ranks (a MAX all-reduce of one
integer), so ranks agree even when the signal reached one of them only, or reached them at different moments.
"""

import signal

import torch
import torch.distributed as dist

from engine.callbacks.base import Callback

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL (sysexits.h): a temporary failure, try again


class PreemptionCallback(Callback):
    def __init__(self, signals=(signal.SIGTERM, signal.SIGUSR1), device: torch.device = torch.device("cpu")):
        self.signals, self.device = signals, device
        self.received = 0
        self._previous = {}
        self._unblocked = set()

    def _handle(self, signum, frame) -> None:
        self.received = int(signum)

    def on_fit_start(self, trainer) -> None:
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        # `herd launch --nproc` starts its ranks with these signals blocked (launch/local.py): one sent during
        # start-up is pending and reaches the handler now; after fit they are blocked again, so a rank that has
        # saved or finished is not killed on its way out
        self._unblocked = set(self.signals) & signal.pthread_sigmask(signal.SIG_UNBLOCK, self.signals)

    def on_step_end(self, trainer, metrics) -> None:
        flag = torch.tensor([self.received], device=self.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if int(flag.item()):
            trainer.state.stop_requested = True
            trainer.state.preempted = int(flag.item())

    def on_fit_end(self, trainer) -> None:
        self._restore()

    def on_fit_abort(self, trainer) -> None:
        # as after a fit that ended: a rank that hangs while it aborts then blocks the launcher's SIGTERM, so the
        # launcher kills it at once (launch/local.py) instead of the handler swallowing it for FAILURE_GRACE_S;
        # in one process (tests), no handler of this callback outlives its fit
        self._restore()

    def _restore(self) -> None:
        """The signal mask and the handlers as they were before on_fit_start (once: nothing is left to restore)."""
        if self._unblocked:
            signal.pthread_sigmask(signal.SIG_BLOCK, self._unblocked)
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._unblocked, self._previous = set(), {}
