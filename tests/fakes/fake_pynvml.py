"""A fake ``pynvml`` module, driven by a JSON trace (hand-written until a lent GPU records one), for tests without a GPU.

Usage::

    from tests.fakes.fake_pynvml import FakeNVML, TRACE_DIR, install

    fake = FakeNVML.from_trace(TRACE_DIR / "h200_x2.json")
    install(monkeypatch, fake)              # sys.modules["pynvml"] = fake
    fake.state.devices[0]["power_mw"] = 250000
    fake.advance(1.0)                       # energy += power * 1 s, new process samples
    fake.set_error("nvmlDeviceGetPowerUsage", "GPU_IS_LOST", index=1)
    h = fake.hang("nvmlDeviceGetUtilizationRates", index=0); ...; h.release()
    fake.inject_xid(0, 79)
    assert fake.calls["nvmlDeviceGetTotalEnergyConsumption"] == 1

The fake is a ``types.ModuleType`` holding every name of the real ``pynvml`` (constants,
ctypes structs, and the very same ``NVMLError`` / ``NVMLError_*`` classes, so
``except pynvml.NVMLError_NotSupported`` works whichever module the code imported).
The NVML calls listed in ``FakeNVML.FAKED`` are replaced by fakes with the real names,
parameters, return types and units. Every other ``nvml*`` API function raises
``NVMLError_FunctionNotFound`` (as with a driver that lacks the symbol) and is counted in
``fake.unfaked_calls``, so a test can never reach a real GPU by accident.

Trace format (JSON; every value key is optional: a missing value means the device does
not support it and the call raises NVMLError_NotSupported)::

    {
      "driver_version": "570.133.20",
      "start_time_s": 1735689600.0,     # fake clock start (epoch s), for µs timestamps
      "init_error": null,               # e.g. "LIBRARY_NOT_FOUND", "DRIVER_NOT_LOADED"
      "errors": {"nvmlEventSetCreate": "NOT_SUPPORTED"},   # system-wide, by function
      "devices": [{
        "name": "NVIDIA H200", "uuid": "GPU-...",
        "pci": {"bus_id": "00000000:18:00.0", "device_id": "0x233510DE",
                "subsystem_id": "0x18BE10DE"},
        "utilization": {"gpu": 97, "memory": 41},                 # percent
        "memory": {"total": 150754820096, "used": 121634078720,   # bytes; free =
                   "reserved": 597688320},                        # total - used
        "power_mw": 300123, "power_limit_mw": 700000,
        "energy_mj": 8412345678,                                  # total since driver load
        "temperature_c": 52,                                      # NVML_TEMPERATURE_GPU
        "clocks_mhz": {"graphics": 1980, "sm": 1980, "mem": 3201, "video": 1755},
        "clocks_event_reasons": 0,                                # nvmlClocksEventReason* mask
        "pcie_throughput_kbps": {"tx": 152000, "rx": 1840000},    # KB/s
        "fields": {"NVML_FI_DEV_PCIE_COUNT_TX_BYTES": 123,        # key: NVML_FI_* name or id;
                   "NVML_FI_DEV_MEMORY_TEMP": "NOT_SUPPORTED"},   # value: number or error
        "ecc": {"volatile": {"corrected": 0, "uncorrected": 0},
                "aggregate": {"corrected": 3, "uncorrected": 0}},
        "processes": [{"pid": 31337, "used_gpu_memory": 118111600640,  # bytes or null
                       "sm_util": 95, "mem_util": 40,                  # null: no util sample
                       "enc_util": 0, "dec_util": 0}],                 # pid "self": os.getpid()
        "errors": {"nvmlDeviceGetTotalEnergyConsumption": "FUNCTION_NOT_FOUND",
                   "*": "GPU_IS_LOST"}      # "*" applies to every call on this device
      }]
    }

Error codes are NVML_ERROR_* names without the prefix ("NOT_SUPPORTED") or ints.
After loading, ``fake.state.devices`` holds these dicts with "fields" keyed by int id;
tests mutate them directly between samples.
"""

from __future__ import annotations

import collections
import copy
import ctypes
import functools
import importlib
import inspect
import json
import os
import sys
import threading
import time
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

TRACE_DIR = Path(__file__).resolve().parents[1] / "data" / "nvml"


