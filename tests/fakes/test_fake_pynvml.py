"""Tests of the fake pynvml: it must behave like the real module for the calls it fakes."""

from __future__ import annotations

import ctypes
import importlib
import inspect
import os
import sys
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from .fake_pynvml import REAL, TRACE_DIR, FakeNVML, install

H200 = TRACE_DIR / "h200_x2.json"
OLD = TRACE_DIR / "old_driver.json"


@pytest.fixture
def fake() -> FakeNVML:
    f = FakeNVML.from_trace(H200)
    f.nvmlInit()
    yield f
    f.release_all()


@pytest.fixture
def old() -> FakeNVML:
    f = FakeNVML.from_trace(OLD)
    f.nvmlInit()
    return f


def _error_names() -> list[str]:
    return sorted(n for n in dir(REAL) if n.startswith("NVML_ERROR_"))


def _class_name(err_name: str) -> str:
    # Same rule as the real _extractNVMLErrorsAsClasses.
    return "NVMLError_" + "".join(w.capitalize() for w in err_name[len("NVML_ERROR_"):].split("_"))


# ----- compatibility with the real module ------------------------------------------------


def test_real_module_is_the_real_one() -> None:
    assert not isinstance(REAL, FakeNVML)
    assert REAL.__file__.endswith("pynvml.py")


def test_reexports_real_names_and_same_error_classes(fake: FakeNVML) -> None:
    assert isinstance(fake, type(sys))
    assert fake.__name__ == "pynvml"
    for name in ("NVML_TEMPERATURE_GPU", "NVML_CLOCK_SM", "NVML_CLOCK_MEM", "NVML_PCIE_UTIL_TX_BYTES",
                 "NVML_MEMORY_ERROR_TYPE_CORRECTED", "NVML_MEMORY_ERROR_TYPE_UNCORRECTED",
                 "NVML_VOLATILE_ECC", "NVML_AGGREGATE_ECC", "nvmlClocksEventReasonSwPowerCap",
                 "nvmlEventTypeXidCriticalError", "c_nvmlFieldValue_t", "c_nvmlMemory_t",
                 "NVMLError", "NVMLError_NotSupported", "NVMLLibraryMismatchError",
                 "nvmlStructToFriendlyObject"):
        assert getattr(fake, name) is getattr(REAL, name), name
    assert fake.NVML_FI_DEV_PCIE_COUNT_TX_BYTES == 197
    assert fake.NVML_FI_DEV_PCIE_COUNT_RX_BYTES == 198
    for err in _error_names():
        assert getattr(fake, _class_name(err)) is getattr(REAL, _class_name(err))


def test_control_names_do_not_shadow_real_names() -> None:
    controls = {n for n in vars(FakeNVML) if not n.startswith("_")} - set(FakeNVML.FAKED)
    controls |= {"real", "state", "calls", "device_calls", "unfaked_calls", "hangs",
                 "hang_timeout_s", "realtime"}
    assert not controls & set(vars(REAL))


def test_faked_functions_match_real_signatures(fake: FakeNVML) -> None:
    for name in FakeNVML.FAKED:
        assert name.startswith("nvml")
        real_fn = getattr(REAL, name)  # AttributeError: the fake invented a name
        real_params = list(inspect.signature(real_fn).parameters.values())
        fake_params = list(inspect.signature(getattr(fake, name)).parameters.values())
        assert [p.name for p in fake_params] == [p.name for p in real_params], name
        assert [p.default for p in fake_params] == [p.default for p in real_params], name
        assert getattr(fake, name).__self__ is fake  # bound to this fake's state


