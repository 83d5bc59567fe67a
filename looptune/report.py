"""`looptune report`: one training run as an HTML page with PNG plots, read from Prometheus.

    looptune report --prometheus http://prometheus:9090 --run RUN [--since 1h] [--out DIR]

For people without Grafana: the Training job dashboard's panels for one run (the very same
PromQL: both take it from looptune/promql.py, see PANELS), a table of the tuners' decisions and knob changes, and a one-paragraph
summary ("input-bound 72% of the time until 14:02; num_workers 0→12; samples/s ×3.1").
It writes DIR/index.html and one PNG per panel beside it. matplotlib is an optional extra
(`pip install 'looptune[report]'`); the rest is the standard library, so the daemon itself
never needs it. Times are shown in the local time zone.
"""
from __future__ import annotations

import argparse
import base64
import html
import json
import math
import os
import re
import statistics
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable, Sequence

from looptune import promql as q
from looptune.verdicts import DESCRIPTIONS, INPUT_WAIT_SHARE, KINDS

MAX_POINTS = 400            # points per series and panel (the step follows from the time range)
DEFAULT_SCRAPE_SECONDS = 15.0
MATPLOTLIB_HINT = ("looptune report draws its plots with matplotlib, an optional extra: "
                   "pip install 'looptune[report]' (or pip install matplotlib)")


class ReportError(Exception):
    """A report that cannot be made: the message says why, for the command line."""


# ---------------------------------------------------------------------------------------------
# the panels: the same queries as dashboards/grafana/looptune-job.json (a test keeps them equal)

@dataclass(frozen=True)
class PanelSpec:
    title: str
    description: str
    queries: tuple[tuple[str, str], ...]    # (PromQL with $run, $rank, $__rate_interval; legend)
    unit: str                               # samples/s, ratio, seconds, bytes, cores, count, verdict
    steps: bool = False
    empty: str = "no data for this run in the time range"


_SEL = 'run="$run", rank=~"$rank"'
_RUN = 'run="$run"'

PANELS: tuple[PanelSpec, ...] = (
    PanelSpec("Samples/s", "Training samples per second, per rank and for the whole run.", (
        (q.samples_rate(_SEL), "rank {{rank}}"),
        (q.samples_rate(_RUN, by=None), "whole run"),
    ), "samples/s", empty="no hook reports for this run: is its hook connected to a daemon?"),
    PanelSpec("Data-wait share", "Share of wall time each rank's loop waited for the next batch.", (
        (q.data_wait_share(_SEL), "rank {{rank}}"),
    ), "ratio"),
    PanelSpec("Step time", "Time between optimizer steps (data wait included), p50 and p95.", (
        (q.step_seconds_quantile(0.5, _SEL), "p50 rank {{rank}}"),
        (q.step_seconds_quantile(0.95, _SEL), "p95 rank {{rank}}"),
    ), "seconds"),
    PanelSpec("Knob values", "Value of each numeric knob over time; dashed lines mark the tuners' "
              "decisions (green kept, red rolled back or failed).", (
        (q.knob(_SEL), "{{knob}} rank {{rank}}"),
    ), "count", steps=True),
    PanelSpec("Bottleneck verdict", "What held the job back, per the tuner engine: ranks per verdict.", (
        (q.bottleneck_ranks(_SEL), "{{kind}}"),
    ), "verdict", empty="no bottleneck verdicts recorded for this run (they come from the tuner engine)"),
    PanelSpec("Job CPU", "CPU cores used by each rank's process tree, DataLoader workers included.", (
        (q.job_cpu_cores(_SEL), "rank {{rank}} {{mode}}"),
    ), "cores"),
    PanelSpec("Processes", "Processes in each rank's tree: the rank and its DataLoader workers.", (
        (q.job_processes(_SEL), "rank {{rank}}"),
    ), "count", steps=True),
    PanelSpec("Job memory", "Memory of each rank's process tree (rss, pss, uss) and the peak RSS.", (
        (q.job_memory(_SEL), "rank {{rank}} {{kind}}"),
        (q.peak_memory(_SEL, 'kind="max_rss"'), "rank {{rank}} peak rss"),
    ), "bytes"),
    PanelSpec("GPU utilization per rank", "SM utilization NVML attributes to each rank's processes, "
              "and the utilization of each GPU the rank holds.", (
        (q.job_gpu_utilization(_SEL), "rank {{rank}} gpu {{gpu}} (own)"),
        (q.device_gpu_utilization_held(_SEL), "rank {{rank}} gpu {{gpu}} (device)"),
    ), "ratio", empty="this run held no GPU"),
    PanelSpec("GPU memory per rank", "GPU memory each rank's processes hold, and torch.cuda's peaks.", (
        (q.job_gpu_memory(_SEL), "rank {{rank}} gpu {{gpu}}"),
        (q.peak_memory(_SEL, 'kind=~"cuda_.*"'), "rank {{rank}} peak {{kind}}"),
    ), "bytes", empty="this run held no GPU memory"),
)

