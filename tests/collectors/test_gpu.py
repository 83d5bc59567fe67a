"""GpuCollector against the fake pynvml module, read the way Prometheus reads it.

The fake is installed as sys.modules["pynvml"] and the collector is built without a module
argument, so the lazy `importlib.import_module("pynvml")` of production runs. Values are read
through a real CollectorRegistry (directly, or through DaemonExporter with Samplers).
"""
from __future__ import annotations

import collections
import logging
import os
import subprocess
import sys
import time
from typing import Any, Callable, Iterator

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from looptune.collectors.base import CollectorUnavailable, Sampler
from looptune.collectors.exporter import DaemonExporter, ReloadState
from looptune.collectors.gpu import CLOCK_EVENT_REASONS, GpuCollector, GpuProcess
from looptune.collectors.host import HostCollector
from looptune.collectors.jobs import ENV_KEYS, JobsCollector
from looptune.collectors.nvml import NVMLUnavailable
from tests.fakes.fake_pynvml import REAL, TRACE_DIR, FakeNVML, install

H200 = TRACE_DIR / "h200_x2.json"
OLD = TRACE_DIR / "old_driver.json"
U0 = "GPU-3f7c2a1e-8b4d-4c6e-9a12-5d0e7b9c4f21"
U1 = "GPU-a1d94e07-62c3-4f0b-8e75-c2b8d3f61a09"
T4 = "GPU-6b1f0c3d-9e24-4a87-b5d1-0f3e8c72a6b4"


# ---- helpers ----------------------------------------------------------------------------

class _LastSnapshot:
    """A registry collector that exposes a looptune collector's last snapshot."""

    def __init__(self, collector: Any) -> None:
        self.collector = collector

    def collect(self) -> list:
        return list(self.collector.families(self.collector.last))


def registry_of(collector: Any) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(_LastSnapshot(collector))
    return reg


def exporter_registry(*samplers: Sampler) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(DaemonExporter(lambda: samplers, "test", ReloadState()))
    return reg


def gpu_labels(index: int, uuid: str, **extra: str) -> dict[str, str]:
    return {"gpu": str(index), "uuid": uuid, **extra}