@pytest.mark.parametrize("err_name", _error_names())
def test_injected_errors_are_real_error_classes(fake: FakeNVML, err_name: str) -> None:
    code = getattr(REAL, err_name)
    fake.set_error("nvmlDeviceGetPowerUsage", err_name.removeprefix("NVML_ERROR_"), index=0)
    h = fake.nvmlDeviceGetHandleByIndex(0)
    with pytest.raises(REAL.NVMLError) as info:
        fake.nvmlDeviceGetPowerUsage(h)
    assert type(info.value) is getattr(REAL, _class_name(err_name))
    assert info.value.value == code
    assert str(info.value)  # the real __str__ must not need a loaded library
    assert fake.nvmlDeviceGetPowerUsage(fake.nvmlDeviceGetHandleByIndex(1)) == 287450


def test_errors_caught_through_either_module(fake: FakeNVML) -> None:
    fake.set_error("nvmlDeviceGetTemperature", "NOT_SUPPORTED", index=0)
    h = fake.nvmlDeviceGetHandleByIndex(0)
    with pytest.raises(REAL.NVMLError_NotSupported):
        fake.nvmlDeviceGetTemperature(h, fake.NVML_TEMPERATURE_GPU)
    try:
        fake.nvmlDeviceGetTemperature(h, fake.NVML_TEMPERATURE_GPU)
    except fake.NVMLError_NotSupported as e:
        assert e.value == REAL.NVML_ERROR_NOT_SUPPORTED


def test_unfaked_api_raises_function_not_found(fake: FakeNVML) -> None:
    with pytest.raises(REAL.NVMLError_FunctionNotFound):
        fake.nvmlDeviceGetFanSpeed(fake.nvmlDeviceGetHandleByIndex(0))
    assert fake.unfaked_calls == {"nvmlDeviceGetFanSpeed": 1}
    # helpers that are not NVML calls stay real
    assert fake.nvmlExceptionClass is REAL.nvmlExceptionClass


def test_wrong_arity_is_a_type_error(fake: FakeNVML) -> None:
    with pytest.raises(TypeError):
        fake.nvmlDeviceGetTemperature(fake.nvmlDeviceGetHandleByIndex(0))


# ----- init / shutdown ----------------------------------------------------------------------


def test_calls_before_init_are_uninitialized() -> None:
    f = FakeNVML.from_trace(H200)
    for call in (f.nvmlDeviceGetCount, f.nvmlSystemGetDriverVersion, f.nvmlShutdown,
                 lambda: f.nvmlDeviceGetHandleByIndex(0)):
        with pytest.raises(REAL.NVMLError_Uninitialized) as info:
            call()
        assert info.value.value == REAL.NVML_ERROR_UNINITIALIZED


def test_init_shutdown_refcount() -> None:
    f = FakeNVML.from_trace(H200)
    f.nvmlInit()
    f.nvmlInitWithFlags(0)
    f.nvmlShutdown()
    assert f.nvmlDeviceGetCount() == 2  # still one reference
    f.nvmlShutdown()
    with pytest.raises(REAL.NVMLError_Uninitialized):
        f.nvmlDeviceGetCount()
    with pytest.raises(REAL.NVMLError_Uninitialized):
        f.nvmlShutdown()
    assert f.calls["nvmlShutdown"] == 3


@pytest.mark.parametrize("factory, cls, code", [
    (FakeNVML.no_library, "NVMLError_LibraryNotFound", 12),
    (FakeNVML.driver_not_loaded, "NVMLError_DriverNotLoaded", 9),
])
def test_init_failures(factory, cls: str, code: int) -> None:
    f = factory()
    for init in (f.nvmlInit, lambda: f.nvmlInitWithFlags(0)):
        with pytest.raises(getattr(REAL, cls)) as info:
            init()
        assert info.value.value == code
    with pytest.raises(REAL.NVMLError_Uninitialized):
        f.nvmlDeviceGetCount()


# ----- identity -------------------------------------------------------------------------------