# queries of the report's own: the run's extent, and the decisions
_EXTENT = 'count({__name__=~"looptune_job_info|looptune_job_samples_total", run="$run"})'
_DECISIONS = 'sum by (tuner, knob, outcome) (looptune_tuner_decisions_total{run="$run"})'
_TEXT_KNOBS = 'looptune_job_knob_info{run="$run"}'
_PLACES = 'count by (instance, rank) ({__name__=~"looptune_job_info|looptune_job_samples_total", run="$run"})'
_SAMPLES = 'sum(looptune_job_samples_total{run="$run"})'     # the raw counter: exact before/after figures

# one color per verdict kind (looptune.verdicts.KINDS; a test keeps the two equal)
VERDICT_COLORS = {"input": "#ff9830", "cpu": "#b877d9", "gpu": "#73bf69", "memory_headroom": "#f2495c",
                  "communication": "#5794f2", "none": "#9fa7b3"}


# ---------------------------------------------------------------------------------------------
# Prometheus

@dataclass
class Series:
    labels: dict[str, str]
    t: list[float]           # unix seconds
    v: list[float]

    def at(self, when: float, tol: float) -> float | None:
        """The value at the point nearest `when`, within `tol` seconds."""
        best, best_d = None, tol
        for t, v in zip(self.t, self.v):
            d = abs(t - when)
            if d <= best_d:
                best, best_d = v, d
        return best


def parse_duration(text: str) -> float:
    """A Prometheus duration ("90s", "30m", "1h30m", "2d", "1w") in seconds."""
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}
    parts = re.findall(r"(\d+)(ms|s|m|h|d|w|y)", text or "")
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ReportError(f"--since {text!r} is not a duration like 30m, 1h, 2h30m or 7d")
    seconds = sum(int(n) * units[u] for n, u in parts)
    if seconds <= 0:
        raise ReportError(f"--since {text!r} must be longer than zero")
    return float(seconds)


class Prometheus:
    """The few calls of Prometheus' HTTP API the report needs (GET, JSON)."""

    def __init__(self, url: str, timeout: float = 30.0) -> None:
        parts = urllib.parse.urlsplit(url if "://" in url else "http://" + url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ReportError(f"--prometheus {url!r} is not an http(s) URL")
        self.headers = {"Accept": "application/json", "User-Agent": "looptune-report"}
        if parts.username is not None:      # http://user:password@host:9090
            cred = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
            self.headers["Authorization"] = "Basic " + base64.b64encode(cred.encode()).decode()
        netloc = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
        if parts.port:
            netloc += f":{parts.port}"
        self.base = urllib.parse.urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))
        self.display = self.base
        self.timeout = timeout
        loopback = parts.hostname in ("localhost", "::1") or parts.hostname.startswith("127.")
        # a proxy from the environment must not swallow a Prometheus on this very machine
        self._opener = urllib.request.build_opener(*([urllib.request.ProxyHandler({})] if loopback else []))

    def get(self, path: str, **params: Any) -> Any:
        url = f"{self.base}{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params, doseq=True)
        req = urllib.request.Request(url, headers=self.headers)
        try:
            with self._opener.open(req, timeout=self.timeout) as resp:
                body = resp.read()
        except urllib.error.HTTPError as exc:
            body = exc.read()
            try:
                detail = json.loads(body).get("error") or body[:300].decode("utf-8", "replace")
            except ValueError:
                detail = body[:300].decode("utf-8", "replace")
            raise ReportError(f"Prometheus at {self.display} answered HTTP {exc.code} to {path}: {detail}") from None
        except (OSError, ValueError) as exc:
            raise ReportError(f"cannot reach Prometheus at {self.display}: {exc}") from None
        try:
            data = json.loads(body)
        except ValueError:
            raise ReportError(f"{self.display}{path} did not answer JSON: is this Prometheus?") from None
        if data.get("status") != "success":
            raise ReportError(f"Prometheus at {self.display}: {data.get('error', data)}")
        return data["data"]

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[Series]:
        data = self.get("/api/v1/query_range", query=expr, start=f"{start:.3f}", end=f"{end:.3f}",
                        step=f"{step:g}")
        return [Series(dict(r["metric"]), [float(t) for t, _ in r["values"]], [float(v) for _, v in r["values"]])
                for r in data["result"]]

    def label_values(self, label: str, match: str, start: float, end: float) -> list[str]:
        return list(self.get(f"/api/v1/label/{label}/values", **{"match[]": match, "start": f"{start:.3f}",
                                                                  "end": f"{end:.3f}"}))

    def scrape_intervals(self) -> dict[str, float]:
        """instance -> scrape interval in seconds, of the active targets (empty if unknown)."""
        try:
            targets = self.get("/api/v1/targets", state="active")["activeTargets"]
        except (ReportError, KeyError, TypeError):
            return {}
        out: dict[str, float] = {}
        for t in targets:
            try:
                seconds = parse_duration(t.get("scrapeInterval", ""))
            except ReportError:
                continue
            inst = t.get("labels", {}).get("instance", "")
            out[inst] = max(out.get(inst, 0.0), seconds)
        return out


