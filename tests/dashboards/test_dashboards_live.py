"""Every dashboard query and rule expression against live data: a real daemon, a real training
loop with the hook, a real Prometheus scraping the daemon with the shipped rules loaded.

The daemon runs on the fake NVML of tests/fakes replaying a hand-written two-H200 trace, so the
GPU panels have data on a machine without a GPU; the training job holds GPU 0. The job is
input-bound (4 ms per sample, no DataLoader workers at first), so the daemon's `workers`
tuner raises num_workers in trials; the checks start after DECISIONS trials, so the knob
panels, the decision panels and annotations and the report's summary all see changes.

Each panel target is run the way Grafana runs it (range or instant query) with the template
variables substituted. A target fails on a PromQL error, and on an empty result unless it
is listed below: NEEDS_CUDA where the training process has no CUDA, and PENDING_TUNER for
metrics a future tuner will export (empty now; an entry that returns data fails the test, so
the list stays current).
"""
from __future__ import annotations

import json
import math
import os
import queue
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from conftest import ROOT, free_port, require_binary
from daemon_proc import DaemonProc, write_config
from dashboard_queries import (DASHBOARDS, LABEL_VALUES, RULE_FILES, TUNER_METRICS, Prometheus, PromQLError,
                               Query, dashboard_queries, load_dashboards, load_rules, metric_names,
                               substitute, variable_query, variables)

pytestmark = pytest.mark.e2e

HERE = Path(__file__).resolve().parent
RUN = "live-e2e"
DECISIONS = 3              # finished tuner trials (one of them kept) before the checks
TUNE_TIMEOUT = 90.0
AFTER_SWITCH = 6.0         # seconds of data after them
SCRAPE = 1                 # seconds; Grafana's $__rate_interval would be 4 scrapes
RATE_INTERVAL = "5s"

# panel targets waiting for the tuner engine's metrics (looptune_tuner_decisions_total,
# looptune_job_bottleneck): they must parse and may return nothing. The engine has landed and
# every one of them returns data now, so the list is empty; an entry that returns data fails
# the test, so that the list stays current.
PENDING_TUNER: dict[tuple[str, str, str], str] = {}
# targets that need torch.cuda inside the training process (the hook's CUDA memory peaks);
# NVML panels have data here through the fake NVML
NEEDS_CUDA: dict[tuple[str, str, str], str] = {
    ("looptune-job", "GPU memory per rank", "B"): "looptune_job_peak_memory_bytes{kind=~\"cuda_.*\"}",
}
# targets that need two or more ranks whose hook tunes (the ranks agree on the wire's part of
# the communication wait at their syncs); the live job is one rank
NEEDS_RANKS: dict[tuple[str, str, str], str] = {
    ("looptune-job", "Communication share", "B"): "looptune_job_comm_wire_seconds_total",
}
# metrics the queries read that this scenario cannot produce, and why
ABSENT_HERE = {
    "looptune_job_comm_wire_seconds_total": "agreed between ranks at their syncs: the live job is one rank "
                                            "(tests/tuners/test_comm_ddp.py measures it with two)",
    "looptune_gpu_pcie_throughput_bytes_per_second": "NVML's sampled PCIe rate, exported only by drivers "
                                                       "without PCIe byte counters (the H200 trace has them)",
}
# the alert this scenario must raise (pending: its for: is longer than the test): GPU 1 of the
# trace is held down by heat. LooptuneJobInputBound may be pending in the seconds before the
# tuner's first decision, never after it; no other alert may be active.
THROTTLED = {"alertname": "LooptuneGPUThrottled", "gpu": "1", "reason": "hw_thermal_slowdown"}


@dataclass
class Live:
    prom: Prometheus
    instance: str
    start: float            # when the training job took its first step
    switched: float         # when DECISIONS trials had finished
    workdir: Path
    cuda: bool

    def values(self) -> dict[str, str]:
        span = int(math.ceil(time.time() - self.start)) + 5
        return {"datasource": "", "run": RUN, "rank": ".*", "instance": self.instance, "gpu": ".*",
                "__rate_interval": RATE_INTERVAL, "__interval": "2s", "__range_s": str(span),
                "__range": f"{span}s"}