def test_identity(fake: FakeNVML) -> None:
    assert fake.nvmlSystemGetDriverVersion() == "570.133.20"
    assert fake.nvmlDeviceGetCount() == 2
    h = fake.nvmlDeviceGetHandleByIndex(1)
    assert isinstance(h, REAL.c_nvmlDevice_t)
    assert fake.nvmlDeviceGetIndex(h) == 1
    assert fake.nvmlDeviceGetName(h) == "NVIDIA H200"
    uuid = fake.nvmlDeviceGetUUID(h)
    assert isinstance(uuid, str) and uuid.startswith("GPU-")
    pci = fake.nvmlDeviceGetPciInfo(h)
    assert isinstance(pci, REAL.nvmlPciInfo_t)
    assert pci.busId == "00000000:2A:00.0" and isinstance(pci.busId, str)
    assert (pci.domain, pci.bus, pci.device) == (0, 0x2A, 0)
    assert pci.pciDeviceId == 0x233510DE


@pytest.mark.parametrize("bad", [2, -1, 99])
def test_bad_index_is_invalid_argument(fake: FakeNVML, bad: int) -> None:
    with pytest.raises(REAL.NVMLError_InvalidArgument):
        fake.nvmlDeviceGetHandleByIndex(bad)


@pytest.mark.parametrize("bad", [None, 0, REAL.c_nvmlDevice_t()])
def test_bad_handle_is_invalid_argument(fake: FakeNVML, bad) -> None:
    with pytest.raises(REAL.NVMLError_InvalidArgument):
        fake.nvmlDeviceGetPowerUsage(bad)


# ----- values and units -------------------------------------------------------------------


def test_utilization_and_memory(fake: FakeNVML) -> None:
    h = fake.nvmlDeviceGetHandleByIndex(0)
    util = fake.nvmlDeviceGetUtilizationRates(h)
    assert isinstance(util, REAL.c_nvmlUtilization_t)
    assert (util.gpu, util.memory) == (97, 41)
    mem = fake.nvmlDeviceGetMemoryInfo(h)
    assert isinstance(mem, REAL.c_nvmlMemory_t)
    assert mem.total == 150754820096
    assert mem.free + mem.used == mem.total
    mem2 = fake.nvmlDeviceGetMemoryInfo(h, version=REAL.nvmlMemory_v2)
    assert isinstance(mem2, REAL.c_nvmlMemory_v2_t)
    assert mem2.version == REAL.nvmlMemory_v2
    assert mem2.free + mem2.used + mem2.reserved == mem2.total


def test_power_and_energy(fake: FakeNVML) -> None:
    h = fake.nvmlDeviceGetHandleByIndex(0)
    assert fake.nvmlDeviceGetPowerUsage(h) == 300123  # mW
    assert fake.nvmlDeviceGetEnforcedPowerLimit(h) == 700000  # mW
    e0 = fake.nvmlDeviceGetTotalEnergyConsumption(h)
    assert isinstance(e0, int)
    assert fake.nvmlDeviceGetTotalEnergyConsumption(h) == e0  # fake clock did not move
    fake.state.devices[0]["power_mw"] = 250000
    fake.advance(2.0)
    assert fake.nvmlDeviceGetPowerUsage(h) == 250000
    assert fake.nvmlDeviceGetTotalEnergyConsumption(h) - e0 == 500000  # 250 W * 2 s = 500 J


def test_realtime_energy_follows_monotonic_clock() -> None:
    f = FakeNVML.from_trace(H200, realtime=True)
    f.nvmlInit()
    h = f.nvmlDeviceGetHandleByIndex(0)
    e0 = f.nvmlDeviceGetTotalEnergyConsumption(h)
    time.sleep(0.05)
    e1 = f.nvmlDeviceGetTotalEnergyConsumption(h)
    assert 300123 * 0.04 < e1 - e0 < 300123 * 1.0


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 1_000_000), st.floats(0, 100)), max_size=20))
def test_energy_is_monotonic_integral_of_power(steps: list[tuple[int, float]]) -> None:
    f = FakeNVML.from_trace(H200)
    f.nvmlInit()
    h = f.nvmlDeviceGetHandleByIndex(1)
    start = last = f.nvmlDeviceGetTotalEnergyConsumption(h)
    expected = float(start)
    for power_mw, dt in steps:
        f.state.devices[1]["power_mw"] = power_mw
        f.advance(dt)
        expected += power_mw * dt
        now = f.nvmlDeviceGetTotalEnergyConsumption(h)
        assert now >= last
        last = now
    assert abs(last - expected) <= 1


