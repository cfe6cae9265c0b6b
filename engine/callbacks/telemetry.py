"""GPU telemetry through NVML (nvidia-ml-py, `import pynvml`): clocks, temperature, power, throttle reasons, ECC
error counts and XID events of this rank's GPU, as metrics (TensorBoard and metrics.jsonl through the writers)
and joined to the straggler report (engine/callbacks/guards.py).

Without a GPU, without nvidia-ml-py or when NVML does not start, `Telemetry` disables itself with one info line.
A field the device or driver does not support (or this user may not read) is dropped at its first refusal and
never asked for again; a field that fails otherwise is left out of that reading only.
"""

import math
from typing import Callable, Dict, Optional

import torch

from engine.callbacks.base import Callback

# NVML clock-event (throttle) reason bits, nvml.h nvmlClocksEventReason*/nvmlClocksThrottleReason*
THROTTLE_REASONS = {0x1: "gpu_idle", 0x2: "applications_clocks", 0x4: "sw_power_cap", 0x8: "hw_slowdown",
                    0x10: "sync_boost", 0x20: "sw_thermal", 0x40: "hw_thermal", 0x80: "hw_power_brake",
                    0x100: "display_clocks"}
_REFUSALS = ("NVML_ERROR_NOT_SUPPORTED", "NVML_ERROR_NO_PERMISSION", "NVML_ERROR_FUNCTION_NOT_FOUND")


def throttle_names(mask: int) -> str:
    names = [name for bit, name in THROTTLE_REASONS.items() if mask & bit]
    return ",".join(names) if names else "none"


def describe(t: Dict[str, float]) -> str:
    """A short text of the joined fields, for the straggler line."""
    parts = []
    if "gpu_sm_clock_mhz" in t:
        parts.append(f"SM clock {t['gpu_sm_clock_mhz']:.0f} MHz")
    if "gpu_mem_clock_mhz" in t:
        parts.append(f"memory clock {t['gpu_mem_clock_mhz']:.0f} MHz")
    if "gpu_temp_c" in t:
        parts.append(f"{t['gpu_temp_c']:.0f} C")
    if "gpu_power_w" in t:
        parts.append(f"{t['gpu_power_w']:.0f} W")
    if "gpu_throttle_reasons" in t:
        parts.append(f"throttle {throttle_names(int(t['gpu_throttle_reasons']))}")
    return ", ".join(parts)


def _field_readers(nvml) -> Dict[str, Callable]:
    """metric name -> function(handle) giving its value (the NVML call, with units converted)."""
    def throttle(handle):
        getter = getattr(nvml, "nvmlDeviceGetCurrentClocksEventReasons", None) or \
            nvml.nvmlDeviceGetCurrentClocksThrottleReasons  # renamed in newer NVML; same bits
        return getter(handle)

    def ecc(kind):
        return lambda h: nvml.nvmlDeviceGetTotalEccErrors(h, getattr(nvml, kind), nvml.NVML_VOLATILE_ECC)

    return {
        "gpu_sm_clock_mhz": lambda h: nvml.nvmlDeviceGetClockInfo(h, nvml.NVML_CLOCK_SM),
        "gpu_mem_clock_mhz": lambda h: nvml.nvmlDeviceGetClockInfo(h, nvml.NVML_CLOCK_MEM),
        "gpu_temp_c": lambda h: nvml.nvmlDeviceGetTemperature(h, nvml.NVML_TEMPERATURE_GPU),
        "gpu_power_w": lambda h: nvml.nvmlDeviceGetPowerUsage(h) / 1000.0,  # milliwatts
        "gpu_throttle_reasons": throttle,
        "gpu_ecc_corrected": ecc("NVML_MEMORY_ERROR_TYPE_CORRECTED"),  # since the driver loaded (volatile)
        "gpu_ecc_uncorrected": ecc("NVML_MEMORY_ERROR_TYPE_UNCORRECTED"),
    }