# ---------------------------------------------------------------------------------------------
# what the report holds

@dataclass
class KnobChange:
    time: float
    knob: str
    old: str
    new: str
    ranks: list[str]


@dataclass
class DecisionRow:
    time: float
    knob: str
    change: str              # "0 → 4", or "" when no knob change matches
    ranks: str
    tuner: str
    outcome: str
    count: int = 1


@dataclass
class PanelData:
    spec: PanelSpec
    series: list[tuple[str, Series]]        # (legend, series)
    image: str | None = None                # file name of the PNG, None when there is no data


@dataclass
class Report:
    run: str
    prometheus: str
    start: float
    end: float
    step: float
    rate_window: str
    ranks: list[str]
    nodes: list[str]
    panels: list[PanelData]
    decisions: list[DecisionRow]
    decisions_metric_found: bool
    summary: str
    samples_total: Series | None = None     # all ranks' samples counter, for before/after throughput
    generated: float = field(default_factory=time.time)


def expand(expr: str, run: str, rate_window: str, rank: str = ".*") -> str:
    """Substitute the dashboard's template variables the way Grafana does for one run."""
    return (expr.replace("$__rate_interval", rate_window).replace("$run", run).replace("$rank", rank))


def legend(fmt: str, labels: dict[str, str]) -> str:
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt).strip() or \
        ", ".join(f"{k}={v}" for k, v in sorted(labels.items()) if k != "__name__")


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')


def collect(prom: Prometheus, run: str, since_seconds: float, now: float | None = None) -> Report:
    """Query everything the report shows; no matplotlib here."""
    now = time.time() if now is None else now
    qrun = _escape_label(run)
    start, end = now - since_seconds, now
    coarse = max(1.0, math.ceil(since_seconds / MAX_POINTS))
    extent = prom.query_range(_EXTENT.replace("$run", qrun), start, end, coarse)
    times = sorted({t for s in extent for t in s.t})
    if not times:
        known = prom.label_values("run", '{__name__=~"looptune_job_info|looptune_job_samples_total"}', start, end)
        hint = f"; runs seen in that time: {', '.join(sorted(known)[:20])}" if known else \
            "; Prometheus has no looptune job data in that time at all"
        raise ReportError(f"no data for run {run!r} in the last {_human_duration(since_seconds)}{hint}")
    start, end = max(start, times[0] - coarse), min(end, times[-1] + coarse)
    step = max(1.0, math.ceil((end - start) / MAX_POINTS))

    places = prom.query_range(_PLACES.replace("$run", qrun), start, end, step)
    ranks = sorted({s.labels.get("rank", "") for s in places}, key=_rank_key)
    nodes = sorted({s.labels.get("instance", "") for s in places})
    intervals = prom.scrape_intervals()
    scrape = max((intervals[n] for n in nodes if n in intervals), default=0.0) or \
        max(intervals.values(), default=0.0) or DEFAULT_SCRAPE_SECONDS
    window = max(step + scrape, 4 * scrape)            # Grafana's $__rate_interval
    rate_window = f"{int(math.ceil(window))}s"

    panels = []
    for spec in PANELS:
        got: list[tuple[str, Series]] = []
        for expr, fmt in spec.queries:
            for s in prom.query_range(expand(expr, qrun, rate_window), start, end, step):
                if any(math.isfinite(v) for v in s.v):
                    got.append((legend(fmt, s.labels), s))
        got.sort(key=lambda item: _natural(item[0]))
        panels.append(PanelData(spec, got))

    knob_panel = next(p for p in panels if p.spec.title == "Knob values")
    changes = knob_changes([s for _, s in knob_panel.series], step)
    changes += text_knob_changes(prom.query_range(_TEXT_KNOBS.replace("$run", qrun), start, end, step), step)
    changes.sort(key=lambda c: c.time)
    decision_series = prom.query_range(_DECISIONS.replace("$run", qrun), start, end, step)
    first_seen: dict[str, float] = {}
    for _, ks in knob_panel.series:
        knob = ks.labels.get("knob", "?")
        first_seen[knob] = min(first_seen.get(knob, ks.t[0]), ks.t[0])
    decisions = decision_rows(decision_series, changes, start, step, window, first_seen)
    counter = prom.query_range(_SAMPLES.replace("$run", qrun), start, end, step)
    report = Report(run=run, prometheus=prom.display, start=start, end=end, step=step, rate_window=rate_window,
                    ranks=ranks, nodes=nodes, panels=panels, decisions=decisions,
                    decisions_metric_found=bool(decision_series), summary="",
                    samples_total=counter[0] if counter else None)
    report.summary = summarize(report, changes, window)
    return report


