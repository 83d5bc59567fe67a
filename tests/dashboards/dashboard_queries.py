"""What the dashboard tests share: every query of the dashboards and rules, Grafana's template
variables, the metric names the daemon exports, and a real Prometheus on loopback.

Imported by the test modules of this directory (pytest puts it on sys.path).
"""
from __future__ import annotations

import ast
import json
import math
import re
import signal
import subprocess
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import yaml

ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS = ROOT / "dashboards"
GRAFANA = DASHBOARDS / "grafana"
RULES = DASHBOARDS / "rules"
RULE_FILES = sorted(RULES.glob("looptune-*.yml"))
RULE_TESTS = sorted((RULES / "tests").glob("*.yml"))
UIDS = {"looptune-job", "looptune-node", "looptune-fleet"}
DS_REF = {"type": "prometheus", "uid": "${datasource}"}

# metrics the tuner engine will export (names guaranteed by the engine's author)
TUNER_METRICS = {"looptune_tuner_decisions_total", "looptune_job_bottleneck"}


# ---------------------------------------------------------------------------------------------
# dashboards

def load_dashboards() -> dict[str, dict[str, Any]]:
    """uid -> dashboard JSON, for every file in dashboards/grafana/."""
    out = {}
    for path in sorted(GRAFANA.glob("*.json")):
        d = json.loads(path.read_text(encoding="utf-8"))
        out[d["uid"]] = d
    return out


def all_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, the ones inside collapsed rows included."""
    for p in dashboard.get("panels", []):
        yield p
        yield from p.get("panels", [])


@dataclass(frozen=True)
class Query:
    dashboard: str          # uid
    panel: str              # panel title, or "annotation: NAME"
    ref: str                # refId ("Anno" for annotations)
    expr: str
    instant: bool           # Grafana runs it as an instant query (else a range query)

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.dashboard, self.panel, self.ref)


def dashboard_queries(dashboard: dict[str, Any]) -> list[Query]:
    uid = dashboard["uid"]
    out = []
    for p in all_panels(dashboard):
        for t in p.get("targets", []):
            out.append(Query(uid, p["title"], t["refId"], t["expr"], bool(t.get("instant")) and not t.get("range")))
    for a in dashboard.get("annotations", {}).get("list", []):
        if not a.get("builtIn"):
            out.append(Query(uid, f"annotation: {a['name']}", "Anno", a["expr"], False))
    return out


def variables(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return dashboard.get("templating", {}).get("list", [])


LABEL_VALUES = re.compile(r"^label_values\(\s*(?:(?P<match>.+?)\s*,\s*)?(?P<label>\w+)\s*\)$")


def variable_query(var: dict[str, Any]) -> str:
    q = var.get("query")
    return q["query"] if isinstance(q, dict) else str(q)


def substitute(expr: str, values: dict[str, str]) -> str:
    """Replace Grafana variables ($name and ${name}), the longest names first."""
    for name in sorted(values, key=len, reverse=True):
        expr = expr.replace("${" + name + "}", values[name])
        expr = re.sub(r"\$" + re.escape(name) + r"(?![A-Za-z0-9_])", lambda _m, v=values[name]: v, expr)
    return expr


# ---------------------------------------------------------------------------------------------
# rules

@dataclass(frozen=True)
class Rule:
    file: str
    group: str
    name: str               # the recorded metric, or the alert name
    kind: str               # record or alert
    expr: str
    spec: dict[str, Any] = field(hash=False, compare=False)


def load_rules() -> list[Rule]:
    out = []
    for path in RULE_FILES:
        for g in yaml.safe_load(path.read_text(encoding="utf-8"))["groups"]:
            for r in g["rules"]:
                kind = "record" if "record" in r else "alert"
                out.append(Rule(path.name, g["name"], r[kind], kind, r["expr"], r))
    return out


# ---------------------------------------------------------------------------------------------
# metric names

NAME = re.compile(r"\b((?:looptune_|run_rank:|run:)[A-Za-z0-9_:]*[A-Za-z0-9_])\b(?!\s*\()")


def metric_names(expr: str) -> set[str]:
    """The looptune metric and recording-rule names an expression reads."""
    names = set()
    for m in NAME.finditer(expr):
        before = expr[:m.start()]
        if before.count('"') % 2 == 1:      # inside a label value
            continue
        names.add(m.group(1))
    return names


def exported_names() -> set[str]:
    """Every sample name the daemon and the hook can export, read from the collectors' code:
    counters with _total, histograms with _bucket/_sum/_count, plus the daemon's process metrics."""
    kinds = {"CounterMetricFamily": ("_total",), "GaugeMetricFamily": ("",),
             "HistogramMetricFamily": ("_bucket", "_sum", "_count")}
    names: set[str] = set()
    for path in sorted((ROOT / "collectors").glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) in kinds and node.args:
                arg = node.args[0]
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    names.update(arg.value + s for s in kinds[node.func.id])
    from looptune import schema             # the hook's figures: declared once, exported by hookjobs
    names.update(f.metric + ("_total" if f.kind == schema.COUNTER else "") for f in schema.FIGURES if f.metric)
    from looptune.collectors import gpu
    for key, (kind, _) in gpu._VALUE_METRICS.items():
        names.add(f"looptune_gpu_{key}" + ("_total" if kind == "counter" else ""))
    from prometheus_client import ProcessCollector
    for fam in ProcessCollector(namespace="looptune_daemon", registry=None).collect():
        names.update(s.name for s in fam.samples)
    return names