def wait_for(cond: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


def skip_lines(caplog: pytest.LogCaptureFixture) -> collections.Counter[str]:
    """Functions the NVML gate logged as 'not asked again', with how many lines each."""
    out: collections.Counter[str] = collections.Counter()
    for r in caplog.records:
        if r.name == "looptune.nvml" and "not asked again" in r.getMessage():
            out[r.getMessage().split()[1]] += 1
    return out


@pytest.fixture
def h200(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeNVML]:
    fake = install(monkeypatch, FakeNVML.from_trace(H200))
    yield fake
    fake.release_all()


@pytest.fixture
def old(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeNVML]:
    fake = install(monkeypatch, FakeNVML.from_trace(OLD))
    yield fake
    fake.release_all()


# ---- h200_x2: every documented metric, base units ----------------------------------------

def test_lazy_import_uses_the_installed_module(h200: FakeNVML) -> None:
    gpu = GpuCollector()
    gpu.sample()
    assert gpu.nvml.module is h200
    assert h200.calls["nvmlInit"] == 1
    assert not h200.unfaked_calls


def test_h200_static_and_gauge_metrics_in_base_units(h200: FakeNVML) -> None:
    gpu = GpuCollector()
    gpu.sample()
    reg = registry_of(gpu)
    v = reg.get_sample_value

    assert v("looptune_gpus") == 2
    assert v("looptune_gpu_info", gpu_labels(0, U0, name="NVIDIA H200", driver_version="570.133.20",
                                             pci_bus_id="00000000:18:00.0")) == 1
    assert v("looptune_gpu_info", gpu_labels(1, U1, name="NVIDIA H200", driver_version="570.133.20",
                                             pci_bus_id="00000000:2A:00.0")) == 1

    g0, g1 = gpu_labels(0, U0), gpu_labels(1, U1)
    assert v("looptune_gpu_utilization_ratio", g0) == pytest.approx(0.97)
    assert v("looptune_gpu_utilization_ratio", g1) == pytest.approx(0.94)
    assert v("looptune_gpu_memory_utilization_ratio", g0) == pytest.approx(0.41)
    assert v("looptune_gpu_memory_used_bytes", g0) == 121634078720
    assert v("looptune_gpu_memory_total_bytes", g0) == 150754820096
    assert v("looptune_gpu_memory_used_bytes", g1) == 119486595072
    assert v("looptune_gpu_power_watts", g0) == pytest.approx(300.123)
    assert v("looptune_gpu_power_watts", g1) == pytest.approx(287.450)
    assert v("looptune_gpu_power_limit_watts", g0) == pytest.approx(700.0)
    assert v("looptune_gpu_energy_joules_total", g0) == pytest.approx(8412345.678)
    assert v("looptune_gpu_temperature_celsius", g0) == 52
    assert v("looptune_gpu_temperature_celsius", g1) == 49
    assert v("looptune_gpu_clock_hertz", {**g0, "clock": "sm"}) == pytest.approx(1980e6)
    assert v("looptune_gpu_clock_hertz", {**g0, "clock": "memory"}) == pytest.approx(3201e6)
    # volatile ECC counts (since the driver loaded), not the aggregate (lifetime) ones: 3 on GPU 0
    assert v("looptune_gpu_ecc_errors_total", {**g0, "type": "corrected"}) == 0
    assert v("looptune_gpu_ecc_errors_total", {**g0, "type": "uncorrected"}) == 0
    h200.device(0)["ecc"]["volatile"]["corrected"] = 5
    gpu.sample()
    assert v("looptune_gpu_ecc_errors_total", {**g0, "type": "corrected"}) == 5
    assert v("looptune_gpu_ecc_errors_total", {**g1, "type": "corrected"}) == 0


def test_h200_energy_and_pcie_counters_increase(h200: FakeNVML) -> None:
    gpu = GpuCollector()
    gpu.sample()
    reg = registry_of(gpu)
    v = reg.get_sample_value
    g0 = gpu_labels(0, U0)
    e0 = v("looptune_gpu_energy_joules_total", g0)
    tx0 = v("looptune_gpu_pcie_bytes_total", {**g0, "direction": "tx"})
    rx0 = v("looptune_gpu_pcie_bytes_total", {**g0, "direction": "rx"})
    assert tx0 == 48213377280   # NVML_FI_DEV_PCIE_COUNT_TX_BYTES (197)
    assert rx0 == 912873451520  # NVML_FI_DEV_PCIE_COUNT_RX_BYTES (198)
    assert v("looptune_gpu_pcie_bytes_total", {**gpu_labels(1, U1), "direction": "tx"}) == 47102235648
    # counters present: the sampled-rate fallback is not exported alongside
    assert v("looptune_gpu_pcie_throughput_bytes_per_second", {**g0, "direction": "tx"}) is None

    h200.advance(2.0)
    gpu.sample()
    assert v("looptune_gpu_energy_joules_total", g0) == pytest.approx(e0 + 300.123 * 2)  # 300.123 W * 2 s
    assert v("looptune_gpu_pcie_bytes_total", {**g0, "direction": "tx"}) == tx0 + 152000 * 1024 * 2
    assert v("looptune_gpu_pcie_bytes_total", {**g0, "direction": "rx"}) == rx0 + 1840000 * 1024 * 2


def test_h200_clock_event_reasons_from_bitmask(h200: FakeNVML) -> None:
    h200.device(0)["clocks_event_reasons"] = (REAL.nvmlClocksEventReasonSwPowerCap
                                              | REAL.nvmlClocksEventReasonHwThermalSlowdown)
    gpu = GpuCollector()
    gpu.sample()
    reg = registry_of(gpu)
    g0, g1 = gpu_labels(0, U0), gpu_labels(1, U1)
    active = {r: reg.get_sample_value("looptune_gpu_clock_event_active", {**g0, "reason": r})
              for r in CLOCK_EVENT_REASONS}
    assert active == {r: (1.0 if r in ("sw_power_cap", "hw_thermal_slowdown") else 0.0)
                      for r in CLOCK_EVENT_REASONS}
    assert all(reg.get_sample_value("looptune_gpu_clock_event_active", {**g1, "reason": r}) == 0
               for r in CLOCK_EVENT_REASONS)
    assert h200.calls["nvmlDeviceGetCurrentClocksThrottleReasons"] == 0   # the new name works here

    h200.device(0)["clocks_event_reasons"] = 0
    gpu.sample()
    assert reg.get_sample_value("looptune_gpu_clock_event_active", {**g0, "reason": "sw_power_cap"}) == 0


def test_h200_xid_counter_by_code(h200: FakeNVML) -> None:
    gpu = GpuCollector()
    gpu.sample()
    reg = registry_of(gpu)
    g0, g1 = gpu_labels(0, U0), gpu_labels(1, U1)
    assert reg.get_sample_value("looptune_gpu_xid_errors_total", {**g0, "xid": "79"}) is None

    assert h200.inject_xid(0, 79) == 1   # the collector registered an event set for GPU 0
    assert h200.inject_xid(0, 79) == 1
    assert h200.inject_xid(1, 48) == 1
    gpu.sample()
    assert reg.get_sample_value("looptune_gpu_xid_errors_total", {**g0, "xid": "79"}) == 2
    assert reg.get_sample_value("looptune_gpu_xid_errors_total", {**g1, "xid": "48"}) == 1
    assert reg.get_sample_value("looptune_gpu_xid_errors_total", {**g1, "xid": "79"}) is None

    gpu.sample()   # counted once, not again on the next sample
    assert reg.get_sample_value("looptune_gpu_xid_errors_total", {**g0, "xid": "79"}) == 2


def test_h200_process_list(h200: FakeNVML) -> None:
    gpu = GpuCollector()
    snap = gpu.sample()
    assert sorted(snap.processes, key=lambda p: p.pid) == [
        GpuProcess(pid=31337, gpu=0, memory_bytes=118111600640, sm_ratio=pytest.approx(0.95)),
        GpuProcess(pid=31338, gpu=1, memory_bytes=115964116992, sm_ratio=pytest.approx(0.92)),
    ]
    # memory hidden by the driver (containers): None, not 0; no utilization sample: None
    h200.set_processes(0, [{"pid": 4242, "used_gpu_memory": None, "sm_util": 30},
                           {"pid": 4343, "used_gpu_memory": 1 << 30, "sm_util": None}])
    h200.advance(1.0)
    procs = {p.pid: p for p in gpu.sample().processes}
    assert procs[4242] == GpuProcess(4242, 0, None, pytest.approx(0.30))
    assert procs[4343] == GpuProcess(4343, 0, 1 << 30, None)
    assert procs[31338].gpu == 1


# ---- old driver: unsupported calls, fallbacks, absent metrics -----------------------------

OLD_MISSING = ("nvmlDeviceGetTotalEnergyConsumption", "nvmlDeviceGetFieldValues",
               "nvmlDeviceGetCurrentClocksEventReasons", "nvmlDeviceGetTotalEccErrors",
               "nvmlDeviceGetProcessUtilization")


def test_old_driver_unsupported_calls_logged_once_and_not_repeated(
        old: FakeNVML, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="looptune")
    gpu = GpuCollector()
    gpu.sample()
    after_first = {f: old.calls[f] for f in OLD_MISSING}
    assert all(n == 1 for n in after_first.values()), after_first
    for _ in range(2):
        old.advance(1.0)
        gpu.sample()
    assert {f: old.calls[f] for f in OLD_MISSING} == after_first
    assert old.calls["nvmlDeviceGetPowerUsage"] == 3            # supported calls go on
    assert old.calls["nvmlDeviceGetCurrentClocksThrottleReasons"] == 3
    logged = skip_lines(caplog)
    assert all(logged[f] == 1 for f in OLD_MISSING), logged
    assert max(logged.values()) == 1, logged                    # nothing logged twice
    assert not old.unfaked_calls


def test_old_driver_fallbacks_and_absent_metrics(old: FakeNVML) -> None:
    gpu = GpuCollector()
    snap = gpu.sample()
    reg = registry_of(gpu)
    v = reg.get_sample_value
    g = gpu_labels(0, T4)
    assert v("looptune_gpu_info", {**g, "name": "Tesla T4", "driver_version": "418.226.00",
                                   "pci_bus_id": "00000000:00:1E.0"}) == 1
    assert v("looptune_gpu_power_watts", g) == pytest.approx(41.25)
    assert v("looptune_gpu_utilization_ratio", g) == pytest.approx(0.63)
    # ClocksEventReasons is missing: the mask (4 = SwPowerCap) comes from ClocksThrottleReasons
    assert v("looptune_gpu_clock_event_active", {**g, "reason": "sw_power_cap"}) == 1
    assert v("looptune_gpu_clock_event_active", {**g, "reason": "hw_slowdown"}) == 0
    # no PCIe field values: NVML's sampled throughput (KB/s -> bytes/s) instead of the counters
    assert v("looptune_gpu_pcie_bytes_total", {**g, "direction": "tx"}) is None
    assert v("looptune_gpu_pcie_throughput_bytes_per_second", {**g, "direction": "tx"}) == 20000 * 1024
    assert v("looptune_gpu_pcie_throughput_bytes_per_second", {**g, "direction": "rx"}) == 310000 * 1024
    # unsupported: absent, never 0
    assert v("looptune_gpu_energy_joules_total", g) is None
    assert v("looptune_gpu_ecc_errors_total", {**g, "type": "corrected"}) is None
    assert v("looptune_gpu_ecc_errors_total", {**g, "type": "uncorrected"}) is None
    text = generate_latest(reg).decode()
    assert "looptune_gpu_energy_joules_total{" not in text
    assert "looptune_gpu_ecc_errors_total{" not in text
    assert "looptune_gpu_pcie_bytes_total{" not in text
    assert snap.processes == [GpuProcess(2718, 0, 9395240960, None)]


# ---- no library, no driver -----------------------------------------------------------------

UNAVAILABLE = [
    pytest.param(FakeNVML.no_library, "libnvidia-ml", id="no_library"),
    pytest.param(FakeNVML.driver_not_loaded, "kernel driver is not loaded", id="driver_not_loaded"),
]


@pytest.mark.parametrize("make, reason", UNAVAILABLE)
def test_unavailable_sample_raises(monkeypatch: pytest.MonkeyPatch, make: Callable[[], FakeNVML],
                                   reason: str) -> None:
    install(monkeypatch, make())
    with pytest.raises(CollectorUnavailable, match=reason):
        GpuCollector().sample()


def test_pynvml_module_missing(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)   # import pynvml -> ImportError
    caplog.set_level(logging.INFO, logger="looptune")
    gpu = GpuCollector()
    for _ in range(3):
        with pytest.raises(NVMLUnavailable, match="nvidia-ml-py"):
            gpu.sample()
    assert len([r for r in caplog.records if r.levelno >= logging.WARNING]) == 1


@pytest.mark.parametrize("make, reason", UNAVAILABLE)
def test_unavailable_via_sampler_counted_once_and_retried_with_backoff(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        make: Callable[[], FakeNVML], reason: str) -> None:
    """Retries after 2 s, then 4, 8 ... up to retry_seconds: a driver reload is back within
    seconds (it once waited a full minute), a host without one costs a retry a minute."""
    caplog.set_level(logging.INFO, logger="looptune")
    fake = install(monkeypatch, make())
    now = [1000.0]
    gpu = GpuCollector(retry_seconds=60.0, clock=lambda: now[0])
    s = Sampler(gpu, interval=1.0, timeout=5.0)
    reg = exporter_registry(s)
    up = {"collector": "gpu"}

    inits = []
    for _ in range(240):                      # 4 minutes of 1 s samples
        s.sample_once()
        inits.append(fake.calls["nvmlInit"])
        now[0] += 1.0
    first_at = [i for i in range(1, len(inits)) if inits[i] != inits[i - 1]]
    gaps = [b - a for a, b in zip([0] + first_at, first_at)]
    assert gaps[:5] == [2, 4, 8, 16, 32] and all(g == 60 for g in gaps[5:]), gaps
    assert reg.get_sample_value("looptune_collector_up", up) == 0
    assert reg.get_sample_value("looptune_collector_errors_total", up) == 1   # once per outage
    assert reg.get_sample_value("looptune_gpus") is None
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and reason in warnings[0], warnings

    fake.state = FakeNVML.from_trace(H200).state              # the driver got loaded
    calls = fake.calls["nvmlInit"]
    for _ in range(61):
        s.sample_once()
        now[0] += 1.0
        if reg.get_sample_value("looptune_collector_up", up) == 1:
            break
    assert fake.calls["nvmlInit"] == calls + 1
    assert reg.get_sample_value("looptune_gpus") == 2
    assert reg.get_sample_value("looptune_gpu_power_watts", gpu_labels(0, U0)) == pytest.approx(300.123)
    assert reg.get_sample_value("looptune_collector_errors_total", up) == 1


# ---- soft errors and lost GPUs --------------------------------------------------------------

def test_soft_error_leaves_value_out_for_that_sample(h200: FakeNVML) -> None:
    gpu = GpuCollector()
    s = Sampler(gpu, interval=1.0, timeout=5.0)
    reg = exporter_registry(s)
    g0, g1 = gpu_labels(0, U0), gpu_labels(1, U1)
    h200.set_error("nvmlDeviceGetPowerUsage", "UNKNOWN", index=0)
    s.sample_once()
    assert s.status().up and s.status().errors == 0
    assert reg.get_sample_value("looptune_gpu_power_watts", g0) is None     # left out, not 0
    assert reg.get_sample_value("looptune_gpu_power_watts", g1) == pytest.approx(287.45)
    assert reg.get_sample_value("looptune_gpu_temperature_celsius", g0) == 52
    assert gpu.nvml.soft_errors == 1

    h200.clear_error("nvmlDeviceGetPowerUsage", index=0)
    s.sample_once()
    assert reg.get_sample_value("looptune_gpu_power_watts", g0) == pytest.approx(300.123)  # asked again
    assert h200.device_calls[("nvmlDeviceGetPowerUsage", 0)] == 2


def test_a_lost_gpu_is_that_gpus_problem_alone(h200: FakeNVML, caplog: pytest.LogCaptureFixture) -> None:
    """GPU_IS_LOST on one GPU once blanked every GPU's metrics (the whole collector went down and
    NVML was re-initialised): now the other GPU is sampled on, the lost one shows looptune_gpu_up 0."""
    caplog.set_level(logging.INFO, logger="looptune")
    gpu = GpuCollector()
    s = Sampler(gpu, interval=1.0, timeout=5.0)
    reg = exporter_registry(s)
    up = {"collector": "gpu"}
    g0, g1 = gpu_labels(0, U0), gpu_labels(1, U1)
    s.sample_once()
    assert reg.get_sample_value("looptune_gpu_up", g1) == 1

    h200.set_error("*", "GPU_IS_LOST", index=1)
    for _ in range(3):
        s.sample_once()
        assert reg.get_sample_value("looptune_collector_up", up) == 1
        assert reg.get_sample_value("looptune_collector_errors_total", up) == 0
        assert reg.get_sample_value("looptune_gpu_power_watts", g0) == pytest.approx(300.123)
        assert reg.get_sample_value("looptune_gpu_up", g0) == 1
        assert reg.get_sample_value("looptune_gpu_up", g1) == 0
        assert reg.get_sample_value("looptune_gpu_power_watts", g1) is None
        assert reg.get_sample_value("looptune_gpus") == 2
    assert h200.calls["nvmlShutdown"] == 0 and h200.calls["nvmlInit"] == 1     # NVML itself untouched
    lost_lines = [r for r in caplog.records if "is lost" in r.getMessage()]
    assert len(lost_lines) == 1 and "GpuIsLost" in lost_lines[0].getMessage()

    h200.clear_error("*", index=1)
    s.sample_once()
    assert reg.get_sample_value("looptune_gpu_up", g1) == 1
    assert reg.get_sample_value("looptune_gpu_power_watts", g1) == pytest.approx(287.45)
    gpu.close()
    assert h200.state.init_count == 0


def test_a_gpu_lost_before_the_start_is_skipped_at_init(h200: FakeNVML) -> None:
    h200.set_error("*", "GPU_IS_LOST", index=1)
    gpu = GpuCollector()
    snap = gpu.sample()
    assert [g.index for g in snap.gpus] == [0] and snap.lost == [(1, "")]
    reg = registry_of(gpu)
    assert reg.get_sample_value("looptune_gpu_up", {"gpu": "1", "uuid": ""}) == 0


def test_xid_seen_before_a_lost_gpu_survives(h200: FakeNVML) -> None:
    """XID 79 (fallen off the bus) comes with GPU_IS_LOST: its count must not vanish."""
    gpu = GpuCollector()
    gpu.sample()
    h200.inject_xid(1, 79)
    h200.set_error("nvmlDeviceGetUtilizationRates", "GPU_IS_LOST", index=1)
    assert [g.index for g in gpu.sample().gpus] == [0]
    h200.clear_error("nvmlDeviceGetUtilizationRates", index=1)
    gpu.sample()
    reg = registry_of(gpu)
    assert reg.get_sample_value("looptune_gpu_xid_errors_total", {**gpu_labels(1, U1), "xid": "79"}) == 1


def test_nvml_errors_of_the_whole_library_still_reinitialise(h200: FakeNVML) -> None:
    gpu = GpuCollector()
    gpu.sample()
    h200.set_error("nvmlDeviceGetUtilizationRates", "UNINITIALIZED", index=0)
    with pytest.raises(REAL.NVMLError_Uninitialized):
        gpu.sample()
    assert h200.calls["nvmlShutdown"] == 1
    h200.clear_error("nvmlDeviceGetUtilizationRates", index=0)
    assert len(gpu.sample().gpus) == 2 and h200.calls["nvmlInit"] == 2


# ---- a hung driver call -----------------------------------------------------------------------

def test_hang_marks_gpu_down_while_host_and_scrape_go_on(h200: FakeNVML) -> None:
    hang = h200.hang("nvmlDeviceGetPowerUsage")
    gpu_s = Sampler(GpuCollector(), interval=0.1, timeout=0.3)
    host_s = Sampler(HostCollector(), interval=0.05, timeout=2.0)
    reg = exporter_registry(gpu_s, host_s)
    up = {"collector": "gpu"}
    try:
        host_s.start()
        gpu_s.start()
        assert hang.entered.wait(2.0), "the gpu sampler never reached the hung call"
        t0 = time.monotonic()
        wait_for(lambda: gpu_s.status().hung, 1.5, "the gpu sampler to be reported hung")
        assert time.monotonic() - t0 < 1.0
        assert not gpu_s.status().up

        first = wait_for(lambda: host_s.status().snapshot, 1.0, "a host sample")
        wait_for(lambda: host_s.status().snapshot is not first, 1.0, "a new host sample during the hang")
        assert host_s.status().up

        t1 = time.monotonic()
        text = generate_latest(reg).decode()
        assert time.monotonic() - t1 < 0.5, "scrape waited on the hung sampler"
        assert 'looptune_collector_up{collector="gpu"} 0.0' in text
        assert 'looptune_collector_up{collector="host"} 1.0' in text
        assert "looptune_host_cpus" in text
        assert reg.get_sample_value("looptune_collector_up", up) == 0
        assert reg.get_sample_value("looptune_collector_errors_total", up) == 1

        hang.release()
        wait_for(lambda: gpu_s.status().up, 2.0, "the gpu sampler to come back up")
        assert reg.get_sample_value("looptune_collector_up", up) == 1
        assert reg.get_sample_value("looptune_gpu_power_watts", gpu_labels(0, U0)) == pytest.approx(300.123)
        assert reg.get_sample_value("looptune_collector_errors_total", up) == 1   # one hang episode
    finally:
        h200.release_all()
        gpu_s.stop(join_timeout=1.0)
        host_s.stop(join_timeout=1.0)


# ---- jobs found through their GPU context ------------------------------------------------

def test_job_found_by_gpu_context_gets_gpu_metrics(h200: FakeNVML) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ENV_KEYS}
    cmd = [sys.executable, "-c", "import time; time.sleep(30)"]
    holder = subprocess.Popen(cmd, env={**env, "LOOPTUNE_RUN": "gpuattr", "RANK": "1"})
    bystander = subprocess.Popen(cmd, env={**env, "LOOPTUNE_RUN": "bystander"})
    try:
        h200.set_processes(0, [{"pid": holder.pid, "used_gpu_memory": 7_000_000_000, "sm_util": 42}])
        h200.set_processes(1, [{"pid": holder.pid, "used_gpu_memory": 1_000_000, "sm_util": None}])
        gpu = GpuCollector()
        gpu.sample()
        jobs = JobsCollector(patterns=["nomatch-xyz"], gpu_processes=lambda: gpu.last.processes)
        snap = jobs.sample()
        assert [j.root_pid for j in snap.jobs] == [holder.pid]   # the bystander holds no GPU
        reg = registry_of(jobs)
        lab = {"run": "gpuattr", "rank": "1"}
        assert reg.get_sample_value("looptune_job_gpu_memory_bytes", {**lab, "gpu": "0"}) == 7_000_000_000
        assert reg.get_sample_value("looptune_job_gpu_utilization_ratio", {**lab, "gpu": "0"}) == \
            pytest.approx(0.42)
        assert reg.get_sample_value("looptune_job_gpu_memory_bytes", {**lab, "gpu": "1"}) == 1_000_000
        assert reg.get_sample_value("looptune_job_gpu_utilization_ratio", {**lab, "gpu": "1"}) is None
    finally:
        for p in (holder, bystander):
            p.kill()
            p.wait(5)


# ---- a newer entry point the driver lacks ----------------------------------------------------

def test_library_mismatch_on_running_processes_is_unsupported(
        h200: FakeNVML, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="looptune")
    h200.set_error("nvmlDeviceGetComputeRunningProcesses", "FUNCTION_NOT_FOUND", index=0)
    gpu = GpuCollector()
    s = Sampler(gpu, interval=1.0, timeout=5.0)
    for _ in range(3):
        h200.advance(1.0)
        s.sample_once()
        assert s.status().up and s.status().errors == 0
    procs = s.status().snapshot.processes
    assert [(p.pid, p.gpu) for p in procs] == [(31338, 1)]      # GPU 1 still answers
    assert h200.device_calls[("nvmlDeviceGetComputeRunningProcesses", 0)] == 1
    assert h200.device_calls[("nvmlDeviceGetComputeRunningProcesses", 1)] == 3
    assert skip_lines(caplog)["nvmlDeviceGetComputeRunningProcesses"] == 1
    reg = exporter_registry(s)
    assert reg.get_sample_value("looptune_gpu_power_watts", gpu_labels(0, U0)) == pytest.approx(300.123)
