"""Saves a checkpoint every `every` steps and at the end of the run (every rank takes part: saving is a
collective), and waits at the end for a background save to commit."""

from engine.callbacks.base import Callback


class CheckpointCallback(Callback):
    def __init__(self, checkpointer, every: int, announce=None):
        self.checkpointer, self.every, self.announce = checkpointer, every, announce
        self.last_saved = -1

    def _save(self, trainer) -> None:
        path = self.checkpointer.save(trainer.state.step)
        self.last_saved = trainer.state.step
        if self.announce is not None:
            mode = "writing in the background" if self.checkpointer.async_save else "saved"
            self.announce(f"checkpoint {mode}: {path} (training blocked {self.checkpointer.last_blocking_s:.2f} s)")

    def on_fit_start(self, trainer) -> None:
        self.last_saved = trainer.state.step  # a resumed run's step is saved already

    def on_step_end(self, trainer, metrics) -> None:
        # a guard's rollback (engine/callbacks/guards.py) returns to the step saved last: never save it twice
        if self.every > 0 and trainer.state.step % self.every == 0 and trainer.state.step != self.last_saved:
            self._save(trainer)

    def on_fit_end(self, trainer) -> None:
        try:
            if self.every > 0 and trainer.state.step != self.last_saved and trainer.state.step > 0:
                self._save(trainer)
            self.checkpointer.wait()  # the run ends (or is preempted) only with its last checkpoint committed
        finally:  # a failed save too: the directory's lock goes, another run (or this process's next) may take it
            self.checkpointer.release()

    def on_fit_abort(self, trainer) -> None:
        self.checkpointer.release()  # kept while a background save still writes (the process's end drops it)
