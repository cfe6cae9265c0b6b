"""Callbacks: everything around a training step that is not the step itself."""

from engine.callbacks.base import Callback
from engine.callbacks.checkpoint import CheckpointCallback
from engine.callbacks.console import ConsoleCallback
from engine.callbacks.evaluation import EvalCallback
from engine.callbacks.guards import GuardCallback, GuardError, StepGuard, StragglerCallback
from engine.callbacks.preemption import PREEMPTED_EXIT_CODE, PreemptionCallback
from engine.callbacks.telemetry import Telemetry, TelemetryCallback
from engine.callbacks.throughput import ThroughputCallback
from engine.callbacks.writers import JsonlCallback, TensorBoardCallback

__all__ = ["Callback", "CheckpointCallback", "ConsoleCallback", "EvalCallback", "GuardCallback", "GuardError", "JsonlCallback", "PREEMPTED_EXIT_CODE",
           "PreemptionCallback", "StepGuard", "StragglerCallback", "TensorBoardCallback", "Telemetry",
           "TelemetryCallback", "ThroughputCallback"]