def _rank_key(rank: str) -> tuple[int, str]:
    return (int(rank), "") if rank.isdigit() else (1 << 30, rank)


def _natural(text: str) -> list[Any]:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", text)]


def _fmt_value(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:g}"


def knob_changes(series: Iterable[Series], step: float) -> list[KnobChange]:
    """Changes of numeric knobs, one entry per (time, knob, old, new) with the ranks it happened on."""
    found: dict[tuple[float, str, str, str], list[str]] = {}
    for s in series:
        knob, rank = s.labels.get("knob", "?"), s.labels.get("rank", "")
        prev = None
        for t, v in zip(s.t, s.v):
            if not math.isfinite(v):
                continue
            if prev is not None and v != prev:
                key = (_bucket(t, step), knob, _fmt_value(prev), _fmt_value(v))
                found.setdefault(key, []).append(rank)
            prev = v
    return [KnobChange(t, k, o, n, sorted(r, key=_rank_key)) for (t, k, o, n), r in found.items()]


def text_knob_changes(series: Iterable[Series], step: float) -> list[KnobChange]:
    """Changes of textual knobs (looptune_job_knob_info{knob, value}): the value series in force
    switches from one label value to another."""
    timeline: dict[tuple[str, str], dict[float, str]] = {}
    for s in series:
        key = (s.labels.get("knob", "?"), s.labels.get("rank", ""))
        for t in s.t:
            timeline.setdefault(key, {})[t] = s.labels.get("value", "")
    found: dict[tuple[float, str, str, str], list[str]] = {}
    for (knob, rank), points in timeline.items():
        prev = None
        for t in sorted(points):
            if prev is not None and points[t] != prev:
                found.setdefault((_bucket(t, step), knob, prev, points[t]), []).append(rank)
            prev = points[t]
    return [KnobChange(t, k, o, n, sorted(r, key=_rank_key)) for (t, k, o, n), r in found.items()]


def _bucket(t: float, step: float) -> float:
    return round(t / step) * step


def _ranks_text(ranks: Sequence[str]) -> str:
    if not ranks:
        return ""
    if len(ranks) > 1 and all(r.isdigit() for r in ranks):
        nums = [int(r) for r in ranks]
        if nums == list(range(nums[0], nums[-1] + 1)):
            return f"{nums[0]}–{nums[-1]}"
    return ", ".join(ranks)


@dataclass
class Trial:
    """A knob change, and the change back if it was undone (a rolled-back trial)."""
    change: KnobChange
    revert: KnobChange | None = None


def trials_of(changes: list[KnobChange], max_seconds: float) -> list[Trial]:
    """Pair each change with the next change of the same knob if that one undoes it soon after."""
    out: list[Trial] = []
    by_knob: dict[str, list[KnobChange]] = {}
    for c in sorted(changes, key=lambda c: c.time):
        by_knob.setdefault(c.knob, []).append(c)
    for cs in by_knob.values():
        i = 0
        while i < len(cs):
            c = cs[i]
            nxt = cs[i + 1] if i + 1 < len(cs) else None
            if nxt is not None and (nxt.old, nxt.new) == (c.new, c.old) and nxt.time - c.time <= max_seconds:
                out.append(Trial(c, nxt))
                i += 2
            else:
                out.append(Trial(c))
                i += 1
    out.sort(key=lambda t: t.change.time)
    return out


def decision_events(series: Iterable[Series], start: float, step: float) -> list[tuple[float, str, str, str, int]]:
    """(time, tuner, knob, outcome, count) for each increase of looptune_tuner_decisions_total.
    A tuner's first decision of a kind creates its counter at 1: a series that begins after
    the range does counts from zero; one already there at the start is the baseline."""
    events = []
    for s in series:
        tuner, knob, outcome = (s.labels.get(k, "") for k in ("tuner", "knob", "outcome"))
        prev = None
        for t, v in zip(s.t, s.v):
            if not math.isfinite(v):
                continue
            if prev is None:
                n = v if t - start > 2 * step else 0.0
            else:
                n = v - prev if v >= prev else v        # a reset starts from zero again
            prev = v
            if n > 0:
                events.append((t, tuner, knob, outcome, int(n)))
    events.sort()
    return events