def test_temperature_and_clocks(fake: FakeNVML) -> None:
    h = fake.nvmlDeviceGetHandleByIndex(0)
    assert fake.nvmlDeviceGetTemperature(h, REAL.NVML_TEMPERATURE_GPU) == 52
    with pytest.raises(REAL.NVMLError_InvalidArgument):
        fake.nvmlDeviceGetTemperature(h, 7)
    assert fake.nvmlDeviceGetClockInfo(h, REAL.NVML_CLOCK_SM) == 1980
    assert fake.nvmlDeviceGetClockInfo(h, REAL.NVML_CLOCK_MEM) == 3201
    assert fake.nvmlDeviceGetClockInfo(h, type=REAL.NVML_CLOCK_GRAPHICS) == 1980
    del fake.state.devices[0]["clocks_mhz"]["video"]
    with pytest.raises(REAL.NVMLError_NotSupported):
        fake.nvmlDeviceGetClockInfo(h, REAL.NVML_CLOCK_VIDEO)


def test_clock_event_reasons(fake: FakeNVML) -> None:
    h = fake.nvmlDeviceGetHandleByIndex(0)
    assert fake.nvmlDeviceGetCurrentClocksEventReasons(h) == 0
    mask = REAL.nvmlClocksEventReasonSwPowerCap | REAL.nvmlClocksEventReasonHwThermalSlowdown
    fake.state.devices[0]["clocks_event_reasons"] = mask
    assert fake.nvmlDeviceGetCurrentClocksEventReasons(h) == mask
    assert fake.nvmlDeviceGetCurrentClocksThrottleReasons(h) == mask


def test_field_values(fake: FakeNVML) -> None:
    h = fake.nvmlDeviceGetHandleByIndex(0)
    tx, rx, mem_temp = REAL.NVML_FI_DEV_PCIE_COUNT_TX_BYTES, REAL.NVML_FI_DEV_PCIE_COUNT_RX_BYTES, \
        REAL.NVML_FI_DEV_MEMORY_TEMP
    vals = fake.nvmlDeviceGetFieldValues(h, [tx, (rx, 0), REAL.NVML_FI_DEV_NVLINK_BANDWIDTH_C0_TOTAL])
    assert isinstance(vals, ctypes.Array) and len(vals) == 3
    assert all(isinstance(v, REAL.c_nvmlFieldValue_t) for v in vals)
    assert [v.fieldId for v in vals] == [197, 198, REAL.NVML_FI_DEV_NVLINK_BANDWIDTH_C0_TOTAL]
    assert vals[0].nvmlReturn == vals[1].nvmlReturn == REAL.NVML_SUCCESS
    assert vals[0].valueType == REAL.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG
    assert vals[0].value.ullVal == 48213377280
    assert vals[2].nvmlReturn == REAL.NVML_ERROR_NOT_SUPPORTED  # per field, call succeeded
    fake.advance(1.0)  # cumulative byte counters grow at the PCIe throughput rate
    again = fake.nvmlDeviceGetFieldValues(h, [tx, rx, mem_temp])
    assert again[0].value.ullVal - vals[0].value.ullVal == 152000 * 1024
    assert again[1].value.ullVal - vals[1].value.ullVal == 1840000 * 1024
    assert again[2].value.ullVal == 61
    assert again[0].timestamp == fake.state.now_us
    fake.state.devices[0]["fields"][mem_temp] = "NO_PERMISSION"
    assert fake.nvmlDeviceGetFieldValues(h, [mem_temp])[0].nvmlReturn == REAL.NVML_ERROR_NO_PERMISSION


