"""The daemon's Prometheus collector: every sampler's last snapshot plus the daemon's own health.

Registered on the daemon's own CollectorRegistry. Unlike a bare registry, one failing
collector never fails the scrape: its error is counted, it is marked down, the rest is served.
"""
from __future__ import annotations

import logging
import threading
from typing import Callable, Iterable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from looptune.collectors.base import Sampler

log = logging.getLogger("looptune.exporter")


class ReloadState:
    """What the exporter shows about config reloads; written by the daemon's main loop."""

    def __init__(self) -> None:
        self.successful = True
        self.last_success_time = 0.0
        self.reloads = 0
        self.failures = 0


class DaemonExporter:
    def __init__(self, samplers: Callable[[], Iterable[Sampler]], version: str, reload: ReloadState,
                 extra: Callable[[], Iterable[Metric]] | None = None) -> None:
        self._samplers = samplers
        self._version = version
        self._reload = reload
        self._extra = extra
        self._lock = threading.Lock()   # scrapes may overlap (threaded HTTP server)

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            return list(self._collect())

    def _collect(self) -> Iterable[Metric]:
        up = GaugeMetricFamily("looptune_collector_up", "1 if the collector's last sample succeeded "
                               "and none is hung.", labels=["collector"])
        errors = CounterMetricFamily("looptune_collector_errors", "Failed or hung samples of the collector.",
                                     labels=["collector"])
        duration = GaugeMetricFamily("looptune_collector_duration_seconds", "Wall time of the collector's "
                                     "last sample, seconds.", labels=["collector"])
        last = GaugeMetricFamily("looptune_collector_last_success_timestamp_seconds", "Unix time of the "
                                 "collector's last good sample.", labels=["collector"])
        served: list[Metric] = []
        for s in self._samplers():
            st = s.status()
            ok = st.up and st.snapshot is not None
            if ok:
                try:
                    # all or nothing: families() is often a generator that fails halfway
                    served.extend(list(s.collector.families(st.snapshot)))
                except Exception:  # noqa: BLE001 - one collector must not fail the scrape
                    log.exception("collector %s: exposition failed", s.name)
                    s.count_error()
                    ok = False
                    st = s.status()
            up.add_metric([s.name], 1.0 if ok else 0.0)
            errors.add_metric([s.name], st.errors)
            duration.add_metric([s.name], st.duration_seconds)
            last.add_metric([s.name], st.last_success)
        yield from served
        yield from (up, errors, duration, last)
        build = GaugeMetricFamily("looptune_build_info", "looptune version; value 1.", labels=["version"])
        build.add_metric([self._version], 1)
        yield build
        r = self._reload
        yield GaugeMetricFamily("looptune_config_last_reload_successful",
                                "1 if the last config load or reload succeeded.", value=1 if r.successful else 0)
        yield GaugeMetricFamily("looptune_config_last_reload_success_timestamp_seconds",
                                "Unix time of the last successful config load.", value=r.last_success_time)
        yield CounterMetricFamily("looptune_config_reloads", "Config reloads attempted (SIGHUP).", value=r.reloads)
        yield CounterMetricFamily("looptune_config_reload_failures", "Config reloads rejected; the previous "
                                  "config stayed in force.", value=r.failures)
        if self._extra is not None:
            try:
                extra = list(self._extra())
            except Exception:  # noqa: BLE001
                log.exception("extra metrics failed")
            else:
                yield from extra
