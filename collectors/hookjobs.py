"""Metric families for the figures that training hooks report (the job's own view).

Used by the daemon for every job on the node, and by a hook in embedded mode for itself.
The process-tree figures of the same job (CPU, memory, I/O, GPU) come from collectors.jobs
under the same {run, rank} labels, so PromQL can join them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.metrics_core import Metric

from looptune import schema
from looptune.protocol import STEP_BUCKETS
from looptune.verdicts import KINDS


@dataclass(frozen=True)
class HookView:
    """One job's last report, as the exporter and `looptune status` see it."""
    run: str
    rank: str
    world_size: int
    pid: int
    counters: dict[str, float]
    step_hist: list[int]
    knobs: dict[str, Any] = field(default_factory=dict)
    memory: dict[str, int] = field(default_factory=dict)
    hook_errors: int = 0
    disabled: bool = False
    connected: bool = True
    last_report_time: float = 0.0     # unix time
    samples_per_second: float | None = None
    data_wait_share: float | None = None
    last_decision: dict[str, Any] | None = None
    mode: str = "daemon"


_PEAK_KIND = {"max_rss_bytes": "max_rss", "cuda_max_allocated_bytes": "cuda_allocated",
              "cuda_max_reserved_bytes": "cuda_reserved"}


def hook_families(jobs: Iterable[HookView], with_info: bool = False) -> Iterable[Metric]:
    lab = ["run", "rank"]
    # one series per figure the schema exports; an optional figure only for jobs that report it
    figures = {f.name: (CounterMetricFamily if f.kind == schema.COUNTER else GaugeMetricFamily)(
        f.metric, f.help, labels=lab) for f in schema.FIGURES if f.metric}
    hist = HistogramMetricFamily("looptune_job_step_seconds", "Wall time between consecutive optimizer "
                                 "steps (data wait included), seconds.", labels=lab)
    knob = GaugeMetricFamily("looptune_job_knob", "Current value of a tunable knob (numeric knobs; "
                             "booleans as 0/1).", labels=lab + ["knob"])
    knob_info = GaugeMetricFamily("looptune_job_knob_info", "Current value of a textual knob; value 1.",
                                  labels=lab + ["knob", "value"])
    peak = GaugeMetricFamily("looptune_job_peak_memory_bytes", "Peak memory the hook sees: max_rss "
                             "(process), cuda_allocated and cuda_reserved (torch.cuda), bytes.",
                             labels=lab + ["kind"])
    errors = CounterMetricFamily("looptune_job_hook_errors", "Exceptions caught inside the hook.",
                                 labels=lab)
    disabled = GaugeMetricFamily("looptune_job_hook_disabled", "1 if the hook disabled itself after "
                                 "repeated failures (training goes on unmeasured).", labels=lab)
    connected = GaugeMetricFamily("looptune_job_hook_connected", "1 while the job's hook is connected; 0 "
                                  "during the grace period after it left.", labels=lab)
    last = GaugeMetricFamily("looptune_job_last_report_timestamp_seconds", "Unix time of the job's last "
                             "report; reports continue during long steps.", labels=lab)
    info = GaugeMetricFamily("looptune_job_info", "A training job; value 1.", labels=lab + ["world_size", "pid"])
    bounds = [str(b) for b in STEP_BUCKETS] + ["+Inf"]
    for j in jobs:
        lv = [j.run, j.rank]
        c = j.counters
        for name, fam in figures.items():
            if c.get(name) is not None:
                fam.add_metric(lv, c[name])
        cumulative, acc = [], 0
        for b, n in zip(bounds, j.step_hist):
            acc += n
            cumulative.append((b, acc))
        hist.add_metric(lv, cumulative, c["step_seconds"])
        for name, value in sorted(j.knobs.items()):
            if isinstance(value, bool):
                knob.add_metric(lv + [name], 1.0 if value else 0.0)
            elif isinstance(value, (int, float)):
                knob.add_metric(lv + [name], float(value))
            elif isinstance(value, str):
                knob_info.add_metric(lv + [name, value], 1.0)
        for kind, n in sorted(j.memory.items()):
            peak.add_metric(lv + [_PEAK_KIND.get(kind, kind)], n)
        errors.add_metric(lv, j.hook_errors)
        disabled.add_metric(lv, 1.0 if j.disabled else 0.0)
        connected.add_metric(lv, 1.0 if j.connected else 0.0)
        last.add_metric(lv, j.last_report_time)
        info.add_metric(lv + [str(j.world_size), str(j.pid)], 1.0)
    yield from figures.values()
    yield from (hist, knob, knob_info, peak, errors, disabled, connected, last)
    if with_info:
        yield info