def decision_rows(series: Iterable[Series], changes: list[KnobChange], start: float, step: float,
                  window: float, first_seen: dict[str, float] | None = None) -> list[DecisionRow]:
    """One row per trial: the knob change a tuner made, with the outcome its decision counter
    recorded when the trial ended (kept; rolled_back: the change was undone; failed). A decision
    is counted after its trial began, so it belongs to the latest trial of its knob that began
    before it and fits its outcome (a rolled-back trial is one whose change was undone); a
    decision no trial fits gets a row of its own, and changes no decision explains (a trial
    still running, a change by hand) keep '—'. `first_seen`: knob -> when its series begins,
    for a trial that was already running at the first sample (only its undoing is seen)."""
    events = decision_events(series, start, step)
    late = step + window / 4     # a knob's new value shows up to a report and a scrape late
    trials = trials_of(changes, max_seconds=600)
    for knob, seen in (first_seen or {}).items():
        mine = [i for i, tr in enumerate(trials) if tr.change.knob == knob]
        if not mine or trials[mine[0]].revert is not None:
            continue
        c0 = trials[mine[0]].change
        if any(k == knob and out in ("rolled_back", "failed") and t <= c0.time + late
               for t, _, k, out, _ in events):
            trials[mine[0]] = Trial(KnobChange(seen, knob, c0.new, c0.old, c0.ranks), revert=c0)
    outcome: dict[int, tuple[str, str, int]] = {}
    rows: list[DecisionRow] = []
    for t, tuner, knob, out, n in events:
        undone = out in ("rolled_back", "failed")
        fitting = [i for i, tr in enumerate(trials) if i not in outcome and tr.change.knob == knob
                   and tr.change.time <= t + late and (tr.revert is not None) == undone]
        before = [i for i in fitting if trials[i].change.time <= t]
        pick = (before or fitting or [None])[-1]
        if pick is None:
            rows.append(DecisionRow(t, knob, "", "", tuner, out, n))   # e.g. failed: nothing changed
        else:
            outcome[pick] = (tuner, out, n)
    for i, tr in enumerate(trials):
        c = tr.change
        tuner, out, n = outcome.get(i, ("", "", 1))
        rows.append(DecisionRow(c.time, c.knob, f"{c.old} → {c.new}", _ranks_text(c.ranks), tuner, out, n))
    rows.sort(key=lambda r: r.time)
    return rows


# ---------------------------------------------------------------------------------------------
# the summary paragraph

def _series_mean(points: Iterable[float]) -> float | None:
    vals = [v for v in points if math.isfinite(v)]
    return statistics.fmean(vals) if vals else None


def _mean_by_time(series: Sequence[Series]) -> list[tuple[float, float]]:
    """The mean over series at each timestamp (ranks averaged)."""
    acc: dict[float, list[float]] = {}
    for s in series:
        for t, v in zip(s.t, s.v):
            if math.isfinite(v):
                acc.setdefault(t, []).append(v)
    return sorted((t, statistics.fmean(vs)) for t, vs in acc.items())


def _clock(t: float, span: float) -> str:
    return datetime.fromtimestamp(t).astimezone().strftime("%H:%M" if span >= 600 else "%H:%M:%S")


def _human_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def _panel(report: Report, title: str) -> PanelData:
    return next(p for p in report.panels if p.spec.title == title)


def bound_phases(timeline: list[tuple[float, str]]) -> tuple[str | None, float, float | None]:
    """(the verdict held longest, its share of the points, when it last held if it no longer
    holds at the end, else None)."""
    counts: dict[str, int] = {}
    for _, kind in timeline:
        counts[kind] = counts.get(kind, 0) + 1
    kind = max((k for k in counts if k not in ("none", "other")), key=lambda k: counts[k], default=None)
    if kind is None:
        return None, 0.0, None
    share = counts[kind] / len(timeline)
    until = max(t for t, k in timeline if k == kind) if timeline[-1][1] != kind else None
    return kind, share, until


def settled_setting(report: Report, changes: list[KnobChange]) -> tuple[str, str] | None:
    """(knob, value) the tuners settled on: the last kept trial's, else the last change's."""
    kept = [r for r in report.decisions if r.outcome == "kept" and r.change]
    if kept:
        return kept[-1].knob, kept[-1].change.split(" → ")[1]
    if changes:
        return changes[-1].knob, changes[-1].new
    return None


