"""The collector protocol and the sampler thread that runs one collector on its interval.

A collector's `sample()` does the slow reading (psutil, NVML) in its sampler's own thread and
returns a snapshot; `families(snapshot)` turns a snapshot into Prometheus metric families at
scrape time. A scrape therefore never waits on a device: a sample that raises is counted and
marks the collector down, and one that hangs past the timeout marks it down as well, while
the other samplers and the endpoint keep going.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Protocol

from prometheus_client.metrics_core import Metric

log = logging.getLogger("looptune.collectors")


class CollectorUnavailable(Exception):
    """The source is absent (no GPU, no driver): the collector is down, counted once per outage.

    The collector logs the reason itself, once; the sampler does not repeat it every sample.
    """


class Collector(Protocol):
    name: str

    def sample(self) -> Any:
        """Read the source; runs in the sampler thread. Raise on failure."""

    def families(self, snapshot: Any) -> Iterable[Metric]:
        """Metric families for one snapshot; runs at scrape time, must be cheap."""

    def close(self) -> None:
        """Release what sample() opened."""


@dataclass(frozen=True)
class SamplerStatus:
    up: bool
    snapshot: Any            # last good snapshot, None until the first success
    errors: int              # failed samples and hang episodes since start
    duration_seconds: float  # wall time of the last finished sample
    last_success: float      # time.time() of the last good sample, 0 if none
    hung: bool               # a sample has been running past the timeout


class Sampler:
    """Runs `collector.sample()` every `interval` seconds in a daemon thread."""

    def __init__(self, collector: Collector, interval: float, timeout: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.collector = collector
        self.name = collector.name
        self.interval = interval
        self.timeout = timeout
        self._clock = clock
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._snapshot: Any = None
        self._up = False
        self._errors = 0
        self._duration = 0.0
        self._last_success = 0.0
        self._started_at: float | None = None   # monotonic start of the sample in progress
        self._hang_counted = False
        self._failing = False                    # logs the first error of a streak only
        self.generation = 0                      # finished samples, good or bad: what a cached scrape keys on

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"looptune-{self.name}", daemon=True)
        self._thread.start()

    def request_stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def stop(self, join_timeout: float = 1.0) -> None:
        self.request_stop()
        if self._thread is not None:
            self._thread.join(join_timeout)
        if self._thread is None or not self._thread.is_alive():
            # a thread stuck in a driver call keeps its collector; closing under it is unsafe
            try:
                self.collector.close()
            except Exception:  # noqa: BLE001 - shutdown must go on
                log.exception("collector %s: close failed", self.name)

    def set_interval(self, interval: float, timeout: float) -> None:
        self.interval, self.timeout = interval, timeout
        self._wake.set()

    def sample_once(self) -> None:
        """One sample in the caller's thread (tests, and the first sample at start)."""
        start = self._clock()
        with self._lock:
            self._started_at = start
            self._hang_counted = False           # a new sample: a new hang episode if it hangs
        try:
            snapshot = self.collector.sample()
        except Exception as exc:  # noqa: BLE001 - any collector failure is counted, never fatal
            unavailable = isinstance(exc, CollectorUnavailable)
            with self._lock:
                first = not self._failing
                # a sample that hung and then failed was counted when it was found hung
                if (first or not unavailable) and not self._hang_counted:
                    self._errors += 1
                self._up = False
                self._started_at = None
                self._duration = self._clock() - start
                self._failing = True
            self.generation += 1
            if first and not unavailable:
                log.warning("collector %s failed: %s", self.name, exc, exc_info=log.isEnabledFor(logging.DEBUG))
            return
        with self._lock:
            self._snapshot = snapshot
            self._up = True
            self._started_at = None
            self._hang_counted = False
            self._duration = self._clock() - start
            self._last_success = time.time()
            self.generation += 1
            if self._failing:
                log.info("collector %s recovered", self.name)
            self._failing = False

    def _run(self) -> None:
        next_at = self._clock()
        while not self._stop.is_set():
            self.sample_once()
            next_at += self.interval
            now = self._clock()
            if next_at < now:          # fell behind (slow sample): skip, don't burst
                next_at = now + self.interval
            self._wake.wait(next_at - now)
            if self._wake.is_set() and not self._stop.is_set():
                self._wake.clear()
                next_at = self._clock()

    def status(self) -> SamplerStatus:
        now = self._clock()
        with self._lock:
            hung = self._started_at is not None and now - self._started_at > self.timeout
            if hung and not self._hang_counted:
                self._hang_counted = True
                self._errors += 1
                log.warning("collector %s: sample running for over %.1fs; marked down", self.name, self.timeout)
            return SamplerStatus(up=self._up and not hung, snapshot=self._snapshot, errors=self._errors,
                                 duration_seconds=self._duration, last_success=self._last_success, hung=hung)

    def count_error(self) -> None:
        with self._lock:
            self._errors += 1