class Telemetry:
    """This rank's GPU through NVML. `enabled` is False (and `why` says why) where nothing can be read."""

    def __init__(self, device: torch.device, nvml=None):
        self.enabled, self.why = False, ""
        self.nvml, self.handle, self.readers = None, None, {}
        self.xid_events, self.last_xid = 0, 0
        self._events = None
        if device.type != "cuda":
            self.why = f"no GPU on this rank (device {device})"
            return
        if nvml is None:
            try:
                import pynvml as nvml
            except ImportError:
                self.why = "nvidia-ml-py is not installed (pip install nvidia-ml-py)"
                return
        try:
            nvml.nvmlInit()
            self.handle = self._handle(nvml, device)
        except Exception as e:  # noqa: BLE001 - NVMLError, a missing libnvidia-ml.so: telemetry is optional
            self.why = f"NVML did not start ({type(e).__name__}: {e})"
            return
        self.nvml, self.readers, self.enabled = nvml, _field_readers(nvml), True
        self._register_xid_events()

    @staticmethod
    def _handle(nvml, device: torch.device):
        """By UUID (NVML numbers GPUs physically, CUDA after CUDA_VISIBLE_DEVICES), else by CUDA index."""
        index = device.index if device.index is not None else torch.cuda.current_device()
        try:
            return nvml.nvmlDeviceGetHandleByUUID(f"GPU-{torch.cuda.get_device_properties(index).uuid}")
        except Exception:  # noqa: BLE001 - no uuid in this torch, or NVML does not know it: by index
            return nvml.nvmlDeviceGetHandleByIndex(index)

    def _refused(self, error: Exception) -> bool:
        codes = {getattr(self.nvml, name, None) for name in _REFUSALS} - {None}
        return getattr(error, "value", None) in codes

    def _register_xid_events(self) -> None:
        try:
            events = self.nvml.nvmlEventSetCreate()
            self.nvml.nvmlDeviceRegisterEvents(self.handle, self.nvml.nvmlEventTypeXidCriticalError, events)
            self._events = events
        except Exception:  # noqa: BLE001 - not supported or not permitted: XIDs are left out
            self._events = None

    def _poll_xids(self) -> None:
        """Drain the XID events NVML queued since the last reading (a zero timeout never blocks)."""
        wait = getattr(self.nvml, "nvmlEventSetWait_v2", None) or self.nvml.nvmlEventSetWait
        for _ in range(64):
            try:
                data = wait(self._events, 0)
            except Exception:  # noqa: BLE001 - NVML_ERROR_TIMEOUT: the queue is empty
                return
            self.xid_events += 1
            self.last_xid = int(data.eventData)

    def read(self) -> Dict[str, float]:
        """The readable fields now, as {metric name: value}; empty when disabled."""
        if not self.enabled:
            return {}
        out: Dict[str, float] = {}
        for name, reader in list(self.readers.items()):
            try:
                value = float(reader(self.handle))
            except Exception as e:  # noqa: BLE001 - NVMLError (or an attribute an old binding lacks)
                if self._refused(e) or isinstance(e, AttributeError):
                    del self.readers[name]
                continue
            if math.isfinite(value):
                out[name] = value
        if self._events is not None:
            self._poll_xids()
            out["gpu_xid_events"] = float(self.xid_events)
            if self.xid_events:
                out["gpu_last_xid"] = float(self.last_xid)
        return out

    def close(self) -> None:
        if self.enabled:
            try:
                if self._events is not None:
                    self.nvml.nvmlEventSetFree(self._events)
                self.nvml.nvmlShutdown()
            except Exception:  # noqa: BLE001 - shutting down telemetry never fails a run
                pass
            self.enabled = False


class TelemetryCallback(Callback):
    """Adds the telemetry fields to the step's metrics every `every` steps (rank 0's writers record them)."""

    def __init__(self, every: int, telemetry: Telemetry, say: Optional[Callable[[str], None]] = None):
        self.every, self.telemetry, self.say = every, telemetry, say

    def on_step_end(self, trainer, metrics: Dict[str, float]) -> None:
        if self.say is not None:  # once, after the console's header
            self.say(f"telemetry: NVML, every {self.every} steps" if self.telemetry.enabled
                     else f"telemetry: off, {self.telemetry.why}")
            self.say = None
        if self.telemetry.enabled and trainer.state.step % self.every == 0:
            metrics.update(self.telemetry.read())

    def on_fit_end(self, trainer) -> None:
        self.telemetry.close()
