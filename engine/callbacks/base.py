"""The callback interface. Hooks get the Trainer; on_step_end also gets the step's metrics dict, which earlier
callbacks may extend (throughput before validation before the writers: the order of the list is the order)."""

from typing import Dict


class Callback:
    def on_fit_start(self, trainer) -> None:
        pass

    def on_step_start(self, trainer) -> None:
        pass

    def on_step_end(self, trainer, metrics: Dict[str, float]) -> None:
        pass

    def on_fit_end(self, trainer) -> None:
        pass

    def on_fit_abort(self, trainer) -> None:
        """fit() is leaving by an exception: release files and threads (what was written stays written)."""