# ---------------------------------------------------------------------------------------------
# a real Prometheus

@dataclass
class Result:
    series: list[dict[str, Any]]

    def finite(self) -> bool:
        """At least one series with at least one finite value (NaN and Inf are not data)."""
        for s in self.series:
            values = s.get("values") or ([s["value"]] if "value" in s else [])
            if any(math.isfinite(float(v)) for _, v in values):
                return True
        return False


class PromQLError(Exception):
    pass


class Prometheus:
    """`prometheus` on a loopback port with its own config and storage; close() stops it."""

    def __init__(self, binary: str, workdir: Path, config: dict[str, Any], port: int) -> None:
        from daemon_proc import http_get
        self._http_get = http_get
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.config_path = workdir / "prometheus.yml"
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        self.log_path = workdir / "prometheus.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [binary, f"--config.file={self.config_path}", f"--storage.tsdb.path={workdir / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                cwd=workdir, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)

    @property
    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def api(self, path: str, **params: Any) -> Any:
        url = f"{self.url}{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params, doseq=True)
        status, body = self._http_get(url, timeout=10)
        try:
            data = json.loads(body)
        except ValueError:
            raise PromQLError(f"HTTP {status}: {body[:300]}") from None
        if status != 200 or data.get("status") != "success":
            raise PromQLError(f"{data.get('errorType', status)}: {data.get('error', body[:300])}")
        return data["data"]

    def query(self, expr: str, at: float | None = None) -> Result:
        params = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        data = self.api("/api/v1/query", **params)
        if data["resultType"] == "scalar":
            return Result([{"value": data["result"]}])
        return Result(data["result"])

    def query_range(self, expr: str, start: float, end: float, step: float) -> Result:
        data = self.api("/api/v1/query_range", query=expr, start=f"{start:.3f}", end=f"{end:.3f}",
                        step=f"{step:g}")
        return Result(data["result"])

    def wait(self, check: Callable[[], Any], what: str, timeout: float, every: float = 0.25) -> Any:
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"prometheus exited ({self.proc.returncode}):\n{self.log}")
            try:
                last = check()
            except (OSError, PromQLError, AssertionError, ValueError) as exc:
                last = exc
            else:
                if last:
                    return last
            time.sleep(every)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}\n{self.log}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))