REJECT_REASONS = ("malformed", "oversized", "version", "unknown_type", "invalid", "not_registered",
                  "pid_mismatch", "job_owned", "duplicate_job", "uid_denied", "rate_limited",
                  "too_many_connections", "too_many_jobs", "slow_consumer")


class HookJobsCollector:
    """The daemon's view of hook-connected jobs and of its socket's health."""
    name = "hooks"

    def __init__(self, views: Callable[[], list[HookView]], rejected: Callable[[], dict[str, int]],
                 connections: Callable[[], int]) -> None:
        self._views, self._rejected, self._connections = views, rejected, connections

    def sample(self) -> tuple[list[HookView], dict[str, int], int]:
        return self._views(), dict(self._rejected()), self._connections()

    def families(self, snap: tuple[list[HookView], dict[str, int], int]) -> Iterable[Metric]:
        views, rejected, conns = snap
        yield from hook_families(views)
        rej = CounterMetricFamily("looptune_messages_rejected", "Socket messages rejected (the connection "
                                  "is closed), by reason.", labels=["reason"])
        for reason in sorted(set(REJECT_REASONS) | set(rejected)):
            rej.add_metric([reason], rejected.get(reason, 0))
        yield rej
        yield GaugeMetricFamily("looptune_hook_connections", "Open connections on the hook socket.", value=conns)

    def close(self) -> None:
        pass


BOTTLENECK_KINDS = KINDS      # looptune.verdicts: one definition for the engine, exporter and dashboards


def tuner_families(outcomes: dict[tuple[str, str, str, str], int],
                   verdicts: dict[tuple[str, str], str]) -> Iterable[Metric]:
    """The engine's decisions and verdicts: (run, tuner, knob, outcome) -> count; (run, rank) -> kind."""
    dec = CounterMetricFamily("looptune_tuner_decisions", "Finished knob trials, by outcome: kept, "
                              "rolled_back, failed.", labels=["run", "tuner", "knob", "outcome"])
    for (run, tuner, knob, outcome), n in sorted(outcomes.items()):
        dec.add_metric([run, tuner, knob, outcome], n)
    yield dec
    bott = GaugeMetricFamily("looptune_job_bottleneck", "What holds the job back now: 1 for the current "
                             "verdict, 0 for the other kinds.", labels=["run", "rank", "kind"])
    for (run, rank), kind in sorted(verdicts.items()):
        for k in BOTTLENECK_KINDS:
            bott.add_metric([run, rank, k], 1.0 if k == kind else 0.0)
    yield bott


class TunerCollector:
    """The engine's decision counts and bottleneck verdicts, sampled like every other collector."""
    name = "tuners"

    def __init__(self, state: Callable[[], tuple[dict[Any, int], dict[tuple[str, str], str]]]) -> None:
        self._state = state

    def sample(self) -> tuple[dict[Any, int], dict[tuple[str, str], str]]:
        return self._state()

    def families(self, snap: tuple[dict[Any, int], dict[tuple[str, str], str]]) -> Iterable[Metric]:
        return tuner_families(*snap)

    def close(self) -> None:
        pass