def _load_real_pynvml() -> types.ModuleType:
    # If a fake is already installed, import_module would hand back the fake.
    current = sys.modules.get("pynvml")
    real = getattr(current, "real", None)
    if isinstance(real, types.ModuleType):
        return real
    return importlib.import_module("pynvml")


REAL: types.ModuleType = _load_real_pynvml()

# Fake opaque pointers: never dereferenced, only compared by address.
_HANDLE_BASE = 0x7E57_0000_0000
_EVENT_SET_BASE = 0x7E58_0000_0000
_STRIDE = 0x1000
_NO_INSTANCE = 0xFFFFFFFF  # gpuInstanceId/computeInstanceId outside MIG

# nvml*-named helpers of the real module that are not NVML API calls: keep them real.
_REAL_HELPERS = {"nvmlExceptionClass", "nvmlFriendlyObjectToStruct", "nvmlStructToFriendlyObject"}
# Real wrappers decorated with throwOnVersionMismatch (FunctionNotFound -> mismatch error).
_VERSIONED = {"nvmlDeviceGetComputeRunningProcesses"}


def error_code(code: int | str) -> int:
    """'NOT_SUPPORTED' / 'NVML_ERROR_NOT_SUPPORTED' / 3 -> 3."""
    if isinstance(code, int):
        return code
    name = code.upper()
    if not name.startswith("NVML_ERROR_"):
        name = "NVML_ERROR_" + name
    return int(getattr(REAL, name))


def _field_id(key: int | str) -> int:
    if isinstance(key, int):
        return key
    return int(key) if key.isdigit() else int(getattr(REAL, key))


def _api(device: bool = True, init: bool = True) -> Callable:
    """Common prologue of every fake NVML call: count, hang, init check, handle, errors."""

    def deco(fn: Callable) -> Callable:
        sig = inspect.signature(fn)
        first = list(sig.parameters)[1] if device else None

        @functools.wraps(fn)
        def wrapper(self: FakeNVML, *args: Any, **kwargs: Any) -> Any:
            bound = sig.bind(self, *args, **kwargs)  # TypeError on a bad arity, like real
            name = fn.__name__
            index = self.handle_index(bound.arguments[first]) if first else None
            self._enter(name, index)
            if init and self.state.init_count == 0:
                raise REAL.NVMLError(REAL.NVML_ERROR_UNINITIALIZED)
            if device and index is None:
                raise REAL.NVMLError(REAL.NVML_ERROR_INVALID_ARGUMENT)
            self._check_error(name, index)
            return fn(self, *args, **kwargs)

        wrapper._fake_api = True  # type: ignore[attr-defined]
        return wrapper

    return deco


@dataclass
class Hang:
    """A blocked NVML call: `entered` is set once a call blocks; `release()` frees it."""

    entered: threading.Event = field(default_factory=threading.Event)
    released: threading.Event = field(default_factory=threading.Event)

    def release(self) -> None:
        self.released.set()


@dataclass
class _EventSet:
    registered: dict[int, int] = field(default_factory=dict)  # device index -> event mask
    queue: collections.deque = field(default_factory=collections.deque)  # (index, type, data)
    freed: bool = False


@dataclass
class FakeState:
    driver_version: str
    devices: list[dict[str, Any]]
    errors: dict[str, int | str] = field(default_factory=dict)
    init_error: int | str | None = None
    init_count: int = 0
    now_s: float = 1735689600.0  # fake clock, epoch seconds

    @property
    def now_us(self) -> int:
        return int(self.now_s * 1_000_000)