def test_pcie_throughput_and_ecc(fake: FakeNVML) -> None:
    h = fake.nvmlDeviceGetHandleByIndex(0)
    assert fake.nvmlDeviceGetPcieThroughput(h, REAL.NVML_PCIE_UTIL_TX_BYTES) == 152000
    assert fake.nvmlDeviceGetPcieThroughput(h, REAL.NVML_PCIE_UTIL_RX_BYTES) == 1840000
    with pytest.raises(REAL.NVMLError_InvalidArgument):
        fake.nvmlDeviceGetPcieThroughput(h, 9)
    ecc = fake.nvmlDeviceGetTotalEccErrors
    assert ecc(h, REAL.NVML_MEMORY_ERROR_TYPE_CORRECTED, REAL.NVML_AGGREGATE_ECC) == 3
    assert ecc(h, REAL.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, REAL.NVML_VOLATILE_ECC) == 0
    fake.state.devices[0]["ecc"]["volatile"]["uncorrected"] = 2
    assert ecc(h, REAL.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, REAL.NVML_VOLATILE_ECC) == 2


# ----- processes ----------------------------------------------------------------------------


def test_compute_processes(fake: FakeNVML) -> None:
    h = fake.nvmlDeviceGetHandleByIndex(0)
    procs = fake.nvmlDeviceGetComputeRunningProcesses(h)
    assert len(procs) == 1
    assert isinstance(procs[0], REAL.nvmlFriendlyObject)
    assert (procs[0].pid, procs[0].usedGpuMemory) == (31337, 118111600640)
    fake.set_processes(0, [{"pid": os.getpid(), "used_gpu_memory": None, "sm_util": 5}])
    procs = fake.nvmlDeviceGetComputeRunningProcesses(h)
    assert procs[0].pid == os.getpid() and procs[0].usedGpuMemory is None
    fake.set_processes(0, [])
    assert fake.nvmlDeviceGetComputeRunningProcesses(h) == []


def test_self_pid_in_trace() -> None:
    f = FakeNVML.from_trace({"devices": [{"processes": [{"pid": "self", "used_gpu_memory": 1}]}]})
    f.nvmlInit()
    assert f.nvmlDeviceGetComputeRunningProcesses(f.nvmlDeviceGetHandleByIndex(0))[0].pid == os.getpid()


def test_process_utilization_samples(fake: FakeNVML) -> None:
    h = fake.nvmlDeviceGetHandleByIndex(0)
    samples = fake.nvmlDeviceGetProcessUtilization(h, 0)
    assert isinstance(samples, list) and len(samples) == 1
    s = samples[0]
    assert isinstance(s, REAL.c_nvmlProcessUtilizationSample_t)
    assert (s.pid, s.smUtil, s.memUtil, s.encUtil, s.decUtil) == (31337, 95, 40, 0, 0)
    assert s.timeStamp == fake.state.now_us  # µs since the epoch
    with pytest.raises(REAL.NVMLError_NotFound):  # nothing newer than what we saw
        fake.nvmlDeviceGetProcessUtilization(h, s.timeStamp)
    fake.state.devices[0]["processes"][0]["pid"] = os.getpid()
    fake.advance(0.5)
    (s2,) = fake.nvmlDeviceGetProcessUtilization(h, s.timeStamp)
    assert s2.timeStamp - s.timeStamp == 500_000 and s2.pid == os.getpid()
    fake.set_processes(0, [])
    with pytest.raises(REAL.NVMLError_NotFound):
        fake.nvmlDeviceGetProcessUtilization(h, 0)


# ----- events -------------------------------------------------------------------------------


