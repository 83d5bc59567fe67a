"""Host CPU, memory and swap from psutil, in base units."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import psutil
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric


@dataclass(frozen=True)
class HostSnapshot:
    cpu_seconds: dict[str, float]  # mode -> seconds summed over all CPUs since boot
    cpus: int
    memory_total_bytes: int
    memory_available_bytes: int
    swap_total_bytes: int
    swap_used_bytes: int


class HostCollector:
    name = "host"

    def __init__(self, ps: Any = psutil) -> None:
        self._ps = ps

    def sample(self) -> HostSnapshot:
        times = self._ps.cpu_times()
        mem = self._ps.virtual_memory()
        swap = self._ps.swap_memory()
        return HostSnapshot(
            # guest time is already inside user and nice (as in /proc/stat): not a mode of its own
            cpu_seconds={mode: float(getattr(times, mode)) for mode in times._fields
                         if mode not in ("guest", "guest_nice")},
            cpus=self._ps.cpu_count(logical=True) or 1,
            memory_total_bytes=int(mem.total),
            memory_available_bytes=int(mem.available),
            swap_total_bytes=int(swap.total),
            swap_used_bytes=int(swap.used),
        )

    def families(self, s: HostSnapshot) -> Iterable[Metric]:
        cpu = CounterMetricFamily("looptune_host_cpu_seconds", "CPU time of the host summed over all CPUs, "
                                  "by mode (psutil.cpu_times), seconds.", labels=["mode"])
        for mode, seconds in s.cpu_seconds.items():
            cpu.add_metric([mode], seconds)
        yield cpu
        yield GaugeMetricFamily("looptune_host_cpus", "Logical CPUs of the host.", value=s.cpus)
        yield GaugeMetricFamily("looptune_host_memory_total_bytes", "Physical memory of the host, bytes.",
                                value=s.memory_total_bytes)
        yield GaugeMetricFamily("looptune_host_memory_available_bytes",
                                "Memory available to new work without swapping (MemAvailable), bytes.",
                                value=s.memory_available_bytes)
        yield GaugeMetricFamily("looptune_host_swap_total_bytes", "Swap space of the host, bytes.",
                                value=s.swap_total_bytes)
        yield GaugeMetricFamily("looptune_host_swap_used_bytes", "Swap space in use, bytes.",
                                value=s.swap_used_bytes)

    def close(self) -> None:
        pass
