"""Writes the Grafana dashboards in dashboards/grafana/ from the definitions below.

    python dashboards/build.py            # rewrite the JSON files
    python dashboards/build.py --check    # exit 1 if a JSON file differs from what this writes

The JSON files are what Grafana imports and provisions; this script is where they are edited
(tests/dashboards/test_dashboards_schema.py fails when the two drift apart). Standard library
only. Every query is PromQL against the looptune daemon's metrics and the recording rules in
dashboards/rules/looptune-recording.yml; rates use `$__rate_interval`, and no query assumes one
node: job series are told apart by `run` and `rank`, node series by `instance`. The queries
`looptune report` draws too come from looptune/promql.py, the verdicts' thresholds from
looptune/verdicts.py (both plain modules of this repository, imported without installing).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
OUT = HERE / "grafana"
if str(HERE.parent) not in sys.path:      # the repository, for looptune.promql and looptune.verdicts
    sys.path.insert(0, str(HERE.parent))

from looptune import promql as q  # noqa: E402
from looptune import verdicts  # noqa: E402

SCHEMA_VERSION = 39          # Grafana 10.4 and 11.x; later releases migrate it on load
DS = {"type": "prometheus", "uid": "${datasource}"}
RI = "$__rate_interval"
# grad_compression as a number: a vector of constants keyed by the knob's value label
COMPRESSION_CODES = " or ".join(f'label_replace(vector({i}), "value", "{v}", "", "")'
                                for i, v in enumerate(("none", "fp16", "bf16", "powersgd")))

# recording rules (dashboards/rules/looptune-recording.yml) the Fleet dashboard reads
R_SAMPLES = "run:looptune_job_samples:rate1m"
R_WAIT = "run:looptune_job_data_wait:ratio_rate1m"
R_STEP_P95 = "run_rank:looptune_job_step_seconds:p95_rate1m"
R_GPUS_WAITING = "run:looptune_job_gpus_waiting_on_input:rate1m"

SAMPLES_UNIT = "suffix: samples/s"


def decisions(sel: str, window: str) -> str:
    """Decisions within `window`: the increase of each decision counter, or its whole value
    where the series was born within the window (increase() misses a counter's first value,
    and a tuner's first decision of a kind creates its series at 1)."""
    x = f"looptune_tuner_decisions_total{{{sel}}}"
    return f"(increase({x}[{window}]) and {x} offset {window}) or ({x} unless {x} offset {window})"


# ---------------------------------------------------------------------------------------------
# panel builders

def target(expr: str, legend: str = "", *, table: bool = False, instant: bool = False) -> dict[str, Any]:
    t: dict[str, Any] = {"datasource": DS, "editorMode": "code", "expr": expr, "legendFormat": legend,
                         "range": not (table or instant), "instant": table or instant}
    if table:
        t["format"] = "table"
    return t


def _field_defaults(unit: str | None, lo: float | None, hi: float | None, decimals: int | None) -> dict[str, Any]:
    d: dict[str, Any] = {"unit": unit or "short"}
    if lo is not None:
        d["min"] = lo
    if hi is not None:
        d["max"] = hi
    if decimals is not None:
        d["decimals"] = decimals
    return d


def timeseries(title: str, desc: str, targets: list[dict[str, Any]], *, unit: str | None = None,
               lo: float | None = None, hi: float | None = None, stack: bool = False, steps: bool = False,
               bars: bool = False, w: int = 12, h: int = 8, decimals: int | None = None) -> dict[str, Any]:
    defaults = _field_defaults(unit, lo, hi, decimals)
    defaults["custom"] = {
        "drawStyle": "bars" if bars else "line",
        "lineInterpolation": "stepAfter" if steps else "linear",
        "lineWidth": 1, "fillOpacity": 25 if stack else 8, "showPoints": "never", "spanNulls": False,
        "stacking": {"mode": "normal" if stack else "none", "group": "A"},
        "axisSoftMin": 0 if lo is None else None,
    }
    if defaults["custom"]["axisSoftMin"] is None:
        del defaults["custom"]["axisSoftMin"]
    defaults["color"] = {"mode": "palette-classic"}
    return _panel("timeseries", title, desc, targets, w, h, {"defaults": defaults, "overrides": []}, {
        "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
        "tooltip": {"mode": "multi", "sort": "desc"},
    })


def stat(title: str, desc: str, targets: list[dict[str, Any]], *, unit: str | None = None, w: int = 4,
         h: int = 4, text: str = "auto", decimals: int | None = None,
         thresholds: list[tuple[float | None, str]] | None = None) -> dict[str, Any]:
    defaults = _field_defaults(unit, None, None, decimals)
    steps = thresholds or [(None, "green")]
    defaults["thresholds"] = {"mode": "absolute", "steps": [{"color": c, "value": v} for v, c in steps]}
    defaults["color"] = {"mode": "thresholds"}
    return _panel("stat", title, desc, targets, w, h, {"defaults": defaults, "overrides": []}, {
        "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
        "colorMode": "value", "graphMode": "none", "justifyMode": "auto", "orientation": "auto",
        "textMode": text, "wideLayout": True, "showPercentChange": False,
    })


def bargauge(title: str, desc: str, targets: list[dict[str, Any]], *, unit: str | None = None,
             lo: float | None = 0, hi: float | None = None, w: int = 12, h: int = 8,
             decimals: int | None = None) -> dict[str, Any]:
    defaults = _field_defaults(unit, lo, hi, decimals)
    defaults["color"] = {"mode": "continuous-GrYlRd"}
    return _panel("bargauge", title, desc, targets, w, h, {"defaults": defaults, "overrides": []}, {
        "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
        "orientation": "horizontal", "displayMode": "gradient", "showUnfilled": True,
        "valueMode": "color", "namePlacement": "auto", "sizing": "auto", "minVizHeight": 16,
        "minVizWidth": 8, "maxVizHeight": 300,
    })


def table(title: str, desc: str, targets: list[dict[str, Any]], *, w: int = 12, h: int = 8,
          hide: tuple[str, ...] = (), rename: dict[str, str] | None = None,
          merge: bool = False, unit: str | None = None) -> dict[str, Any]:
    exclude = {"Time": True, "__name__": True, "job": True, **{k: True for k in hide}}
    transformations: list[dict[str, Any]] = []
    if merge:
        transformations.append({"id": "merge", "options": {}})
    transformations.append({"id": "organize", "options": {"excludeByName": exclude, "indexByName": {},
                                                          "renameByName": rename or {}}})
    p = _panel("table", title, desc, targets, w, h,
               {"defaults": _field_defaults(unit, None, None, None), "overrides": []},
               {"showHeader": True, "cellHeight": "sm", "footer": {"show": False, "reducer": ["sum"],
                                                                   "fields": ""}})
    p["transformations"] = transformations
    return p


def state_timeline(title: str, desc: str, targets: list[dict[str, Any]], *,
                   mappings: list[dict[str, Any]], w: int = 24, h: int = 8) -> dict[str, Any]:
    defaults = _field_defaults(None, None, None, None)
    defaults["mappings"] = mappings
    defaults["color"] = {"mode": "thresholds"}
    defaults["thresholds"] = {"mode": "absolute", "steps": [{"color": "transparent", "value": None},
                                                           {"color": "orange", "value": 1}]}
    defaults["custom"] = {"fillOpacity": 80, "lineWidth": 0}
    return _panel("state-timeline", title, desc, targets, w, h, {"defaults": defaults, "overrides": []}, {
        "showValue": "never", "mergeValues": True, "rowHeight": 0.9, "alignValue": "left",
        "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
        "tooltip": {"mode": "single", "sort": "none"},
    })


def value_map(values: dict[str, tuple[str, str]]) -> list[dict[str, Any]]:
    """{"0": ("up", "green")} -> a Grafana value mapping."""
    return [{"type": "value", "options": {k: {"text": text, "color": color, "index": i}
                                          for i, (k, (text, color)) in enumerate(values.items())}}]


def row(title: str) -> dict[str, Any]:
    return {"type": "row", "title": title, "collapsed": False, "panels": [], "w": 24, "h": 1}


def _panel(kind: str, title: str, desc: str, targets: list[dict[str, Any]], w: int, h: int,
           field_config: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    for i, t in enumerate(targets):
        t["refId"] = chr(ord("A") + i)
    return {"type": kind, "title": title, "description": desc, "datasource": DS, "targets": targets,
            "fieldConfig": field_config, "options": options, "w": w, "h": h}


def lay_out(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Give each panel an id and a gridPos, filling rows of 24 columns left to right."""
    x = y = line_h = 0
    out = []
    for n, p in enumerate(panels, start=1):
        w, h = p.pop("w"), p.pop("h")
        if p["type"] == "row" or x + w > 24:
            x, y, line_h = 0, y + line_h, 0
        p = {"id": n, "gridPos": {"h": h, "w": w, "x": x, "y": y}, **p}
        out.append(p)
        x += w
        line_h = max(line_h, h)
        if p["type"] == "row":
            x, y, line_h = 0, y + h, 0
    return out


# ---------------------------------------------------------------------------------------------
# variables, annotations, dashboards

def datasource_var() -> dict[str, Any]:
    return {"type": "datasource", "name": "datasource", "label": "Data source", "query": "prometheus",
            "current": {}, "hide": 0, "includeAll": False, "multi": False, "options": [], "refresh": 1,
            "regex": "", "skipUrlSync": False}


def query_var(name: str, label: str, query: str, *, multi: bool = False, all_value: str = ".*",
              sort: int = 1) -> dict[str, Any]:
    v: dict[str, Any] = {
        "type": "query", "name": name, "label": label, "datasource": DS, "definition": query,
        "query": {"qryType": 1, "query": query, "refId": "PrometheusVariableQueryEditor-VariableQuery"},
        "current": {}, "hide": 0, "includeAll": multi, "multi": multi, "options": [], "refresh": 2,
        "regex": "", "skipUrlSync": False, "sort": sort,
    }
    if multi:
        v["allValue"] = all_value
    return v


BUILTIN_ANNOTATION = {
    "builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"}, "enable": True, "hide": True,
    "iconColor": "rgba(0, 211, 255, 1)", "name": "Annotations & Alerts", "type": "dashboard",
}


def annotation(name: str, expr: str, title: str, text: str, tags: str, color: str) -> dict[str, Any]:
    return {"name": name, "datasource": DS, "enable": True, "hide": False, "iconColor": color,
            "expr": expr, "step": "$__interval", "titleFormat": title, "textFormat": text, "tagKeys": tags,
            "useValueForTime": False}


def dashboard(uid: str, title: str, desc: str, panels: list[dict[str, Any]], variables: list[dict[str, Any]],
              annotations: list[dict[str, Any]] = (), time_from: str = "now-1h") -> dict[str, Any]:
    return {
        "id": None, "uid": uid, "title": title, "description": desc, "tags": ["looptune"],
        "timezone": "browser", "editable": True, "graphTooltip": 1, "fiscalYearStartMonth": 0,
        "liveNow": False, "weekStart": "", "refresh": "30s", "schemaVersion": SCHEMA_VERSION, "version": 1,
        "time": {"from": time_from, "to": "now"}, "timepicker": {},
        "templating": {"list": [datasource_var(), *variables]},
        "annotations": {"list": [BUILTIN_ANNOTATION, *annotations]},
        "links": [{"title": "looptune", "type": "dashboards", "tags": ["looptune"], "asDropdown": True,
                   "includeVars": False, "keepTime": True, "targetBlank": False, "icon": "external link",
                   "tooltip": "", "url": ""}],
        "panels": lay_out(panels),
    }


# ---------------------------------------------------------------------------------------------
# Training job

def job_dashboard() -> dict[str, Any]:
    run = 'run="$run"'
    sel = 'run="$run", rank=~"$rank"'
    panels = [
        row("Overview"),
        stat("Samples/s now", "Training samples per second, all ranks of the run together.",
             [target(q.samples_rate(run, by=None))], unit=SAMPLES_UNIT, decimals=1),
        stat("Data-wait share now", "Share of wall time the training loop waited for its next batch "
             f"(mean of the selected ranks). From {verdicts.INPUT_WAIT_SHARE:.0%} the tuner engine judges "
             f"the job input-bound (yellow); above {verdicts.ALERT_INPUT_WAIT_SHARE:.0%} for 15 minutes "
             "without a tuner decision it raises an alert (red).",
             [target(f"avg({q.data_wait_share(sel)})")], unit="percentunit",
             thresholds=[(None, "green"), (verdicts.INPUT_WAIT_SHARE, "yellow"),
                         (verdicts.ALERT_INPUT_WAIT_SHARE, "red")]),
        stat("Step time p95", "95th percentile of the time between optimizer steps, selected ranks.",
             [target(f"histogram_quantile(0.95, sum by (le) (rate(looptune_job_step_seconds_bucket{{{sel}}}[{RI}])))")],
             unit="s"),
        stat("Ranks / nodes", "Ranks of the run, and the nodes they run on.",
             [target(f"count(looptune_job_info{{{run}}})", "ranks"),
              target(f"count(count by (instance) (looptune_job_info{{{run}}}))", "nodes")],
             text="value_and_name"),
        stat("Bottleneck now", "The tuner engine's current verdict: how many selected ranks hold each one.",
             [target(f"{q.bottleneck_ranks(sel)} > 0", "{{kind}}")],
             text="value_and_name"),
        stat("Hooks", "Hooks connected to their daemon, and hooks that disabled themselves after "
             "repeated errors (training goes on unmeasured).",
             [target(f"sum(looptune_job_hook_connected{{{sel}}})", "connected"),
              target(f"sum(looptune_job_hook_disabled{{{sel}}})", "disabled")],
             text="value_and_name", thresholds=[(None, "green")]),

        row("Throughput and step time"),
        timeseries("Samples/s", "Training samples per second, per rank and for the whole run.",
                   [target(q.samples_rate(sel), "rank {{rank}}"),
                    target(q.samples_rate(run, by=None), "whole run")],
                   unit=SAMPLES_UNIT),
        timeseries("Data-wait share", "Share of wall time each rank's loop waited for the next batch "
                   "from its DataLoader. High: the job is input-bound; more DataLoader workers, a "
                   "larger prefetch or faster storage help.",
                   [target(q.data_wait_share(sel), "rank {{rank}}")],
                   unit="percentunit", lo=0, hi=1),
        timeseries("Step time", "Time between optimizer steps (data wait included): p50 and p95 from "
                   "the step-time histogram, per rank.",
                   [target(q.step_seconds_quantile(0.5, sel), "p50 rank {{rank}}"),
                    target(q.step_seconds_quantile(0.95, sel), "p95 rank {{rank}}")],
                   unit="s"),
        timeseries("Optimizer steps/s", "hook.step() calls per second, per rank.",
                   [target(f"sum by (instance, rank) (rate(looptune_job_optimizer_steps_total{{{sel}}}[{RI}]))",
                           "rank {{rank}}")], unit="suffix: steps/s"),

        row("GPU"),
        timeseries("GPU utilization per rank", "SM utilization NVML attributes to the rank's processes, "
                   "and the whole device's utilization of each GPU the rank holds.",
                   [target(q.job_gpu_utilization(sel), "rank {{rank}} gpu {{gpu}} (own)"),
                    target(q.device_gpu_utilization_held(sel), "rank {{rank}} gpu {{gpu}} (device)")],
                   unit="percentunit", lo=0, hi=1),
        timeseries("GPU memory per rank", "GPU memory the rank's processes hold (NVML), and the peaks "
                   "torch.cuda reports from inside the job (allocated by tensors, reserved by the "
                   "caching allocator).",
                   [target(q.job_gpu_memory(sel), "rank {{rank}} gpu {{gpu}}"),
                    target(q.peak_memory(sel, 'kind=~"cuda_.*"'), "rank {{rank}} peak {{kind}}")],
                   unit="bytes"),

        row("Gradient communication (DDP)"),
        timeseries("Communication share", "Share of step time each rank waited on gradient all-reduce after "
                   "backward (communication not hidden behind compute), and its wire part: the wait every "
                   "rank shared (the rest waited on a slower rank). From "
                   f"{verdicts.COMM_SHARE:.0%} wire share the engine judges the job communication-bound and "
                   "the compression tuner may try a setting.",
                   [target(q.comm_share(sel), "rank {{rank}}"), target(q.comm_wire_share(sel), "rank {{rank}} wire")],
                   unit="percentunit", lo=0, hi=1, w=8),
        timeseries("Gradient bytes per step", "Bytes each rank put on the wire for gradient all-reduce per "
                   "optimizer step, under the current grad_compression setting.",
                   [target(q.comm_bytes_per_step(sel), "rank {{rank}}")], unit="bytes", w=8),
        timeseries("grad_compression", "The gradient compression setting each rank runs (0 none, 1 fp16, "
                   "2 bf16, 3 powersgd); every rank switches at the same step.",
                   [target(f'sum by (instance, rank) (looptune_job_knob_info{{{sel}, knob="grad_compression"}} '
                           f'* on (value) group_left() ({COMPRESSION_CODES}))', "rank {{rank}}")],
                   steps=True, decimals=0, w=8),

        row("Batch size (hook.accumulate)"),
        timeseries("Micro-batch size", "Rows per micro-batch hook.accumulate splits each batch into: the "
                   "largest that fits the device (the batch per optimizer step stays the loader's).",
                   [target(f'looptune_job_knob{{{sel}, knob="micro_batch_size"}}', "rank {{rank}}")],
                   steps=True, decimals=0, w=6),
        timeseries("Device memory peak per step", "Peak device memory allocated during the latest "
                   "accumulate step, per rank.",
                   [target(f"looptune_job_device_memory_peak_bytes{{{sel}}}", "rank {{rank}}")], unit="bytes", w=6),
        timeseries("Out-of-memory errors recovered", "Out-of-memory errors hook.accumulate recovered from in "
                   "the step (the batch done again in smaller micro-batches), per rank, over each interval.",
                   [target(f"sum by (instance, rank) (increase(looptune_job_oom_recoveries_total{{{sel}}}[{RI}]))",
                           "rank {{rank}}")], decimals=0, w=6),
        timeseries("Gradient noise scale", "B_simple (McCandlish et al. 2018): the global batch up to which "
                   "a larger batch still trains about proportionally faster; far above the global batch "
                   "used, a larger one (with its learning rate) would pay.",
                   [target(f"looptune_job_gradient_noise_scale{{{sel}}}", "rank {{rank}}")], unit="none", w=6),

        row("CPU, memory and I/O (DataLoader workers included)"),
        timeseries("Job CPU", "CPU cores used by each rank's process tree, DataLoader workers included.",
                   [target(q.job_cpu_cores(sel), "rank {{rank}} {{mode}}")], unit="suffix: cores", stack=True),
        timeseries("Processes", "Processes in each rank's tree: the rank itself plus its DataLoader "
                   "workers and other children.",
                   [target(q.job_processes(sel), "rank {{rank}}")], steps=True, decimals=0),
        timeseries("Job memory", "Memory of each rank's process tree: rss counts shared pages once per "
                   "process, pss splits them, uss is private; max_rss is the peak the hook saw.",
                   [target(q.job_memory(sel), "rank {{rank}} {{kind}}"),
                    target(q.peak_memory(sel, 'kind="max_rss"'), "rank {{rank}} peak rss")],
                   unit="bytes"),
        timeseries("Job storage I/O", "Bytes per second the rank's process tree reads and writes.",
                   [target(f"sum by (instance, rank, direction) (rate(looptune_job_io_bytes_total{{{sel}}}[{RI}]))",
                           "rank {{rank}} {{direction}}")], unit="Bps"),

        row("Tuning"),
        state_timeline("Bottleneck verdict", "What holds the job back, per the tuner engine: how many "
                       "of the selected ranks hold each verdict over time.",
                       [target(q.bottleneck_ranks(sel), "{{kind}}")],
                       mappings=value_map({"0": ("", "transparent")}), w=24, h=7),
        timeseries("Knob values", "Current value of each numeric knob, per rank (workers, prefetch, "
                   "batch size...). The annotations mark the tuners' decisions and knob changes.",
                   [target(q.knob(sel), "{{knob}} rank {{rank}}")], steps=True, w=12),
        table("Textual knobs", "Knobs whose value is a word (gradient compression: none, fp16, bf16, "
              "powersgd), per rank.",
              [target(f"looptune_job_knob_info{{{sel}}}", table=True)], w=6, hide=("Value", "instance")),
        table("Tuner decisions", "Decisions the tuners made for this run over the dashboard's time "
              "range, by outcome: kept, rolled_back or failed.",
              [target(f"sum by (tuner, knob, outcome) ({decisions(run, '$__range')})", table=True)],
              w=6, rename={"Value": "decisions"}, unit="none"),
    ]
    variables = [
        query_var("run", "Run", "label_values(looptune_job_info, run)"),
        query_var("rank", "Rank", 'label_values(looptune_job_info{run="$run"}, rank)', multi=True, sort=3),
    ]
    annotations = [
        annotation("Tuner decisions",
                   # a decision counter that appears within the step counts as well as one that grows
                   f"sum by (tuner, knob, outcome) ("
                   f"(looptune_tuner_decisions_total{{{run}}} unless looptune_tuner_decisions_total{{{run}}} "
                   f"offset $__interval) or changes(looptune_tuner_decisions_total{{{run}}}[$__interval])) > 0",
                   "{{tuner}}: {{knob}} {{outcome}}", "decision by tuner {{tuner}} on {{knob}}: {{outcome}}",
                   "tuner,knob,outcome", "#B877D9"),
        annotation("Knob changes",
                   f"sum by (instance, rank, knob) (changes(looptune_job_knob{{{run}}}[$__interval])) > 0",
                   "{{knob}} changed", "knob {{knob}} changed on rank {{rank}} ({{instance}})", "knob,rank",
                   "#FF9830"),
    ]
    return dashboard("looptune-job", "looptune / Training job",
                     "One training run: throughput, where its time goes, the resources of every rank, and "
                     "what the tuners changed.", panels, variables, annotations)


# ---------------------------------------------------------------------------------------------
# Node

def node_dashboard() -> dict[str, Any]:
    i = 'instance=~"$instance"'
    g = 'instance=~"$instance", gpu=~"$gpu"'
    panels = [
        row("Overview"),
        stat("GPUs", "GPUs NVML sees on the selected nodes.", [target(f"sum(looptune_gpus{{{i}}})")], decimals=0),
        stat("CPUs", "Logical CPUs of the selected nodes.", [target(f"sum(looptune_host_cpus{{{i}}})")], decimals=0),
        stat("Memory", "Physical memory of the selected nodes.",
             [target(f"sum(looptune_host_memory_total_bytes{{{i}}})")], unit="bytes"),
        stat("Training jobs", "Ranks of training jobs running on the selected nodes.",
             [target(f"count(looptune_job_info{{{i}}}) or vector(0)")], decimals=0),
        stat("Collectors down", "Collectors whose last sample failed or hung (the GPU collector is "
             "down on a node without an NVIDIA driver).",
             [target(f"count(looptune_collector_up{{{i}}} == 0) or vector(0)")], decimals=0,
             thresholds=[(None, "green"), (1, "red")]),
        stat("looptune version", "Version of the daemon on the selected nodes, and how many run it.",
             [target(f"count by (version) (looptune_build_info{{{i}}})", "{{version}}")], text="name"),

        row("GPUs"),
        timeseries("GPU utilization", "Share of time a kernel ran on each GPU.",
                   [target(f"looptune_gpu_utilization_ratio{{{g}}}", "{{instance}} gpu {{gpu}}")],
                   unit="percentunit", lo=0, hi=1, w=8),
        timeseries("GPU memory-bandwidth utilization", "Share of time device memory was read or written.",
                   [target(f"looptune_gpu_memory_utilization_ratio{{{g}}}", "{{instance}} gpu {{gpu}}")],
                   unit="percentunit", lo=0, hi=1, w=8),
        timeseries("GPU memory", "Device memory in use, and each GPU's total.",
                   [target(f"looptune_gpu_memory_used_bytes{{{g}}}", "{{instance}} gpu {{gpu}} used"),
                    target(f"looptune_gpu_memory_total_bytes{{{g}}}", "{{instance}} gpu {{gpu}} total")],
                   unit="bytes", w=8),
        timeseries("GPU power", "Power draw and the enforced power limit.",
                   [target(f"looptune_gpu_power_watts{{{g}}}", "{{instance}} gpu {{gpu}}"),
                    target(f"looptune_gpu_power_limit_watts{{{g}}}", "{{instance}} gpu {{gpu}} limit")],
                   unit="watt", w=8),
        bargauge("GPU energy over the time range", "Energy each GPU used over the dashboard's time range.",
                 [target(f"increase(looptune_gpu_energy_joules_total{{{g}}}[$__range]) / 3.6e6",
                         "{{instance}} gpu {{gpu}}", instant=True)], unit="kwatth", w=8),
        timeseries("GPU temperature", "Core temperature of each GPU.",
                   [target(f"looptune_gpu_temperature_celsius{{{g}}}", "{{instance}} gpu {{gpu}}")],
                   unit="celsius", w=8),
        timeseries("GPU clocks", "Current SM and memory clocks.",
                   [target(f"looptune_gpu_clock_hertz{{{g}}}", "{{instance}} gpu {{gpu}} {{clock}}")],
                   unit="hertz", w=8),
        timeseries("Throttle reasons", "How many of the selected GPUs each clock-event reason holds "
                   "down (thermal and power slowdowns cost throughput; gpu_idle is harmless).",
                   [target(f"sum by (reason) (looptune_gpu_clock_event_active{{{g}}})", "{{reason}}")],
                   steps=True, decimals=0, w=8),
        timeseries("PCIe throughput", "PCIe bytes per second from each GPU's view (tx: GPU to host); from "
                   "the byte counters where the driver has them, else NVML's sampled rate.",
                   [target(f"sum by (instance, gpu, direction) (rate(looptune_gpu_pcie_bytes_total{{{g}}}[{RI}])) "
                           f"or sum by (instance, gpu, direction) "
                           f"(looptune_gpu_pcie_throughput_bytes_per_second{{{g}}})",
                           "{{instance}} gpu {{gpu}} {{direction}}")], unit="Bps", w=8),
        table("ECC errors", "Volatile ECC memory errors since the driver loaded.",
              [target(f"looptune_gpu_ecc_errors_total{{{g}}}", table=True)], w=8,
              hide=("uuid",), rename={"Value": "errors"}, unit="none"),
        table("XID errors", "XID critical errors the daemon saw since it started, by XID code.",
              [target(f"looptune_gpu_xid_errors_total{{{g}}}", table=True)], w=8,
              hide=("uuid",), rename={"Value": "errors"}, unit="none"),
        table("GPU inventory", "Static facts of each GPU.",
              [target(f"looptune_gpu_info{{{g}}}", table=True)], w=8, hide=("Value",)),

        row("Host"),
        timeseries("Host CPU", "CPU cores busy, by mode, and the node's CPU count.",
                   [target(f"sum by (instance, mode) "
                           f'(rate(looptune_host_cpu_seconds_total{{{i}, mode!="idle"}}[{RI}]))',
                           "{{instance}} {{mode}}"),
                    target(f"looptune_host_cpus{{{i}}}", "{{instance}} CPUs")],
                   unit="suffix: cores"),
        timeseries("Host memory", "Memory in use (total minus available), available memory and swap used.",
                   [target(f"looptune_host_memory_total_bytes{{{i}}} - looptune_host_memory_available_bytes{{{i}}}",
                           "{{instance}} used"),
                    target(f"looptune_host_memory_available_bytes{{{i}}}", "{{instance}} available"),
                    target(f"looptune_host_swap_used_bytes{{{i}}}", "{{instance}} swap used")],
                   unit="bytes"),

        row("Training jobs on the node"),
        table("Jobs", "Training jobs (one row per rank) on the selected nodes.",
              [target(f"looptune_job_info{{{i}}}", table=True)], w=24, h=6, hide=("Value",)),
        timeseries("Samples/s by job", "Training samples per second of each rank on the node.",
                   [target(q.samples_rate(i, by="instance, run, rank"), "{{run}} rank {{rank}}")],
                   unit=SAMPLES_UNIT, w=8),
        timeseries("Data-wait share by job", "Share of wall time each rank waited for data.",
                   [target(q.data_wait_share(i), "{{run}} rank {{rank}}")],
                   unit="percentunit", lo=0, hi=1, w=8),
        timeseries("CPU by job", "CPU cores used by each rank's process tree (DataLoader workers included).",
                   [target(q.job_cpu_cores(i, by="instance, run, rank"), "{{run}} rank {{rank}}")],
                   unit="suffix: cores", w=8),
        timeseries("Memory by job", "Resident memory of each rank's process tree.",
                   [target(f'looptune_job_memory_bytes{{{i}, kind="rss"}}', "{{run}} rank {{rank}}")],
                   unit="bytes", w=12),
        timeseries("GPU memory by job", "GPU memory each rank's processes hold, per GPU.",
                   [target(q.job_gpu_memory(i), "{{run}} rank {{rank}} gpu {{gpu}}")],
                   unit="bytes", w=12),

        row("looptune daemon"),
        state_timeline("Collectors", "Whether each collector's last sample succeeded.",
                       [target(f"looptune_collector_up{{{i}}}", "{{instance}} {{collector}}")],
                       mappings=value_map({"0": ("down", "red"), "1": ("up", "green")}), w=12),
        timeseries("Collector errors", "Failed or hung samples per second, per collector.",
                   [target(f"sum by (instance, collector) (rate(looptune_collector_errors_total{{{i}}}[{RI}]))",
                           "{{instance}} {{collector}}")], unit="suffix: /s", w=12),
        timeseries("Collector sample time", "Wall time of each collector's last sample.",
                   [target(f"looptune_collector_duration_seconds{{{i}}}", "{{instance}} {{collector}}")],
                   unit="s", w=8),
        timeseries("Collector sample age", "Age of each collector's last good sample when Prometheus "
                   "scraped it: grows while a collector fails or hangs.",
                   [target(f"timestamp(looptune_collector_last_success_timestamp_seconds{{{i}}}) "
                           f"- looptune_collector_last_success_timestamp_seconds{{{i}}}",
                           "{{instance}} {{collector}}")], unit="s", w=8),
        timeseries("Rejected hook messages", "Socket messages the daemon rejected per second, by reason "
                   "(each closes its connection).",
                   [target(f"sum by (instance, reason) (rate(looptune_messages_rejected_total{{{i}}}[{RI}]))",
                           "{{instance}} {{reason}}")], unit="suffix: /s", w=8),
        timeseries("Hook connections", "Open connections on the hook socket.",
                   [target(f"looptune_hook_connections{{{i}}}", "{{instance}}")], decimals=0, w=8),
        stat("Config reloads", "Whether the last config load or reload succeeded (1), and reloads "
             "attempted and rejected over the time range.",
             [target(f"min(looptune_config_last_reload_successful{{{i}}})", "last ok"),
              target(f"sum(increase(looptune_config_reloads_total{{{i}}}[$__range]))", "reloads"),
              target(f"sum(increase(looptune_config_reload_failures_total{{{i}}}[$__range]))", "failed")],
             text="value_and_name", w=8, h=8),
        timeseries("Daemon CPU and memory", "The daemon's own CPU (cores) and resident memory.",
                   [target(f"rate(looptune_daemon_process_cpu_seconds_total{{{i}}}[{RI}])", "{{instance}} CPU"),
                    target(f"looptune_daemon_process_resident_memory_bytes{{{i}}}", "{{instance}} memory")],
                   w=8),
    ]
    # the second target of the last panel is in bytes: put it on its own axis
    panels[-1]["fieldConfig"]["overrides"] = [{
        "matcher": {"id": "byFrameRefID", "options": "B"},
        "properties": [{"id": "unit", "value": "bytes"}, {"id": "custom.axisPlacement", "value": "right"}],
    }]
    panels[-1]["fieldConfig"]["defaults"]["unit"] = "suffix: cores"
    variables = [
        query_var("instance", "Node", "label_values(looptune_build_info, instance)", multi=True, all_value=".+"),
        query_var("gpu", "GPU", 'label_values(looptune_gpu_info{instance=~"$instance"}, gpu)', multi=True,
                  sort=3),
    ]
    return dashboard("looptune-node", "looptune / Node",
                     "One or more nodes: every GPU, the host's CPU and memory, the training jobs on it "
                     "and the looptune daemon's own health.", panels, variables)


# ---------------------------------------------------------------------------------------------
# Fleet

def fleet_dashboard() -> dict[str, Any]:
    r = 'run=~"$run"'
    gpus = f"count by (job, instance, run, rank) (looptune_job_gpu_memory_bytes{{{r}}})"
    panels = [
        row("Overview"),
        stat("Runs now", "Training runs reporting now.", [target(f"count(count by (run) (looptune_job_info{{{r}}}))")],
             decimals=0),
        stat("Ranks", "Ranks of those runs.", [target(f"count(looptune_job_info{{{r}}})")], decimals=0),
        stat("Nodes", "looptune daemons reporting.", [target("count(looptune_build_info)")], decimals=0),
        stat("GPUs held by jobs", "GPUs on which a training job holds memory.",
             [target(f"count(count by (instance, gpu) (looptune_job_gpu_memory_bytes{{{r}}}))")], decimals=0),
        stat("Samples/s", "Training samples per second, all selected runs.",
             [target(f"sum({R_SAMPLES}{{{r}}})")], unit=SAMPLES_UNIT, decimals=0),
        stat("Tuner decisions", "Decisions over the time range: kept, rolled back, failed.",
             [target(f"sum by (outcome) ({decisions(r, '$__range')})", "{{outcome}}")],
             text="value_and_name", decimals=0),

        row("Throughput and where time goes"),
        timeseries("Samples/s by run", "Training samples per second of each run, all its ranks and "
                   "nodes together.", [target(f"{R_SAMPLES}{{{r}}}", "{{run}}")], unit=SAMPLES_UNIT),
        timeseries("Input share by run", "Share of wall time the run's ranks wait for data (mean over "
                   "ranks). The rest is compute and communication.",
                   [target(f"{R_WAIT}{{{r}}}", "{{run}}")], unit="percentunit", lo=0, hi=1),
        bargauge("Where time goes now", "Per run: the share of wall time spent waiting on input, and "
                 "the rest (compute and communication).",
                 [target(f"{R_WAIT}{{{r}}}", "{{run}} input", instant=True),
                  target(f"1 - {R_WAIT}{{{r}}}", "{{run}} compute + communication", instant=True)],
                 unit="percentunit", hi=1),
        bargauge("Bottleneck verdicts over the time range", "Per run and verdict: the share of rank-time "
                 "the tuner engine judged the run input-, CPU-, GPU-, memory- or communication-bound.",
                 [target(f"avg by (run, kind) (avg_over_time(looptune_job_bottleneck{{{r}}}[$__range])) > 0",
                         "{{run}} {{kind}}", instant=True)], unit="percentunit", hi=1),
        timeseries("Slowest rank step time p95", "Per run: the 95th percentile step time of its slowest "
                   "rank (stragglers hold every rank back at the next collective).",
                   [target(f"max by (run) ({R_STEP_P95}{{{r}}})", "{{run}}")], unit="s"),
        timeseries("GPU utilization by run", "Mean SM utilization of the GPUs each run holds.",
                   [target(f"avg by (run) (looptune_job_gpu_utilization_ratio{{{r}}})", "{{run}}")],
                   unit="percentunit", lo=0, hi=1),

        row("Waste and tuning"),
        bargauge("Wasted GPU-hours over the time range", "Per run: GPU-hours during which the GPUs it "
                 "holds sat waiting for input (data-wait seconds times GPUs held, per rank).",
                 [target(f"sum by (run) (increase(looptune_job_data_wait_seconds_total{{{r}}}[$__range]) "
                         f"* on (job, instance, run, rank) group_left () {gpus}) / 3600", "{{run}}",
                         instant=True)], unit="h", decimals=2),
        timeseries("GPUs waiting on input", "Per run: GPUs held while the job waits for data, in GPU "
                   "equivalents (a rank with 2 GPUs waiting half the time counts 1).",
                   [target(f"{R_GPUS_WAITING}{{{r}}}", "{{run}}")], decimals=2),
        bargauge("Decisions kept vs rolled back, by tuner", "Tuner decisions over the time range, by tuner "
                 "and outcome.",
                 [target(f"sum by (tuner, outcome) ({decisions(r, '$__range')})", "{{tuner}} {{outcome}}",
                         instant=True)], decimals=0),
        timeseries("Decisions so far", "Tuner decisions by outcome, counted since each daemon started.",
                   [target(f"sum by (outcome) (looptune_tuner_decisions_total{{{r}}})", "{{outcome}}")],
                   steps=True, decimals=0),
        table("Runs", "Every selected run: ranks, nodes, samples/s and input share now.",
              [target(f"count by (run) (looptune_job_info{{{r}}})", table=True),
               target(f"count by (run) (count by (run, instance) (looptune_job_info{{{r}}}))", table=True),
               target(f"{R_SAMPLES}{{{r}}}", table=True),
               target(f"{R_WAIT}{{{r}}}", table=True)],
              w=24, h=8, merge=True,
              rename={"Value #A": "ranks", "Value #B": "nodes", "Value #C": "samples/s", "Value #D": "input share"}),
    ]
    variables = [query_var("run", "Run", "label_values(looptune_job_info, run)", multi=True)]
    return dashboard("looptune-fleet", "looptune / Fleet",
                     "Every training run across all nodes: throughput, where the time goes, GPU time lost "
                     "to input waits, and what the tuners kept or rolled back. Reads the recording rules "
                     "in dashboards/rules/looptune-recording.yml.", panels, variables, time_from="now-6h")


DASHBOARDS = {"looptune-job.json": job_dashboard, "looptune-node.json": node_dashboard,
              "looptune-fleet.json": fleet_dashboard}


def render(build: Any) -> str:
    return json.dumps(build(), indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only compare; exit 1 if a file is out of date")
    args = ap.parse_args(argv)
    stale = []
    for name, build in DASHBOARDS.items():
        path, text = OUT / name, render(build)
        if path.exists() and path.read_text(encoding="utf-8") == text:
            continue
        stale.append(name)
        if not args.check:
            OUT.mkdir(exist_ok=True)
            tmp = path.with_suffix(".json.tmp")
            tmp.write_text(text, encoding="utf-8")
            tmp.replace(path)
    if args.check and stale:
        print("out of date (run python dashboards/build.py): " + ", ".join(stale), file=sys.stderr)
        return 1
    for name in stale:
        print(f"wrote {OUT / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