def summarize(report: Report, changes: list[KnobChange], window: float) -> str:
    span = report.end - report.start
    ranks, nodes = len(report.ranks), len(report.nodes)
    head = (f"Run {report.run} ({ranks} rank{'s' if ranks != 1 else ''} on {nodes} node{'s' if nodes != 1 else ''}"
            f", {_clock(report.start, span)}–{_clock(report.end, span)}, {_human_duration(span)})")
    parts: list[str] = []

    # where the time went: the engine's verdicts where there are some, else the data-wait share
    by_time: dict[float, dict[str, float]] = {}
    for _, s in _panel(report, "Bottleneck verdict").series:
        for t, v in zip(s.t, s.v):
            if math.isfinite(v) and v > 0:
                by_time.setdefault(t, {})[s.labels.get("kind", "?")] = v
    timeline = [(t, max(ks, key=lambda k: ks[k])) for t, ks in sorted(by_time.items())]
    kind, share, until = bound_phases(timeline) if timeline else (None, 0.0, None)
    if kind is not None:
        parts.append(f"{kind}-bound {share:.0%} of the time" + (f" until {_clock(until, span)}" if until else ""))
    else:
        wait = _mean_by_time([s for _, s in _panel(report, "Data-wait share").series])
        if wait:
            kind, share, until = bound_phases([(t, "input" if v >= INPUT_WAIT_SHARE else "other")
                                               for t, v in wait])
            if kind is not None:
                parts.append(f"input-bound (waiting on data {INPUT_WAIT_SHARE:.0%} of the time or more) "
                             f"{share:.0%} of the time"
                             + (f" until {_clock(until, span)}" if until else ""))
            else:
                parts.append(f"waited on data {statistics.fmean(v for _, v in wait):.0%} of its time")

    # what changed, and what it bought
    settled = settled_setting(report, changes)
    total = [s for name, s in _panel(report, "Samples/s").series if name == "whole run"]
    if settled is None:
        parts.append("no knob changed")
        if total:
            mean = _series_mean(total[0].v)
            if mean is not None:
                parts.append(f"{mean:,.0f} samples/s on average")
    else:
        knob, value = settled
        mine = [c for c in changes if c.knob == knob]
        trials = [r for r in report.decisions if r.knob == knob and r.change]
        tried = len(trials)
        first_old = trials[0].change.split(" → ")[0] if trials else mine[0].old
        text = f"{knob} {first_old}→{value}"
        if tried > 1:
            text += f" after {tried} trials"
        if mine[-1].new != value:
            text += f" (now trying {mine[-1].new})"
        parts.append(text)
        # samples/s from the raw counter: before the first kept change (a rolled-back trial changed
        # nothing for long), and since the change to the setting the tuners settled on
        kept_at = [r.time for r in report.decisions if r.outcome == "kept" and r.knob == knob and r.change]
        settled_at = [r.time for r in report.decisions if r.knob == knob and r.change.endswith(f"→ {value}")]
        if report.samples_total is not None and report.samples_total.t:
            c = report.samples_total
            first_change = kept_at[0] if kept_at else changes[0].time
            before = _counter_rate(c, c.t[0], first_change, report.step)
            after = _counter_rate(c, (settled_at or [changes[-1].time])[-1], c.t[-1], report.step)
            if before and after:
                parts.append(f"samples/s ×{after / before:.1f} ({before:,.0f} → {after:,.0f})")
    kept = sum(r.count for r in report.decisions if r.outcome == "kept")
    undone = sum(r.count for r in report.decisions if r.outcome in ("rolled_back", "failed"))
    if kept or undone:
        parts.append(f"{kept} trial{'s' if kept != 1 else ''} kept, {undone} rolled back or failed")
    return f"{head}: " + "; ".join(parts) + "."


def _counter_rate(c: Series, t0: float, t1: float, step: float) -> float | None:
    """Per-second increase of a counter between its points nearest t0 and t1 (None when the
    interval is too short or the counter was reset)."""
    pts = [(t, v) for t, v in zip(c.t, c.v) if math.isfinite(v) and t0 - step / 2 <= t <= t1 + step / 2]
    if len(pts) < 3 or pts[-1][0] - pts[0][0] < 2 * step:
        return None
    if any(b[1] < a[1] for a, b in zip(pts, pts[1:])):
        return None
    return (pts[-1][1] - pts[0][1]) / (pts[-1][0] - pts[0][0])


# ---------------------------------------------------------------------------------------------
# drawing

def _require_matplotlib() -> Any:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ReportError(MATPLOTLIB_HINT) from None
    return Figure, FigureCanvasAgg


def _bytes_scale(series: Sequence[tuple[str, Series]]) -> tuple[float, str]:
    """(divisor, unit) so that the largest value plots between 1 and 1024: round ticks."""
    top = max((v for _, s in series for v in s.v if math.isfinite(v)), default=0.0)
    scale, unit = 1.0, "bytes"
    for u in ("KiB", "MiB", "GiB", "TiB"):
        if top >= 1024 * scale:
            scale, unit = scale * 1024, u
    return scale, unit


def _formatter(unit: str) -> Any:
    from matplotlib.ticker import FuncFormatter

    def seconds(v: float, _: Any) -> str:
        return f"{v * 1000:.0f} ms" if abs(v) < 1 else f"{v:.1f} s"

    return FuncFormatter({"seconds": seconds,
                          "ratio": lambda v, _: f"{v:.0%}"}.get(unit, lambda v, _: f"{v:g}"))


def _with_gaps(s: Series, step: float) -> tuple[list[datetime], list[float]]:
    """Datetimes and values, with a NaN wherever points are missing so lines break there."""
    xs: list[datetime] = []
    ys: list[float] = []
    prev = None
    for t, v in zip(s.t, s.v):
        if prev is not None and t - prev > 1.5 * step:
            xs.append(datetime.fromtimestamp(prev + step).astimezone())
            ys.append(float("nan"))
        xs.append(datetime.fromtimestamp(t).astimezone())
        ys.append(v)
        prev = t
    return xs, ys


