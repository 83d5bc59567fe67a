"""Per-GPU figures through NVML, in base units, and the processes that hold each GPU.

Without the library, the driver or a GPU, `sample()` raises NVMLUnavailable: the sampler
counts it and reports the collector down; the reason is logged once, and initialisation is
retried quietly, after 2 s, then 4, 8 ... up to every `retry_seconds` (a driver being reloaded
comes back within seconds; one never installed costs a retry a minute).

A GPU that is lost (fallen off the bus, needing a reset) is that GPU's problem alone: it is
reported with looptune_gpu_up 0 and no figures, logged once, asked again every sample, and the
other GPUs go on being sampled. Only errors of NVML as a whole re-initialise it.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from looptune.collectors.nvml import NVML, NVMLUnavailable, error_name

log = logging.getLogger("looptune.gpu")

# clock-event (throttle) reason bits, by their pynvml constant names
CLOCK_EVENT_REASONS = {
    "gpu_idle": "nvmlClocksEventReasonGpuIdle",
    "applications_clocks_setting": "nvmlClocksEventReasonApplicationsClocksSetting",
    "sw_power_cap": "nvmlClocksEventReasonSwPowerCap",
    "hw_slowdown": "nvmlClocksEventReasonHwSlowdown",
    "sync_boost": "nvmlClocksEventReasonSyncBoost",
    "sw_thermal_slowdown": "nvmlClocksEventReasonSwThermalSlowdown",
    "hw_thermal_slowdown": "nvmlClocksEventReasonHwThermalSlowdown",
    "hw_power_brake_slowdown": "nvmlClocksEventReasonHwPowerBrakeSlowdown",
    "display_clock_setting": "nvmlClocksEventReasonDisplayClockSetting",
}


@dataclass(frozen=True)
class GpuProcess:
    pid: int
    gpu: int
    memory_bytes: int | None      # None where the driver hides it (containers, MIG)
    sm_ratio: float | None        # SM utilization of this process, 0..1


@dataclass
class GpuSample:
    index: int
    uuid: str
    name: str
    pci_bus_id: str
    values: dict[str, float] = field(default_factory=dict)  # metric suffix -> value, absent if unknown
    clock_events: dict[str, bool] | None = None
    pcie_bytes: dict[str, int] | None = None            # direction -> counter
    pcie_bytes_per_second: dict[str, float] | None = None  # fallback: NVML's own sampled rate
    ecc_errors: dict[str, int] | None = None
    xid_errors: dict[int, int] = field(default_factory=dict)


@dataclass(frozen=True)
class GpuSnapshot:
    driver_version: str
    gpus: list[GpuSample]
    processes: list[GpuProcess]
    lost: list[tuple[int, str]] = field(default_factory=list)   # (index, uuid or "") of lost GPUs


@dataclass
class _Device:
    index: int
    handle: Any
    uuid: str
    name: str
    pci_bus_id: str
    last_process_ts: int = 0      # µs timestamp of the newest process-utilization sample seen
    xid: dict[int, int] = field(default_factory=dict)


# errors of one device, not of NVML: that GPU is skipped, the others sampled
_DEVICE_LOST = ("GpuIsLost", "ResetRequired")
FIRST_RETRY_SECONDS = 2.0


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class GpuCollector:
    name = "gpu"

    def __init__(self, module: Any = None, retry_seconds: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.nvml = NVML(module)
        self.retry_seconds = retry_seconds
        self._clock = clock
        self._devices: list[_Device] | None = None
        self._driver = ""
        self._events: Any = None
        self._unavailable: str | None = None
        self._next_init = 0.0
        self._retry_delay = FIRST_RETRY_SECONDS
        self._lost: dict[int, str] = {}              # index -> uuid ("" if never read) of lost GPUs
        self._xid: dict[str, dict[int, int]] = {}   # uuid -> XID code -> count; survives re-init
        self.last: GpuSnapshot | None = None

    # ---- lifecycle ----

    def _init(self) -> None:
        now = self._clock()
        if self._unavailable and now < self._next_init:
            raise NVMLUnavailable(self._unavailable)
        try:
            self.nvml.init()
        except NVMLUnavailable as exc:
            if self._unavailable is None:
                log.warning("GPU collector down: %s; the daemon runs on without GPU metrics", exc)
            self._unavailable = str(exc)
            self._backoff(now)
            raise
        nv = self.nvml.module
        try:
            count = nv.nvmlDeviceGetCount()
            if count == 0:
                self.nvml.shutdown()
                msg = "NVML found no GPU on this host"
                if self._unavailable is None:
                    log.warning("GPU collector down: %s", msg)
                self._unavailable = msg
                self._backoff(now)
                raise NVMLUnavailable(msg)
            self._driver = _text(nv.nvmlSystemGetDriverVersion())
            devices = []
            for i in range(count):
                try:
                    h = nv.nvmlDeviceGetHandleByIndex(i)
                    pci = self.nvml.query("nvmlDeviceGetPciInfo", i, h)
                    uuid = _text(nv.nvmlDeviceGetUUID(h))
                    devices.append(_Device(i, h, uuid, _text(nv.nvmlDeviceGetName(h)),
                                           _text(pci.busId) if pci is not None else "",
                                           xid=self._xid.setdefault(uuid, {})))
                except nv.NVMLError as exc:
                    if error_name(exc) not in _DEVICE_LOST:
                        raise
                    self._mark_lost(i, self._lost.get(i, ""), exc)
            events = self._register_xid_events(devices)
        except nv.NVMLError:
            self.nvml.shutdown()   # NVML refcounts init: a failed init must not leave it open
            raise
        self._devices = devices
        self._events = events
        self._retry_delay = FIRST_RETRY_SECONDS
        if self._unavailable is not None:
            log.info("GPU collector up: %d GPU(s), driver %s", count, self._driver)
        else:
            log.info("GPU collector: %d GPU(s), driver %s", count, self._driver)
        self._unavailable = None

    def _backoff(self, now: float) -> None:
        self._next_init = now + self._retry_delay
        self._retry_delay = min(self._retry_delay * 2, self.retry_seconds)

    def _mark_lost(self, index: int, uuid: str, exc: BaseException) -> None:
        if index not in self._lost:
            log.warning("GPU %d %s is lost (%s); the other GPUs are still sampled, this one asked again "
                        "each sample", index, uuid, error_name(exc))
        self._lost[index] = uuid

    def _register_xid_events(self, devices: list[_Device]) -> Any:
        nv = self.nvml.module
        events = self.nvml.query("nvmlEventSetCreate", "all")
        if events is None:
            return None
        for d in devices:
            self.nvml.query("nvmlDeviceRegisterEvents", d.index, d.handle, nv.nvmlEventTypeXidCriticalError, events)
        return events

    def _reset(self) -> None:
        if self._events is not None:
            self.nvml.query("nvmlEventSetFree", "all", self._events)
        self._events = None
        self._devices = None
        self.nvml.shutdown()

    def close(self) -> None:
        if self._devices is not None:
            self._reset()

    # ---- sampling ----

    def sample(self) -> GpuSnapshot:
        if self._devices is None:
            self._init()
        nv = self.nvml.module
        try:
            self._drain_xid_events()
            gpus, procs = [], []
            for d in self._devices or []:
                try:
                    g = self._sample_device(d)
                    procs.extend(self._processes(d))
                except nv.NVMLError as exc:
                    if error_name(exc) not in _DEVICE_LOST:
                        raise
                    self._mark_lost(d.index, d.uuid, exc)
                    continue
                if self._lost.pop(d.index, None) is not None:
                    log.info("GPU %d %s answers again", d.index, d.uuid)
                gpus.append(g)
        except nv.NVMLError as exc:
            if self.nvml.is_fatal(exc):
                log.warning("NVML %s: re-initialising on the next sample", error_name(exc))
                self._reset()
            raise
        self.last = GpuSnapshot(self._driver, gpus, procs, sorted(self._lost.items()))
        return self.last

    def _sample_device(self, d: _Device) -> GpuSample:
        nv, q, i, h = self.nvml.module, self.nvml.query, d.index, d.handle
        s = GpuSample(d.index, d.uuid, d.name, d.pci_bus_id, xid_errors=dict(d.xid))
        v = s.values
        util = q("nvmlDeviceGetUtilizationRates", i, h)
        if util is not None:
            v["utilization_ratio"] = util.gpu / 100.0
            v["memory_utilization_ratio"] = util.memory / 100.0
        mem = q("nvmlDeviceGetMemoryInfo", i, h)
        if mem is not None:
            v["memory_used_bytes"] = float(mem.used)
            v["memory_total_bytes"] = float(mem.total)
        _put(v, "power_watts", q("nvmlDeviceGetPowerUsage", i, h), 1e-3)
        _put(v, "power_limit_watts", q("nvmlDeviceGetEnforcedPowerLimit", i, h), 1e-3)
        _put(v, "energy_joules", q("nvmlDeviceGetTotalEnergyConsumption", i, h), 1e-3)
        _put(v, "temperature_celsius", q("nvmlDeviceGetTemperature", i, h, nv.NVML_TEMPERATURE_GPU), 1.0)
        _put(v, "sm_clock_hertz", q("nvmlDeviceGetClockInfo", (i, "sm"), h, nv.NVML_CLOCK_SM), 1e6)
        _put(v, "memory_clock_hertz", q("nvmlDeviceGetClockInfo", (i, "mem"), h, nv.NVML_CLOCK_MEM), 1e6)
        s.clock_events = self._clock_events(d)
        s.pcie_bytes, s.pcie_bytes_per_second = self._pcie(d)
        ecc = {}
        for kind, const in (("corrected", "NVML_MEMORY_ERROR_TYPE_CORRECTED"),
                            ("uncorrected", "NVML_MEMORY_ERROR_TYPE_UNCORRECTED")):
            n = q("nvmlDeviceGetTotalEccErrors", i, h, getattr(nv, const), nv.NVML_VOLATILE_ECC)
            if n is not None:
                ecc[kind] = int(n)
        s.ecc_errors = ecc or None
        return s

    def _clock_events(self, d: _Device) -> dict[str, bool] | None:
        nv, q = self.nvml.module, self.nvml.query
        mask = q("nvmlDeviceGetCurrentClocksEventReasons", d.index, d.handle)
        if mask is None:   # drivers before 535 only have the older name
            mask = q("nvmlDeviceGetCurrentClocksThrottleReasons", d.index, d.handle)
        if mask is None:
            return None
        return {reason: bool(mask & getattr(nv, const, 0)) for reason, const in CLOCK_EVENT_REASONS.items()
                if getattr(nv, const, None) is not None}

    def _pcie(self, d: _Device) -> tuple[dict[str, int] | None, dict[str, float] | None]:
        nv, q = self.nvml.module, self.nvml.query
        fields = [nv.NVML_FI_DEV_PCIE_COUNT_TX_BYTES, nv.NVML_FI_DEV_PCIE_COUNT_RX_BYTES]
        values = q("nvmlDeviceGetFieldValues", d.index, d.handle, fields)
        if values is not None:
            if all(val.nvmlReturn == nv.NVML_SUCCESS for val in values):
                return {"tx": int(values[0].value.ullVal), "rx": int(values[1].value.ullVal)}, None
            self.nvml.unsupported.add(("nvmlDeviceGetFieldValues", d.index))
            log.info("NVML PCIe byte counters not offered on GPU %s; using the sampled throughput", d.index)
        rates = {}
        for direction, const in (("tx", "NVML_PCIE_UTIL_TX_BYTES"), ("rx", "NVML_PCIE_UTIL_RX_BYTES")):
            kbps = q("nvmlDeviceGetPcieThroughput", d.index, d.handle, getattr(nv, const))
            if kbps is not None:
                rates[direction] = float(kbps) * 1024.0   # NVML reports KB/s
        return None, rates or None

    def _drain_xid_events(self) -> None:
        if self._events is None or not self._devices:
            return
        nv = self.nvml.module
        for _ in range(1000):   # bounded: a storm of events must not pin the thread
            try:
                data = nv.nvmlEventSetWait_v2(self._events, 0)
            except nv.NVMLError as exc:
                if error_name(exc) == "Timeout":
                    return
                if self.nvml.is_fatal(exc):
                    raise
                self.nvml.soft_errors += 1
                return
            # handles are fresh ctypes objects per call: map back through the index
            idx = self.nvml.query("nvmlDeviceGetIndex", "events", data.device)
            d = self._devices[idx] if idx is not None and 0 <= idx < len(self._devices) else None
            if d is not None and data.eventType & nv.nvmlEventTypeXidCriticalError:
                xid = int(data.eventData)
                d.xid[xid] = d.xid.get(xid, 0) + 1
                log.warning("GPU %s (%s): XID %d", d.index, d.uuid, xid)

    def _processes(self, d: _Device) -> list[GpuProcess]:
        q = self.nvml.query
        running = q("nvmlDeviceGetComputeRunningProcesses", d.index, d.handle, default=[])
        sm: dict[int, int] = {}
        samples = q("nvmlDeviceGetProcessUtilization", d.index, d.handle, d.last_process_ts, default=[])
        for smp in samples:
            sm[smp.pid] = max(sm.get(smp.pid, 0), int(smp.smUtil))
            d.last_process_ts = max(d.last_process_ts, int(smp.timeStamp))
        out = []
        for p in running:
            mem = p.usedGpuMemory
            out.append(GpuProcess(int(p.pid), d.index, int(mem) if mem is not None else None,
                                  sm[p.pid] / 100.0 if p.pid in sm else None))
        return out

    # ---- exposition ----

    def families(self, snap: GpuSnapshot) -> Iterable[Metric]:
        labels = ["gpu", "uuid"]
        info = GaugeMetricFamily("looptune_gpu_info", "Static facts of each GPU; value 1.",
                                 labels=labels + ["name", "driver_version", "pci_bus_id"])
        for g in snap.gpus:
            info.add_metric([str(g.index), g.uuid, g.name, snap.driver_version, g.pci_bus_id], 1)
        yield info
        yield GaugeMetricFamily("looptune_gpus", "GPUs NVML sees on this host.", value=len(snap.gpus) + len(snap.lost))
        up = GaugeMetricFamily("looptune_gpu_up", "1 while the GPU answers; 0 when it is lost (fallen off the "
                               "bus, needs a reset): its other figures are absent then.", labels=labels)
        for g in snap.gpus:
            up.add_metric([str(g.index), g.uuid], 1)
        for index, uuid in snap.lost:
            up.add_metric([str(index), uuid], 0)
        yield up
        for key, (kind, help_) in _VALUE_METRICS.items():
            cls = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            fam = cls(f"looptune_gpu_{key}", help_, labels=labels)
            for g in snap.gpus:
                if key in g.values:
                    fam.add_metric([str(g.index), g.uuid], g.values[key])
            yield fam
        clock = GaugeMetricFamily("looptune_gpu_clock_hertz", "Current clock, hertz.", labels=labels + ["clock"])
        events = GaugeMetricFamily("looptune_gpu_clock_event_active", "1 while this clock-event (throttle) "
                                   "reason holds the clocks down.", labels=labels + ["reason"])
        pcie = CounterMetricFamily("looptune_gpu_pcie_bytes", "PCIe bytes moved, by direction from the "
                                   "GPU's view (tx: GPU to host), where the driver counts them.",
                                   labels=labels + ["direction"])
        pcie_rate = GaugeMetricFamily("looptune_gpu_pcie_throughput_bytes_per_second",
                                      "NVML's own short-window PCIe throughput, bytes/s; only on drivers "
                                      "without PCIe byte counters.", labels=labels + ["direction"])
        ecc = CounterMetricFamily("looptune_gpu_ecc_errors", "ECC memory errors since the driver loaded.",
                                  labels=labels + ["type"])
        xid = CounterMetricFamily("looptune_gpu_xid_errors", "XID critical errors seen since the daemon "
                                  "started, by XID code.", labels=labels + ["xid"])
        for g in snap.gpus:
            lv = [str(g.index), g.uuid]
            for name, key in (("sm", "sm_clock_hertz"), ("memory", "memory_clock_hertz")):
                if key in g.values:
                    clock.add_metric(lv + [name], g.values[key])
            for reason, active in (g.clock_events or {}).items():
                events.add_metric(lv + [reason], 1.0 if active else 0.0)
            for direction, n in (g.pcie_bytes or {}).items():
                pcie.add_metric(lv + [direction], n)
            for direction, r in (g.pcie_bytes_per_second or {}).items():
                pcie_rate.add_metric(lv + [direction], r)
            for kind, n in (g.ecc_errors or {}).items():
                ecc.add_metric(lv + [kind], n)
            for code, n in g.xid_errors.items():
                xid.add_metric(lv + [str(code)], n)
        yield from (clock, events, pcie, pcie_rate, ecc, xid)


_VALUE_METRICS = {
    "utilization_ratio": ("gauge", "Share of the last sample period in which a kernel ran, 0..1."),
    "memory_utilization_ratio": ("gauge", "Share of the last sample period in which device memory "
                                          "was read or written, 0..1."),
    "memory_used_bytes": ("gauge", "Device memory in use, bytes."),
    "memory_total_bytes": ("gauge", "Device memory, bytes."),
    "power_watts": ("gauge", "Power draw, watts."),
    "power_limit_watts": ("gauge", "Enforced power limit, watts."),
    "energy_joules": ("counter", "Energy used since the driver loaded, joules."),
    "temperature_celsius": ("gauge", "Core temperature, degrees Celsius."),
}


def _put(values: dict[str, float], key: str, raw: Any, scale: float) -> None:
    if raw is not None:
        values[key] = float(raw) * scale