def test_xid_events(fake: FakeNVML) -> None:
    es = fake.nvmlEventSetCreate()
    assert isinstance(es, REAL.c_nvmlEventSet_t)
    h1 = fake.nvmlDeviceGetHandleByIndex(1)
    assert fake.inject_xid(1, 79) == 0  # nobody registered: dropped, like the driver
    fake.nvmlDeviceRegisterEvents(h1, REAL.nvmlEventTypeXidCriticalError, es)
    with pytest.raises(REAL.NVMLError_Timeout):
        fake.nvmlEventSetWait_v2(es, 0)
    assert fake.inject_xid(1, 79) == 1
    assert fake.inject_xid(0, 48) == 0  # device 0 not registered
    data = fake.nvmlEventSetWait_v2(es, 1000)
    assert isinstance(data, REAL.c_nvmlEventData_t)
    assert fake.nvmlDeviceGetIndex(data.device) == 1
    assert data.eventType == REAL.nvmlEventTypeXidCriticalError
    assert data.eventData == 79
    fake.nvmlEventSetFree(es)
    with pytest.raises(REAL.NVMLError_InvalidArgument):
        fake.nvmlEventSetWait_v2(es, 0)


def test_event_wait_blocks_until_injected(fake: FakeNVML) -> None:
    es = fake.nvmlEventSetCreate()
    fake.nvmlDeviceRegisterEvents(fake.nvmlDeviceGetHandleByIndex(0),
                                  REAL.nvmlEventTypeXidCriticalError, es)
    threading.Timer(0.05, fake.inject_xid, args=(0, 31)).start()
    t0 = time.monotonic()
    data = fake.nvmlEventSetWait(es, 5000)
    assert data.eventData == 31 and time.monotonic() - t0 < 4
    t0 = time.monotonic()
    with pytest.raises(REAL.NVMLError_Timeout):
        fake.nvmlEventSetWait_v2(es, 50)
    assert time.monotonic() - t0 >= 0.04  # really waited, so a polling loop does not spin


# ----- errors, hangs, call counts -------------------------------------------------------------


def test_old_driver_trace(old: FakeNVML) -> None:
    h = old.nvmlDeviceGetHandleByIndex(0)
    assert old.nvmlDeviceGetName(h) == "Tesla T4"
    assert old.nvmlSystemGetDriverVersion() == "418.226.00"
    expect = {
        "nvmlDeviceGetTotalEnergyConsumption": ((h,), REAL.NVMLError_FunctionNotFound),
        "nvmlDeviceGetFieldValues": ((h, [197, 198]), REAL.NVMLError_FunctionNotFound),
        "nvmlDeviceGetCurrentClocksEventReasons": ((h,), REAL.NVMLError_FunctionNotFound),
        "nvmlDeviceGetTotalEccErrors": ((h, 0, 0), REAL.NVMLError_NotSupported),
        "nvmlDeviceGetProcessUtilization": ((h, 0), REAL.NVMLError_NotSupported),
    }
    for name, (args, cls) in expect.items():
        with pytest.raises(REAL.NVMLError) as info:
            getattr(old, name)(*args)
        assert type(info.value) is cls, name
        assert old.calls[name] == 1
    # the older entry points still work
    assert old.nvmlDeviceGetCurrentClocksThrottleReasons(h) == REAL.nvmlClocksEventReasonSwPowerCap
    assert old.nvmlDeviceGetPcieThroughput(h, REAL.NVML_PCIE_UTIL_RX_BYTES) == 310000
    assert old.nvmlDeviceGetPowerUsage(h) == 41250


def test_function_not_found_on_unversioned_process_call_is_mismatch(old: FakeNVML) -> None:
    old.set_error("nvmlDeviceGetComputeRunningProcesses", "FUNCTION_NOT_FOUND", index=0)
    with pytest.raises(REAL.NVMLLibraryMismatchError):
        old.nvmlDeviceGetComputeRunningProcesses(old.nvmlDeviceGetHandleByIndex(0))


def test_set_and_clear_errors(fake: FakeNVML) -> None:
    h0, h1 = fake.nvmlDeviceGetHandleByIndex(0), fake.nvmlDeviceGetHandleByIndex(1)
    fake.set_error("*", "GPU_IS_LOST", index=1)
    with pytest.raises(REAL.NVMLError_GpuIsLost):
        fake.nvmlDeviceGetUtilizationRates(h1)
    assert fake.nvmlDeviceGetUtilizationRates(h0).gpu == 97
    fake.clear_error("*", index=1)
    fake.set_error("nvmlDeviceGetCount", REAL.NVML_ERROR_UNKNOWN)  # system-wide, int code
    with pytest.raises(REAL.NVMLError_Unknown):
        fake.nvmlDeviceGetCount()
    fake.clear_error("nvmlDeviceGetCount")
    assert fake.nvmlDeviceGetCount() == 2
    assert fake.nvmlDeviceGetUtilizationRates(h1).gpu == 94