class FakeNVML(types.ModuleType):
    """A pynvml stand-in. Instances are modules; see the module docstring."""

    FAKED: tuple[str, ...] = (
        "nvmlInit", "nvmlInitWithFlags", "nvmlShutdown", "nvmlErrorString",
        "nvmlSystemGetDriverVersion", "nvmlDeviceGetCount", "nvmlDeviceGetHandleByIndex",
        "nvmlDeviceGetIndex", "nvmlDeviceGetName", "nvmlDeviceGetUUID", "nvmlDeviceGetPciInfo",
        "nvmlDeviceGetUtilizationRates", "nvmlDeviceGetMemoryInfo", "nvmlDeviceGetPowerUsage",
        "nvmlDeviceGetEnforcedPowerLimit", "nvmlDeviceGetTotalEnergyConsumption",
        "nvmlDeviceGetTemperature", "nvmlDeviceGetClockInfo",
        "nvmlDeviceGetCurrentClocksEventReasons", "nvmlDeviceGetCurrentClocksThrottleReasons",
        "nvmlDeviceGetFieldValues", "nvmlDeviceGetPcieThroughput", "nvmlDeviceGetTotalEccErrors",
        "nvmlEventSetCreate", "nvmlDeviceRegisterEvents", "nvmlEventSetWait_v2",
        "nvmlEventSetWait", "nvmlEventSetFree", "nvmlDeviceGetComputeRunningProcesses",
        "nvmlDeviceGetProcessUtilization",
    )

    def __init__(self, trace: dict[str, Any], realtime: bool = False) -> None:
        super().__init__("pynvml", REAL.__doc__)
        for key, value in vars(REAL).items():
            if not key.startswith("__"):
                self.__dict__[key] = value
        self.real = REAL
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self.calls: collections.Counter[str] = collections.Counter()
        self.device_calls: collections.Counter[tuple[str, int | None]] = collections.Counter()
        self.unfaked_calls: collections.Counter[str] = collections.Counter()
        self.hangs: dict[tuple[str, int | None], Hang] = {}
        self.hang_timeout_s = 30.0  # safety net so a forgotten hang cannot block pytest forever
        self.realtime = realtime  # True: energy/samples follow time.monotonic between calls
        self._last_mono = time.monotonic()
        self._event_sets: dict[int, _EventSet] = {}
        self.state = self._parse(copy.deepcopy(trace))
        for name, value in vars(REAL).items():
            if name.startswith("nvml") and inspect.isfunction(value) and name not in _REAL_HELPERS:
                self.__dict__[name] = self._unfaked(name)
        for name in self.FAKED:
            self.__dict__[name] = types.MethodType(getattr(type(self), name), self)

    # ----- construction -------------------------------------------------------------

    @classmethod
    def from_trace(cls, trace: str | Path | dict[str, Any], realtime: bool = False) -> FakeNVML:
        if not isinstance(trace, dict):
            path = Path(trace)
            if not path.exists() and (TRACE_DIR / path.with_suffix(".json").name).exists():
                path = TRACE_DIR / path.with_suffix(".json").name
            trace = json.loads(path.read_text())
        return cls(trace, realtime=realtime)

    @classmethod
    def no_library(cls) -> FakeNVML:
        """nvmlInit raises NVMLError_LibraryNotFound (no libnvidia-ml.so)."""
        return cls({"init_error": "LIBRARY_NOT_FOUND", "devices": []})

    @classmethod
    def driver_not_loaded(cls) -> FakeNVML:
        """nvmlInit raises NVMLError_DriverNotLoaded (library present, kernel module not)."""
        return cls({"init_error": "DRIVER_NOT_LOADED", "devices": []})

    def _parse(self, trace: dict[str, Any]) -> FakeState:
        state = FakeState(
            driver_version=trace.get("driver_version", "570.133.20"),
            devices=trace.get("devices", []),
            errors=trace.get("errors", {}),
            init_error=trace.get("init_error"),
            now_s=float(trace.get("start_time_s", 1735689600.0)),
        )
        for dev in state.devices:
            dev.setdefault("errors", {})
            dev["fields"] = {_field_id(k): v for k, v in dev.get("fields", {}).items()}
            for proc in dev.setdefault("processes", []):
                if proc.get("pid") == "self":
                    proc["pid"] = os.getpid()
                proc.setdefault("timestamp_us", state.now_us)
        return state

    # ----- test controls --------------------------------------------------------------

    def device(self, index: int) -> dict[str, Any]:
        return self.state.devices[index]

    def set_error(self, name: str, code: int | str, index: int | None = None) -> None:
        """Make `name` raise NVMLError(code): for one device, or system-wide if index is None."""
        with self._lock:
            target = self.state.errors if index is None else self.state.devices[index]["errors"]
            target[name] = code

    def clear_error(self, name: str, index: int | None = None) -> None:
        with self._lock:
            target = self.state.errors if index is None else self.state.devices[index]["errors"]
            target.pop(name, None)

    def hang(self, name: str, index: int | None = None) -> Hang:
        """Block calls of `name` (on device `index`, or any) until the returned Hang is released."""
        h = Hang()
        with self._lock:
            self.hangs[(name, index)] = h
        return h

    def release_all(self) -> None:
        with self._lock:
            hangs, self.hangs = list(self.hangs.values()), {}
        for h in hangs:
            h.release()

    def set_processes(self, index: int, processes: list[dict[str, Any]]) -> None:
        """Replace device `index`'s processes, e.g. [{"pid": os.getpid(), "used_gpu_memory": 1}]."""
        with self._lock:
            now = self.state.now_us
            self.state.devices[index]["processes"] = [{"timestamp_us": now, **p} for p in processes]

    def advance(self, seconds: float) -> None:
        """Move the fake clock: energy += power * dt, PCIe byte counters += rate * dt,
        and every process gets a fresh utilization sample."""
        with self._lock:
            self.state.now_s += seconds
            for dev in self.state.devices:
                if dev.get("energy_mj") is not None:
                    dev["energy_mj"] += dev.get("power_mw", 0) * seconds  # mW * s = mJ
                rates = dev.get("pcie_throughput_kbps", {})
                for fid, key in ((REAL.NVML_FI_DEV_PCIE_COUNT_TX_BYTES, "tx"),
                                 (REAL.NVML_FI_DEV_PCIE_COUNT_RX_BYTES, "rx")):
                    if isinstance(dev["fields"].get(fid), (int, float)) and key in rates:
                        dev["fields"][fid] += int(rates[key] * 1024 * seconds)
                for proc in dev["processes"]:
                    proc["timestamp_us"] = self.state.now_us

    def inject_event(self, index: int, event_type: int, data: int = 0) -> int:
        """Queue an event on every live event set that registered `event_type` for the
        device (unregistered events are dropped, like the driver). Returns how many sets."""
        delivered = 0
        with self._cond:
            for es in self._event_sets.values():
                if not es.freed and es.registered.get(index, 0) & event_type:
                    es.queue.append((index, event_type, data))
                    delivered += 1
            self._cond.notify_all()
        return delivered

    def inject_xid(self, index: int, xid: int) -> int:
        return self.inject_event(index, REAL.nvmlEventTypeXidCriticalError, xid)

    def handle_index(self, handle: Any) -> int | None:
        """Device index of a handle from nvmlDeviceGetHandleByIndex, or None if not one."""
        if not isinstance(handle, REAL.c_nvmlDevice_t):
            return None
        addr = ctypes.cast(handle, ctypes.c_void_p).value or 0
        index, rem = divmod(addr - _HANDLE_BASE, _STRIDE)
        return index if rem == 0 and 0 <= index < len(self.state.devices) else None

    # ----- plumbing ---------------------------------------------------------------------

    def _enter(self, name: str, index: int | None) -> None:
        with self._lock:
            self.calls[name] += 1
            self.device_calls[(name, index)] += 1
            h = self.hangs.get((name, index)) or self.hangs.get((name, None))
        if h is not None and not h.released.is_set():
            h.entered.set()
            h.released.wait(self.hang_timeout_s)  # never holding the lock while blocked

    def _check_error(self, name: str, index: int | None) -> None:
        with self._lock:
            code = self.state.errors.get(name)
            if code is None and index is not None:
                errs = self.state.devices[index]["errors"]
                code = errs.get(name, errs.get("*"))
        if code is not None:
            self._raise(name, code)

    def _raise(self, name: str, code: int | str) -> None:
        code = error_code(code)
        if name in _VERSIONED and code == REAL.NVML_ERROR_FUNCTION_NOT_FOUND:
            # What the real throwOnVersionMismatch wrapper turns FunctionNotFound into.
            raise REAL.NVMLLibraryMismatchError(
                "Unversioned function called and the pyNVML version does not match the "
                "NVML lib version. Either use matching pyNVML and NVML lib versions or use "
                "a versioned function such as " + name + "_v2")
        raise REAL.NVMLError(code)

    def _unfaked(self, name: str) -> Callable[..., Any]:
        def stub(*args: Any, **kwargs: Any) -> Any:
            with self._lock:
                self.calls[name] += 1
                self.unfaked_calls[name] += 1
            raise REAL.NVMLError(REAL.NVML_ERROR_FUNCTION_NOT_FOUND)

        stub.__name__ = stub.__qualname__ = name
        return stub

    def _value(self, index: int, key: str) -> Any:
        value = self.state.devices[index].get(key)
        if value is None:
            raise REAL.NVMLError(REAL.NVML_ERROR_NOT_SUPPORTED)
        return value

    def _tick(self) -> None:
        if self.realtime:
            with self._lock:
                now = time.monotonic()
                dt, self._last_mono = now - self._last_mono, now
            if dt > 0:
                self.advance(dt)

    def _handle(self, index: int) -> Any:
        return ctypes.cast(ctypes.c_void_p(_HANDLE_BASE + index * _STRIDE), REAL.c_nvmlDevice_t)

    def _event_set(self, eventSet: Any) -> _EventSet:
        if isinstance(eventSet, REAL.c_nvmlEventSet_t):
            es = self._event_sets.get(ctypes.cast(eventSet, ctypes.c_void_p).value or 0)
            if es is not None and not es.freed:
                return es
        raise REAL.NVMLError(REAL.NVML_ERROR_INVALID_ARGUMENT)

    # ----- fake NVML API (names and parameters as in the real pynvml) -------------------

    @_api(device=False, init=False)
    def nvmlInit(self) -> None:
        self._do_init()

    @_api(device=False, init=False)
    def nvmlInitWithFlags(self, flags: int) -> None:
        self._do_init()

    def _do_init(self) -> None:
        with self._lock:
            if self.state.init_error is not None:
                raise REAL.NVMLError(error_code(self.state.init_error))
            self.state.init_count += 1  # NVML refcounts init/shutdown

    @_api(device=False)
    def nvmlShutdown(self) -> None:
        with self._lock:
            self.state.init_count -= 1

    @_api(device=False, init=False)
    def nvmlErrorString(self, result: int) -> str:
        return str(REAL.NVMLError._errcode_to_string.get(result, "Unknown Error"))

    @_api(device=False)
    def nvmlSystemGetDriverVersion(self) -> str:
        return self.state.driver_version

    @_api(device=False)
    def nvmlDeviceGetCount(self) -> int:
        return len(self.state.devices)

    @_api(device=False)
    def nvmlDeviceGetHandleByIndex(self, index: int) -> Any:
        if not isinstance(index, int) or not 0 <= index < len(self.state.devices):
            raise REAL.NVMLError(REAL.NVML_ERROR_INVALID_ARGUMENT)
        self._check_error("nvmlDeviceGetHandleByIndex", index)  # e.g. GPU_IS_LOST per device
        return self._handle(index)

    @_api()
    def nvmlDeviceGetIndex(self, handle: Any) -> int:
        return self.handle_index(handle)  # type: ignore[return-value]

    @_api()
    def nvmlDeviceGetName(self, handle: Any) -> str:
        return self._value(self.handle_index(handle), "name")

    @_api()
    def nvmlDeviceGetUUID(self, handle: Any) -> str:
        return self._value(self.handle_index(handle), "uuid")

    @_api()
    def nvmlDeviceGetPciInfo(self, handle: Any) -> Any:
        pci = self._value(self.handle_index(handle), "pci")
        bus_id = pci["bus_id"]
        domain, bus, dev_fn = bus_id.split(":")
        info = REAL.nvmlPciInfo_t()  # what the real nvmlDeviceGetPciInfo_v3 returns
        info.busId = bus_id  # _PrintableStructure encodes on set and decodes on get
        info.busIdLegacy = f"{int(domain, 16):04x}:{bus}:{dev_fn}"
        info.domain, info.bus = int(domain, 16), int(bus, 16)
        info.device = int(dev_fn.split(".")[0], 16)
        info.pciDeviceId = int(str(pci.get("device_id", 0)), 0)
        info.pciSubSystemId = int(str(pci.get("subsystem_id", 0)), 0)
        return info

    @_api()
    def nvmlDeviceGetUtilizationRates(self, handle: Any) -> Any:
        util = self._value(self.handle_index(handle), "utilization")
        return REAL.c_nvmlUtilization_t(gpu=util["gpu"], memory=util["memory"])

    @_api()
    def nvmlDeviceGetMemoryInfo(self, handle: Any, version: Any = None) -> Any:
        mem = self._value(self.handle_index(handle), "memory")
        total, used = mem["total"], mem["used"]
        free = mem.get("free", total - used)
        if not version:
            return REAL.c_nvmlMemory_t(total=total, free=free, used=used)
        reserved = mem.get("reserved", 0)  # v1 "used" includes reserved; v2 splits it out
        return REAL.c_nvmlMemory_v2_t(version=version, total=total, reserved=reserved,
                                      free=free, used=max(used - reserved, 0))

    @_api()
    def nvmlDeviceGetPowerUsage(self, handle: Any) -> int:
        return int(self._value(self.handle_index(handle), "power_mw"))

    @_api()
    def nvmlDeviceGetEnforcedPowerLimit(self, handle: Any) -> int:
        return int(self._value(self.handle_index(handle), "power_limit_mw"))

    @_api()
    def nvmlDeviceGetTotalEnergyConsumption(self, handle: Any) -> int:
        self._tick()
        return int(self._value(self.handle_index(handle), "energy_mj"))

    @_api()
    def nvmlDeviceGetTemperature(self, handle: Any, sensor: int) -> int:
        if sensor != REAL.NVML_TEMPERATURE_GPU:
            raise REAL.NVMLError(REAL.NVML_ERROR_INVALID_ARGUMENT)
        return int(self._value(self.handle_index(handle), "temperature_c"))

    _CLOCKS = {REAL.NVML_CLOCK_GRAPHICS: "graphics", REAL.NVML_CLOCK_SM: "sm",
               REAL.NVML_CLOCK_MEM: "mem", REAL.NVML_CLOCK_VIDEO: "video"}

    @_api()
    def nvmlDeviceGetClockInfo(self, handle: Any, type: int) -> int:
        if type not in self._CLOCKS:
            raise REAL.NVMLError(REAL.NVML_ERROR_INVALID_ARGUMENT)
        clocks = self._value(self.handle_index(handle), "clocks_mhz")
        if clocks.get(self._CLOCKS[type]) is None:
            raise REAL.NVMLError(REAL.NVML_ERROR_NOT_SUPPORTED)
        return int(clocks[self._CLOCKS[type]])

    @_api()
    def nvmlDeviceGetCurrentClocksEventReasons(self, handle: Any) -> int:
        return int(self._value(self.handle_index(handle), "clocks_event_reasons"))

    @_api()
    def nvmlDeviceGetCurrentClocksThrottleReasons(self, handle: Any) -> int:
        return int(self._value(self.handle_index(handle), "clocks_event_reasons"))

    @_api()
    def nvmlDeviceGetFieldValues(self, handle: Any, fieldIds: list[Any]) -> Any:
        self._tick()
        fields = self.state.devices[self.handle_index(handle)]["fields"]
        values = (REAL.c_nvmlFieldValue_t * len(fieldIds))()
        for i, fid in enumerate(fieldIds):
            try:
                values[i].fieldId, values[i].scopeId = fid  # (fieldId, scopeId) like real
            except TypeError:
                values[i].fieldId = fid
            values[i].timestamp = self.state.now_us
            value = fields.get(values[i].fieldId)
            if value is None or isinstance(value, str):  # per-field failure, call succeeds
                values[i].nvmlReturn = error_code(value or "NOT_SUPPORTED")
            elif isinstance(value, float):
                values[i].valueType = REAL.NVML_VALUE_TYPE_DOUBLE
                values[i].value.dVal = value
            else:
                values[i].valueType = REAL.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG
                values[i].value.ullVal = value
        return values

    _PCIE = {REAL.NVML_PCIE_UTIL_TX_BYTES: "tx", REAL.NVML_PCIE_UTIL_RX_BYTES: "rx"}

    @_api()
    def nvmlDeviceGetPcieThroughput(self, device: Any, counter: int) -> int:
        if counter not in self._PCIE:
            raise REAL.NVMLError(REAL.NVML_ERROR_INVALID_ARGUMENT)
        rates = self._value(self.handle_index(device), "pcie_throughput_kbps")
        return int(rates[self._PCIE[counter]])

    _ECC_ERR = {REAL.NVML_MEMORY_ERROR_TYPE_CORRECTED: "corrected",
                REAL.NVML_MEMORY_ERROR_TYPE_UNCORRECTED: "uncorrected"}
    _ECC_CNT = {REAL.NVML_VOLATILE_ECC: "volatile", REAL.NVML_AGGREGATE_ECC: "aggregate"}

    @_api()
    def nvmlDeviceGetTotalEccErrors(self, handle: Any, errorType: int, counterType: int) -> int:
        if errorType not in self._ECC_ERR or counterType not in self._ECC_CNT:
            raise REAL.NVMLError(REAL.NVML_ERROR_INVALID_ARGUMENT)
        ecc = self._value(self.handle_index(handle), "ecc")
        return int(ecc[self._ECC_CNT[counterType]][self._ECC_ERR[errorType]])

    @_api(device=False)
    def nvmlEventSetCreate(self) -> Any:
        with self._lock:
            addr = _EVENT_SET_BASE + (len(self._event_sets) + 1) * _STRIDE
            self._event_sets[addr] = _EventSet()
        return ctypes.cast(ctypes.c_void_p(addr), REAL.c_nvmlEventSet_t)

    @_api()
    def nvmlDeviceRegisterEvents(self, handle: Any, eventTypes: int, eventSet: Any) -> None:
        with self._lock:
            es = self._event_set(eventSet)
            index = self.handle_index(handle)
            es.registered[index] = es.registered.get(index, 0) | eventTypes

    @_api(device=False)
    def nvmlEventSetWait_v2(self, eventSet: Any, timeoutms: int) -> Any:
        deadline = time.monotonic() + timeoutms / 1000
        with self._cond:
            es = self._event_set(eventSet)
            while not es.queue:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise REAL.NVMLError(REAL.NVML_ERROR_TIMEOUT)
                self._cond.wait(remaining)  # blocks like the driver, woken by inject_event
            index, event_type, data = es.queue.popleft()
        out = REAL.c_nvmlEventData_t()
        out.device = self._handle(index)
        out.eventType, out.eventData = event_type, data
        out.gpuInstanceId = out.computeInstanceId = _NO_INSTANCE
        return out

    @_api(device=False)
    def nvmlEventSetWait(self, eventSet: Any, timeoutms: int) -> Any:
        return self.nvmlEventSetWait_v2(eventSet, timeoutms)

    @_api(device=False)
    def nvmlEventSetFree(self, eventSet: Any) -> None:
        with self._cond:
            self._event_set(eventSet).freed = True
            self._cond.notify_all()

    @_api()
    def nvmlDeviceGetComputeRunningProcesses(self, handle: Any) -> list[Any]:
        out = []
        for proc in self.state.devices[self.handle_index(handle)]["processes"]:
            used = proc.get("used_gpu_memory")
            info = REAL.c_nvmlProcessInfo_v3_t(
                pid=proc["pid"],
                usedGpuMemory=REAL.NVML_VALUE_NOT_AVAILABLE_ulonglong.value if used is None else used,
                gpuInstanceId=_NO_INSTANCE, computeInstanceId=_NO_INSTANCE)
            obj = REAL.nvmlStructToFriendlyObject(info)
            if obj.usedGpuMemory == REAL.NVML_VALUE_NOT_AVAILABLE_ulonglong.value:
                obj.usedGpuMemory = None  # same special case as the real wrapper
            out.append(obj)
        return out

    @_api()
    def nvmlDeviceGetProcessUtilization(self, handle: Any, timeStamp: int) -> list[Any]:
        self._tick()
        now = self.state.now_us
        samples = [
            REAL.c_nvmlProcessUtilizationSample_t(
                pid=p["pid"], timeStamp=p.get("timestamp_us", now), smUtil=p["sm_util"],
                memUtil=p.get("mem_util", 0), encUtil=p.get("enc_util", 0),
                decUtil=p.get("dec_util", 0))
            for p in self.state.devices[self.handle_index(handle)]["processes"]
            if p.get("sm_util") is not None and p.get("timestamp_us", now) > timeStamp
        ]
        if not samples:  # the driver reports "no samples newer than timeStamp" this way
            raise REAL.NVMLError(REAL.NVML_ERROR_NOT_FOUND)
        return samples


def install(monkeypatch: Any, fake: FakeNVML, *modules: types.ModuleType) -> FakeNVML:
    """Make `import pynvml` return `fake` for this test; also rebind `pynvml` in `modules`
    that imported it already. monkeypatch undoes both at teardown."""
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    for mod in modules:
        monkeypatch.setattr(mod, "pynvml", fake)
    return fake