class Trainer:
    """tests/dashboards/live_train.py as a subprocess, its stdout read line by line."""

    def __init__(self, socket_path: Path, pidfile: Path, log: Path) -> None:
        self.log_path = log
        self._log = open(log, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "live_train.py"), "--socket", str(socket_path), "--run", RUN,
             "--pidfile", str(pidfile)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True, cwd=ROOT,
            start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.strip())

    def expect(self, word: str, timeout: float) -> list[str]:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"training job: no {word!r} within {timeout}s; stderr:\n{self.stderr}")
            try:
                line = self.lines.get(timeout=min(left, 0.5))
            except queue.Empty:
                if self.proc.poll() is not None:
                    raise AssertionError(f"training job exited {self.proc.returncode}:\n{self.stderr}") from None
                continue
            if line.split()[:1] == [word]:
                return line.split()

    @property
    def stderr(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def close(self) -> None:
        if self.proc.poll() is None and self.proc.stdin is not None:
            try:
                self.proc.stdin.close()         # the job's signal to finish
                self.proc.wait(15)
            except (subprocess.TimeoutExpired, OSError):
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()


class FakeGpuDaemon(DaemonProc):
    """The real daemon CLI, started through fake_gpu_daemon.py so that it sees two fake GPUs."""

    def __init__(self, workdir: Path, config: Path, trace: Path, pidfile: Path) -> None:
        super().__init__(workdir, config)
        self.trace, self.pidfile = trace, pidfile

    def command(self) -> list[str]:
        cmd = super().command()
        assert cmd[1:3] == ["-m", "looptune"], cmd
        return [sys.executable, str(HERE / "fake_gpu_daemon.py"), str(self.trace), str(self.pidfile), *cmd[3:]]


def write_trace(path: Path) -> Path:
    import pynvml

    from tests.fakes.fake_pynvml import TRACE_DIR
    trace = json.loads((TRACE_DIR / "h200_x2.json").read_text())
    # GPU 1 held down by heat (and at its power cap, which alone would be normal)
    trace["devices"][1]["clocks_event_reasons"] = (pynvml.nvmlClocksEventReasonHwThermalSlowdown |
                                                   pynvml.nvmlClocksEventReasonSwPowerCap)
    path.write_text(json.dumps(trace))
    return path


def prometheus_config(daemon_port: int) -> dict[str, Any]:
    """dashboards/prometheus.yml with its static job pointed at the daemon, 1 s scrapes and
    evaluations, and the rules loaded from the repository."""
    config = yaml.safe_load((DASHBOARDS / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    job = jobs["looptune"]
    job["static_configs"] = [{"targets": [f"127.0.0.1:{daemon_port}"]}]
    job["scrape_interval"] = job["scrape_timeout"] = f"{SCRAPE}s"
    config["scrape_configs"] = [job]
    config["global"]["scrape_interval"] = config["global"]["evaluation_interval"] = f"{SCRAPE}s"
    config["rule_files"] = [str(DASHBOARDS / p) for p in config["rule_files"]]
    return config


@pytest.fixture(scope="module")
def live() -> Iterator[Live]:
    binary = require_binary("prometheus")
    pytest.importorskip("torch")
    workdir = Path(tempfile.mkdtemp(prefix="lt-dash-", dir="/tmp"))
    trainer = daemon = prom = None
    try:
        pidfile = workdir / "train.pid"
        config = write_config(workdir / "looptune.yaml", {
            "collectors": {"interval_seconds": 0.5},
            # a best setting remembered from an earlier run would start the job there, untuned
            "tuners": {"state_file": str(workdir / "best.json")}})
        daemon = FakeGpuDaemon(workdir, config, write_trace(workdir / "trace.json"), pidfile)
        daemon.start().wait_ready(30)
        prom = Prometheus(binary, workdir, prometheus_config(daemon.port), free_port())
        prom.wait(lambda: prom.api("/api/v1/status/buildinfo"), "prometheus to answer", 30)
        trainer = Trainer(daemon.socket_path, pidfile, workdir / "train.log")
        trainer.expect("ready", 90)
        start = time.time()
        instance = f"127.0.0.1:{daemon.port}"
        # the workers tuner climbs 0 -> 1 -> 2 ...: wait for DECISIONS trials, one of them kept
        tuned = (f'sum(looptune_tuner_decisions_total{{run="{RUN}"}}) >= {DECISIONS} and '
                 f'sum(looptune_tuner_decisions_total{{run="{RUN}", outcome="kept"}}) >= 1')
        prom.wait(lambda: prom.query(tuned).finite(), f"{DECISIONS} tuner decisions", TUNE_TIMEOUT)
        switched = time.time()

        def settled() -> bool:
            if time.time() - switched < AFTER_SWITCH:
                return False
            for expr in (f'run:looptune_job_samples:rate1m{{run="{RUN}"}}',
                         f'looptune_job_gpu_memory_bytes{{run="{RUN}"}}',
                         f'looptune_job_knob_info{{run="{RUN}"}}',
                         "looptune_gpu_xid_errors_total",
                         f'looptune_job_processes{{run="{RUN}"}} > 1'):
                if not prom.query(expr).finite():
                    return False
            return True

        prom.wait(settled, "the job's figures in Prometheus", 60)
        import torch
        yield Live(prom, instance, start, switched, workdir, torch.cuda.is_available())
    finally:
        if trainer is not None:
            trainer.close()
        if daemon is not None:
            daemon.close()
        if prom is not None:
            prom.close()
        keep = os.environ.get("LOOPTUNE_KEEP_LIVE")
        if keep:
            shutil.copytree(workdir, Path(keep) / workdir.name, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("*.sock"))
        shutil.rmtree(workdir, ignore_errors=True)


def _run(live: Live, q: Query) -> bool:
    """True if the query returned data; raises PromQLError on a query Prometheus rejects."""
    expr = substitute(q.expr, live.values())
    now = time.time()
    if q.instant:
        return live.prom.query(expr, now).finite()
    return live.prom.query_range(expr, live.start - 5, now, 1).finite()


def test_every_panel_query_returns_data(live: Live) -> None:
    errors, empty, stale_pending = [], [], []
    queries = [q for d in load_dashboards().values() for q in dashboard_queries(d)]
    assert len(queries) > 80
    excused = {**PENDING_TUNER, **NEEDS_RANKS}
    if not live.cuda:
        excused.update(NEEDS_CUDA)
    for q in queries:
        try:
            has_data = _run(live, q)
        except PromQLError as exc:
            errors.append(f"{q.key}: {exc}\n    {q.expr}")
            continue
        if q.key in PENDING_TUNER and has_data:
            stale_pending.append(q.key)
        elif not has_data and q.key not in excused:
            empty.append(f"{q.key}: {substitute(q.expr, live.values())}")
    assert not errors, "PromQL errors:\n" + "\n".join(errors)
    assert not empty, "panels without data:\n" + "\n".join(empty)
    assert not stale_pending, f"these now return data: remove them from PENDING_TUNER: {stale_pending}"
    keys = {q.key for q in queries}
    assert set(PENDING_TUNER) | set(NEEDS_CUDA) | set(NEEDS_RANKS) <= keys, "an excused target no longer exists"


def test_pending_targets_read_only_tuner_metrics() -> None:
    for d in load_dashboards().values():
        for q in dashboard_queries(d):
            if q.key in PENDING_TUNER:
                assert metric_names(q.expr) & TUNER_METRICS, q.key


def test_template_variables_list_the_live_job(live: Live) -> None:
    expected = {"run": RUN, "rank": "0", "instance": live.instance, "gpu": "0"}
    for d in load_dashboards().values():
        for v in variables(d):
            if v["type"] == "datasource":
                continue
            m = LABEL_VALUES.match(variable_query(v))
            assert m, v
            match = substitute(m.group("match") or "", live.values())
            params = {"match[]": match} if match else {}
            values = live.prom.api(f"/api/v1/label/{m.group('label')}/values", **params)
            assert expected[v["name"]] in values, (d["uid"], v["name"], values)


def test_every_rule_expression_evaluates(live: Live) -> None:
    """Recording rules return data (the GPU ones through the fake NVML); alert expressions
    parse and run (they are empty while all is well); Prometheus evaluated each without error."""
    errors, empty = [], []
    for r in load_rules():
        try:
            result = live.prom.query(r.expr)
        except PromQLError as exc:
            errors.append(f"{r.name}: {exc}")
            continue
        if r.kind == "record":
            if not result.finite():
                empty.append(r.name)
            elif not live.prom.query(r.name).finite():
                empty.append(f"{r.name} (the recorded series)")
    assert not errors, errors
    assert not empty, f"recording rules without data: {empty}"
    groups = live.prom.api("/api/v1/rules")["groups"]
    assert {g["file"] for g in groups} == {str(p) for p in RULE_FILES}
    for g in groups:
        for r in g["rules"]:
            assert r["health"] == "ok" and not r.get("lastError"), (r["name"], r.get("lastError"))
    assert sum(len(g["rules"]) for g in groups) == len(load_rules())


def test_alerts_of_the_live_run(live: Live) -> None:
    now = time.time()
    ever = live.prom.query('max_over_time(ALERTS{alertname=~"Looptune.*"}[5m])').series
    names = {s["metric"]["alertname"] for s in ever}
    assert names <= {"LooptuneGPUThrottled", "LooptuneJobInputBound"}, ever
    assert any(all(s["metric"].get(k) == v for k, v in THROTTLED.items()) for s in ever), ever
    # the tuner's first decision silences the input-bound alert (rules evaluate every second)
    decided = live.prom.query_range(f'sum(looptune_tuner_decisions_total{{run="{RUN}"}}) > 0',
                                    live.start - 5, now, 1).series
    first = min(float(t) for t, _ in decided[0]["values"])
    after = live.prom.query_range('ALERTS{alertname="LooptuneJobInputBound"}', first + 3, now, 1).series
    assert not after, after


def test_every_metric_the_queries_read_exists(live: Live) -> None:
    """Catches a misspelt name even in an alert that is rightly empty."""
    present = set(live.prom.api("/api/v1/label/__name__/values"))
    records = {r.name for r in load_rules() if r.kind == "record"}
    exprs = [q.expr for d in load_dashboards().values() for q in dashboard_queries(d)]
    exprs += [r.expr for r in load_rules()]
    missing = set()
    for e in exprs:
        missing |= metric_names(e) - present - records
    assert missing == set(ABSENT_HERE), missing - set(ABSENT_HERE)


def test_report_of_the_live_run(live: Live) -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        if os.environ.get("LOOPTUNE_REQUIRE_SERVERS") == "1":
            pytest.fail("matplotlib is not installed (pip install '.[report]')")
        pytest.skip("matplotlib is not installed (pip install '.[report]')")
    from looptune import report

    out = live.workdir / "report"
    index = report.run(live.prom.url, RUN, since="5m", out_dir=out)
    page = index.read_text(encoding="utf-8")
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == len(report.PANELS), [p.name for p in pngs]
    for png in pngs:
        data = png.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, png.name
        assert f'src="{png.name}"' in page
    summary = page.split('<p class="summary">')[1].split("</p>")[0]
    assert f"Run {RUN} (1 rank on 1 node" in summary, summary
    assert "input-bound" in summary and "num_workers 0→" in summary, summary
    factor = float(summary.split("samples/s ×")[1].split()[0])
    assert factor > 1.3, summary               # more workers feed the sleeping dataset faster
    rows = re.findall(r"<tr><td>[^<]+</td><td>num_workers</td><td>(\d+) → (\d+)</td><td>0</td>"
                      r"<td>workers</td><td>(kept|rolled_back)</td></tr>", page)
    assert ("kept" in {r[2] for r in rows} and len(rows) >= DECISIONS), rows
    keep = os.environ.get("LOOPTUNE_KEEP_REPORT")
    if keep:
        shutil.copytree(out, keep, dirs_exist_ok=True)


def test_dashboard_pictures(live: Live) -> None:
    """dashboards/preview.py draws every dashboard from the live data (the README's pictures)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        if os.environ.get("LOOPTUNE_REQUIRE_SERVERS") == "1":
            pytest.fail("matplotlib is not installed (pip install '.[report]')")
        pytest.skip("matplotlib is not installed (pip install '.[report]')")
    import importlib.util
    spec = importlib.util.spec_from_file_location("looptune_dashboards_preview", DASHBOARDS / "preview.py")
    assert spec is not None and spec.loader is not None
    preview = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(preview)
    from looptune.report import Prometheus as ReportPrometheus

    out = live.workdir / "pictures"
    out.mkdir()
    now = time.time()
    for uid, d in load_dashboards().items():
        values = {**live.values(), "rank": ".*", "instance": ".+", "run": RUN if uid != "looptune-fleet" else ".*"}
        path = preview.Preview(ReportPrometheus(live.prom.url), d, values, live.start - 5, now, 1.0).draw(
            out / f"{uid}.png")
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 50_000, uid
    keep = os.environ.get("LOOPTUNE_KEEP_REPORT")
    if keep:
        shutil.copytree(out, Path(keep) / "pictures", dirs_exist_ok=True)