def test_call_counts(fake: FakeNVML) -> None:
    h = fake.nvmlDeviceGetHandleByIndex(0)
    for _ in range(3):
        fake.nvmlDeviceGetPowerUsage(h)
    fake.nvmlDeviceGetPowerUsage(fake.nvmlDeviceGetHandleByIndex(1))
    assert fake.calls["nvmlDeviceGetPowerUsage"] == 4
    assert fake.device_calls[("nvmlDeviceGetPowerUsage", 0)] == 3
    assert fake.calls["nvmlDeviceGetHandleByIndex"] == 2
    assert fake.calls["nvmlDeviceGetTemperature"] == 0


def test_hang_blocks_only_that_call(fake: FakeNVML) -> None:
    h0 = fake.nvmlDeviceGetHandleByIndex(0)
    hang = fake.hang("nvmlDeviceGetPowerUsage", index=0)
    result: list[int] = []
    t = threading.Thread(target=lambda: result.append(fake.nvmlDeviceGetPowerUsage(h0)), daemon=True)
    t.start()
    assert hang.entered.wait(2)
    t.join(0.1)
    assert t.is_alive() and not result
    # other calls, other devices and other threads keep working meanwhile
    assert fake.nvmlDeviceGetPowerUsage(fake.nvmlDeviceGetHandleByIndex(1)) == 287450
    assert fake.nvmlDeviceGetTemperature(h0, 0) == 52
    hang.release()
    t.join(2)
    assert result == [300123]
    assert fake.nvmlDeviceGetPowerUsage(h0) == 300123  # released hangs do not come back


def test_hang_any_device_and_init() -> None:
    f = FakeNVML.from_trace(H200)
    f.hang_timeout_s = 0.05  # the safety net lets a forgotten hang through
    f.hang("nvmlInit")
    t0 = time.monotonic()
    f.nvmlInit()
    assert time.monotonic() - t0 >= 0.04
    f.release_all()
    assert f.nvmlDeviceGetCount() == 2


# ----- loading and installing ----------------------------------------------------------------


def test_trace_files_load() -> None:
    h200 = FakeNVML.from_trace("h200_x2")  # name shortcut into TRACE_DIR
    h200.nvmlInit()
    assert [h200.nvmlDeviceGetPciInfo(h200.nvmlDeviceGetHandleByIndex(i)).busId for i in range(2)] \
        == ["00000000:18:00.0", "00000000:2A:00.0"]
    assert FakeNVML.from_trace(OLD).state.devices[0]["name"] == "Tesla T4"


def test_from_dict_does_not_mutate_input() -> None:
    trace = {"devices": [{"power_mw": 1, "fields": {"197": 5}}]}
    f = FakeNVML.from_trace(trace)
    f.state.devices[0]["power_mw"] = 2
    assert trace == {"devices": [{"power_mw": 1, "fields": {"197": 5}}]}
    assert f.state.devices[0]["fields"] == {197: 5}


def test_install(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeNVML.from_trace(H200)
    holder = type(sys)("holder")
    holder.pynvml = REAL
    assert install(monkeypatch, fake, holder) is fake
    import pynvml

    assert pynvml is fake and holder.pynvml is fake
    assert importlib.import_module("pynvml") is fake
    pynvml.nvmlInit()
    from pynvml import nvmlDeviceGetCount  # noqa: PLC0415

    assert nvmlDeviceGetCount() == 2
    monkeypatch.undo()
    assert sys.modules["pynvml"] is REAL and holder.pynvml is REAL