def draw(panel: PanelData, report: Report, path: Path, mpl: Any) -> None:
    import matplotlib.dates as mdates

    Figure, FigureCanvasAgg = mpl
    fig = Figure(figsize=(10, 3.3), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    spec = panel.spec
    title = spec.title
    if spec.unit == "verdict":
        _draw_verdicts(ax, panel, report)
    else:
        series = panel.series
        if title == "Knob values":
            # knobs that never change would only squash the others: name them in the title
            constant = [(name, s) for name, s in series
                        if len({v for v in s.v if math.isfinite(v)}) == 1
                        and all(b - a <= 1.5 * report.step for a, b in zip(s.t, s.t[1:]))]
            if len(constant) < len(series):
                series = [item for item in series if item not in constant]
                title += "".join(f"  ({s.labels.get('knob')} {_fmt_value(s.v[0])} throughout)" for _, s in constant)
        scale, suffix = _bytes_scale(series) if spec.unit == "bytes" else (1.0, "")
        for label, s in series:
            xs, ys = _with_gaps(s, report.step)
            ys = [y / scale for y in ys]
            style: dict[str, Any] = {"linewidth": 1.4}
            if label == "whole run":
                style = {"linewidth": 2.2, "color": "#1f2328", "linestyle": (0, (4, 2)), "zorder": 3}
            ax.plot(xs, ys, label=label, drawstyle="steps-post" if spec.steps else "default", **style)
        if spec.unit == "bytes":
            ax.set_ylabel(suffix)
        else:
            ax.yaxis.set_major_formatter(_formatter(spec.unit))
        if spec.unit == "ratio":
            ax.set_ylim(0, 1.02)
        else:
            ax.set_ylim(bottom=0)
        if spec.title == "Knob values":
            shown = set()
            for row in report.decisions:
                if row.tuner and row.change:
                    kept = row.outcome == "kept"
                    label = "trial kept" if kept else "trial rolled back"
                    ax.axvline(datetime.fromtimestamp(row.time).astimezone(), color="#2ca02c" if kept else "#d62728",
                               linestyle="--", linewidth=1, label=None if label in shown else label)
                    shown.add(label)
        if spec.unit not in ("ratio", "bytes", "seconds", "verdict"):
            ax.set_ylabel(spec.unit)
    tz = datetime.now().astimezone().tzinfo
    ax.xaxis.set_major_locator(mdates.AutoDateLocator(tz=tz, maxticks=10))
    ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M" if report.end - report.start >= 900 else "%H:%M:%S",
                                                      tz=tz))
    ax.set_xlim(datetime.fromtimestamp(report.start).astimezone(), datetime.fromtimestamp(report.end).astimezone())
    ax.set_title(title, loc="left", fontsize=11, fontweight="bold")
    ax.grid(alpha=0.3)
    handles, _ = ax.get_legend_handles_labels()
    if handles:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False,
                  ncols=1 if len(handles) <= 14 else 2)
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png")
    tmp.replace(path)


def _draw_verdicts(ax: Any, panel: PanelData, report: Report) -> None:
    """Ranks per verdict, stacked: the band of each verdict shows how many ranks held it."""
    times = sorted({t for _, s in panel.series for t in s.t})
    xs = [datetime.fromtimestamp(t).astimezone() for t in times]
    bottom = [0.0] * len(times)
    for label, s in panel.series:
        if not any(math.isfinite(v) and v > 0 for v in s.v):
            continue
        by_t = dict(zip(s.t, s.v))
        top = [b + (by_t.get(t, 0.0) if math.isfinite(by_t.get(t, 0.0)) else 0.0) for b, t in zip(bottom, times)]
        kind = s.labels.get("kind", label)
        ax.fill_between(xs, bottom, top, step="post", label=kind, color=VERDICT_COLORS.get(kind), alpha=0.85,
                        linewidth=0)
        bottom = top
    ax.set_ylim(0, max(bottom + [1]) * 1.05)
    ax.set_ylabel("ranks")


# ---------------------------------------------------------------------------------------------
# the page

_CSS = """
body { font: 15px/1.45 system-ui, sans-serif; max-width: 1060px; margin: 2em auto; padding: 0 1em; color: #1f2328; }
h1 { font-size: 1.5em; margin-bottom: .2em; } h2 { font-size: 1.15em; margin-top: 1.8em; }
.meta { color: #59636e; font-size: .9em; } .summary { font-size: 1.08em; background: #f6f8fa;
  border-left: 4px solid #ff9830; padding: .7em 1em; }
table { border-collapse: collapse; font-size: .92em; } th, td { border-bottom: 1px solid #d1d9e0;
  padding: .3em .8em; text-align: left; } th { background: #f6f8fa; }
figure { margin: 1.2em 0; } figure img { max-width: 100%; } figcaption { color: #59636e; font-size: .9em; }
.empty { color: #59636e; font-style: italic; } code { font-size: .85em; } details { margin-top: .3em; }
""".strip()


