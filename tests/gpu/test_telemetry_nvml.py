"""engine/callbacks/telemetry.py against the real NVML of the GPU it runs on (benchmarks/gpu/check.sh runs it on a
lent H100; nvidia-ml-py is installed there). tests/unit/test_guards.py covers the same code against a fake pynvml;
this checks what the fake cannot: the UUID lookup, which fields the driver grants this user, the units, the XID
event registration and what a reading costs."""

import time

import pytest
import torch

from engine.callbacks.telemetry import Telemetry, describe

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
pynvml = pytest.importorskip("pynvml", reason="nvidia-ml-py is not installed")


@pytest.fixture
def telemetry():
    t = Telemetry(torch.device("cuda", torch.cuda.current_device()))
    yield t
    t.close()


def test_handle_is_this_cuda_device_by_uuid(telemetry):
    assert telemetry.enabled, telemetry.why
    uuid = pynvml.nvmlDeviceGetUUID(telemetry.handle)
    uuid = uuid.decode() if isinstance(uuid, bytes) else uuid
    assert uuid == f"GPU-{torch.cuda.get_device_properties(torch.cuda.current_device()).uuid}"


def test_reading_has_plausible_values_in_its_units(telemetry):
    torch.ones(4096, 4096, device="cuda").sum().item()  # the GPU is awake
    values = telemetry.read()
    print(values, describe(values), sorted(telemetry.readers), sep="\n")
    for name in ("gpu_sm_clock_mhz", "gpu_mem_clock_mhz", "gpu_temp_c", "gpu_power_w", "gpu_throttle_reasons"):
        assert name in values, f"{name} missing: the driver refused it or the call failed ({values})"
    assert 100 <= values["gpu_sm_clock_mhz"] <= 3000  # MHz (an H100 SXM boosts to 1980)
    assert 100 <= values["gpu_mem_clock_mhz"] <= 6000
    assert 5 <= values["gpu_temp_c"] <= 110  # degrees C
    assert 20 <= values["gpu_power_w"] <= 1500  # watts, not milliwatts
    assert values["gpu_throttle_reasons"] == int(values["gpu_throttle_reasons"]) >= 0
    if "gpu_ecc_corrected" in values:
        assert values["gpu_ecc_corrected"] >= 0 and values["gpu_ecc_uncorrected"] >= 0
    if "gpu_xid_events" in values:  # the event set registered (it may need root): a healthy GPU has none queued
        assert values["gpu_xid_events"] == 0
    assert "SM clock" in describe(values)


def test_a_reading_is_cheap_and_close_disables(telemetry):
    telemetry.read()
    start = time.perf_counter()
    for _ in range(10):
        telemetry.read()
    per_reading_ms = (time.perf_counter() - start) * 100
    print(f"one telemetry reading: {per_reading_ms:.2f} ms")  # reported, not asserted: no wall-clock limits
    telemetry.close()
    assert not telemetry.enabled and telemetry.read() == {}