def render_html(report: Report) -> str:
    e = html.escape
    span = report.end - report.start
    tzname = datetime.now().astimezone().strftime("%Z (UTC%z)")
    out = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>looptune report: {e(report.run)}</title>", f"<style>{_CSS}</style></head><body>",
        f"<h1>looptune report: run <code>{e(report.run)}</code></h1>",
        f'<p class="meta">{e(_stamp(report.start))} – {e(_stamp(report.end))} ({e(_human_duration(span))}), '
        f"times in {e(tzname)}; ranks {e(_ranks_text(report.ranks) or '-')} on "
        f"{e(', '.join(report.nodes) or '-')}; from {e(report.prometheus)}, one point every "
        f"{report.step:g} s, rates over {e(report.rate_window)}.</p>",
        f'<p class="summary">{e(report.summary)}</p>',
        "<h2>Decisions and knob changes</h2>",
    ]
    if report.decisions:
        out.append("<table><tr><th>time</th><th>knob</th><th>change</th><th>ranks</th><th>tuner</th>"
                   "<th>outcome</th></tr>")
        for r in report.decisions:
            outcome = r.outcome + (f" ×{r.count}" if r.count > 1 else "")
            out.append(f"<tr><td>{e(_stamp(r.time))}</td><td>{e(r.knob)}</td><td>{e(r.change or '—')}</td>"
                       f"<td>{e(r.ranks or '—')}</td><td>{e(r.tuner or '—')}</td><td>{e(outcome or '—')}</td></tr>")
        out.append("</table>")
    else:
        out.append('<p class="empty">No knob changed and no tuner decided anything in this time range.</p>')
    if not report.decisions_metric_found:
        out.append('<p class="meta">Prometheus holds no looptune_tuner_decisions_total for this run: rows '
                   "without a tuner are knob changes seen in looptune_job_knob.</p>")
    out.append("<h2>Panels</h2>")
    for p in report.panels:
        out.append("<figure>")
        if p.image:
            out.append(f'<img src="{e(p.image)}" alt="{e(p.spec.title)}">')
        else:
            out.append(f"<h3>{e(p.spec.title)}</h3><p class=\"empty\">No data: {e(p.spec.empty)}.</p>")
        queries = "".join(f"<br><code>{e(expand(q, report.run, report.rate_window))}</code>" for q, _ in p.spec.queries)
        kinds = ""
        if p.spec.unit == "verdict":     # what each verdict means (looptune.verdicts)
            kinds = "".join(f"<br><b>{e(k)}</b>: {e(DESCRIPTIONS[k])}" for k in KINDS)
        out.append(f"<figcaption>{e(p.spec.description)}{kinds}<details><summary>PromQL</summary>{queries}"
                   "</details></figcaption></figure>")
    out.append(f'<p class="meta">Generated by looptune report at {e(_stamp(report.generated))}.</p>')
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def _stamp(t: float) -> str:
    return datetime.fromtimestamp(t).astimezone().strftime("%Y-%m-%d %H:%M:%S")


def _slug(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")


def run(prometheus_url: str, run: str, since: str = "1h", out_dir: str | Path | None = None,
        now: float | None = None) -> Path:
    """Write the report of `run` over the last `since` into `out_dir`; returns index.html's path."""
    mpl = _require_matplotlib()
    seconds = parse_duration(since)
    prom = Prometheus(prometheus_url)
    report = collect(prom, run, seconds, now=now)
    out = Path(out_dir) if out_dir is not None else Path(f"looptune-report-{re.sub(r'[^A-Za-z0-9_.-]+', '_', run)}")
    out.mkdir(parents=True, exist_ok=True)
    for n, panel in enumerate(report.panels, start=1):
        if panel.series:
            panel.image = f"{n:02d}-{_slug(panel.spec.title)}.png"
            draw(panel, report, out / panel.image, mpl)
    index = out / "index.html"
    tmp = out / "index.html.tmp"
    tmp.write_text(render_html(report), encoding="utf-8")
    tmp.replace(index)
    return index


# ---------------------------------------------------------------------------------------------
# command line

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prometheus", required=True, metavar="URL",
                   help="Prometheus base URL, e.g. http://prometheus:9090 (user:password@ for basic auth)")
    p.add_argument("--run", required=True, help="the run label of the training run")
    p.add_argument("--since", default="1h", metavar="DURATION",
                   help="how far back to look, as a Prometheus duration: 30m, 1h, 2d (default 1h)")
    p.add_argument("--out", metavar="DIR", help="output directory (default ./looptune-report-RUN)")


def cli(args: argparse.Namespace) -> int:
    try:
        index = run(args.prometheus, args.run, args.since, args.out)
    except ReportError as exc:
        print(f"looptune report: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {index}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="looptune report", description=__doc__.splitlines()[0])
    add_arguments(p)
    return cli(p.parse_args(argv))


if __name__ == "__main__":
    os.environ.setdefault("MPLBACKEND", "Agg")
    sys.exit(main())
