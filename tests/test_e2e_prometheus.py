"""End to end: a real Prometheus scrapes a real daemon with the shipped scrape config.

The Prometheus config is dashboards/prometheus.yml itself, with its targets pointed at a daemon
on a free loopback port: the static `looptune` job, and the file_sd job reading a JSON targets
file in a temporary directory (the same daemon, with a `cluster` label), and the rule files it
names, resolved next to it.
"""
from __future__ import annotations

import glob
import json
import os
import re
import signal
import subprocess
import time
import urllib.parse
from pathlib import Path
from typing import Any, Iterator

import psutil
import pytest
import yaml

from conftest import ROOT, free_port, require_binary
from looptune.daemon import __version__
from daemon_proc import DaemonPool, DaemonProc, http_get

pytestmark = pytest.mark.e2e

SHIPPED = ROOT / "dashboards" / "prometheus.yml"


def prometheus_config(daemon_port: int, sd_dir: Path) -> dict[str, Any]:
    """dashboards/prometheus.yml, pointed at 127.0.0.1:PORT, scraping every second."""
    config = yaml.safe_load(SHIPPED.read_text(encoding="utf-8"))
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    assert set(jobs) == {"looptune", "looptune-file-sd"}, set(jobs)
    static, file_sd = jobs["looptune"], jobs["looptune-file-sd"]
    assert len(static["static_configs"]) == 1
    static["static_configs"][0]["targets"] = [f"127.0.0.1:{daemon_port}"]
    assert len(file_sd["file_sd_configs"]) == 1
    file_sd["file_sd_configs"][0]["files"] = [str(sd_dir / "*.json")]
    file_sd["file_sd_configs"][0]["refresh_interval"] = "1s"
    for job in (static, file_sd):
        job["scrape_interval"] = "1s"
        job["scrape_timeout"] = "1s"       # may not exceed the interval
    # rule files are named relative to the shipped file; this copy lives elsewhere
    config["rule_files"] = [str(SHIPPED.parent / f) for f in config.get("rule_files") or []]
    config["global"]["scrape_interval"] = "1s"
    config["global"]["evaluation_interval"] = "1s"
    return config


class Prometheus:
    def __init__(self, binary: str, workdir: Path, config: dict[str, Any]) -> None:
        self.port = free_port()
        self.config = config
        self.config_path = workdir / "prometheus.yml"
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.log_path = workdir / "prometheus.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [binary, f"--config.file={self.config_path}", f"--storage.tsdb.path={workdir / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
                cwd=workdir, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def api(self, path: str, **params: str) -> Any:
        url = f"http://127.0.0.1:{self.port}{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        status, body = http_get(url, timeout=5)
        assert status == 200, f"{url}: HTTP {status}: {body[:500]}"
        data = json.loads(body)
        assert data["status"] == "success", data
        return data["data"]

    def wait(self, check: Any, what: str, timeout: float) -> Any:
        """Poll `check()` until it returns something truthy; fail after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"prometheus exited ({self.proc.returncode}):\n{self.log}"
            try:
                last = check()
            except (OSError, AssertionError, ValueError) as exc:
                last = exc
            else:
                if last:
                    return last
            time.sleep(0.25)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}\n{self.log}")

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.api("/api/v1/query", query=expr)
        assert data["resultType"] == "vector", data
        return data["result"]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@pytest.fixture
def stack(daemons: DaemonPool, short_tmp: Path) -> Iterator[tuple[DaemonProc, Prometheus]]:
    binary = require_binary("prometheus")
    d = daemons.start({"collectors": {"interval_seconds": 0.5}})
    d.wait_ready()
    sd_dir = short_tmp / "sd"
    sd_dir.mkdir()
    (sd_dir / "nodes.json").write_text(json.dumps([{"targets": [f"127.0.0.1:{d.port}"],
                                                     "labels": {"cluster": "e2e"}}]))
    prom = Prometheus(binary, short_tmp, prometheus_config(d.port, sd_dir))
    try:
        yield d, prom
    finally:
        prom.close()


def test_shipped_scrape_config_is_valid() -> None:
    promtool = require_binary("promtool")
    # also checks the rule files it names
    r = subprocess.run([promtool, "check", "config", str(SHIPPED)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr


def test_shipped_config_as_is_logs_no_error(short_tmp: Path) -> None:
    """A real Prometheus started on dashboards/prometheus.yml itself, unchanged, from another
    directory: it loads the rules, sets up both jobs (the file_sd one with nothing to find) and
    logs no error, such as file_sd's "Error adding file watch" for a missing directory."""
    binary = require_binary("prometheus")
    port = free_port()
    log_path = short_tmp / "prometheus.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [binary, f"--config.file={SHIPPED}", f"--storage.tsdb.path={short_tmp / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=info"],
            cwd=short_tmp, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)

    def api(path: str) -> Any:
        status, body = http_get(f"http://127.0.0.1:{port}{path}", timeout=2)
        return json.loads(body)["data"] if status == 200 else None

    try:
        deadline = time.monotonic() + 30
        loaded = None
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"prometheus exited ({proc.returncode}):\n{log_path.read_text()}"
            try:
                # the static target appears once service discovery has run (file_sd alongside it)
                targets = api("/api/v1/targets")
                groups = api("/api/v1/rules")
                if targets and groups and any(t["labels"]["job"] == "looptune" for t in targets["activeTargets"]) \
                        and groups["groups"]:
                    loaded = targets
                    break
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.25)
        assert loaded, f"prometheus did not load the shipped config in 30 s:\n{log_path.read_text()}"
        time.sleep(1)       # file_sd's watcher starts with the discovery manager; give it a moment
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
    log_text = log_path.read_text(errors="replace")
    assert "Completed loading of configuration file" in log_text, log_text
    errors = [line for line in log_text.splitlines() if re.search(r"\blevel=(error|fatal|crit)", line, re.I)]
    assert not errors, "\n".join(errors)


def test_prometheus_scrapes_the_daemon(stack: tuple[DaemonProc, Prometheus]) -> None:
    d, prom = stack
    prom.wait(lambda: http_get(f"http://127.0.0.1:{prom.port}/-/ready", timeout=2)[0] == 200,
              "prometheus ready", 30)

    def targets_up() -> list[dict[str, Any]] | None:
        active = prom.api("/api/v1/targets", state="active")["activeTargets"]
        mine = [t for t in active if t["labels"].get("instance") == f"127.0.0.1:{d.port}"]
        if sorted(t["labels"]["job"] for t in mine) == ["looptune", "looptune-file-sd"] and \
                all(t["health"] == "up" for t in mine):
            return mine
        return None

    targets = prom.wait(targets_up, "both targets health up", 30)
    by_job = {t["labels"]["job"]: t for t in targets}
    assert by_job["looptune-file-sd"]["labels"].get("cluster") == "e2e"
    assert "cluster" not in by_job["looptune"]["labels"]
    assert all(t["lastError"] == "" for t in targets), targets

    cpus = prom.query("looptune_host_cpus")
    assert {r["metric"]["job"] for r in cpus} == {"looptune", "looptune-file-sd"}
    assert all(float(r["value"][1]) == psutil.cpu_count(logical=True) for r in cpus), cpus

    build = prom.query('looptune_build_info{job="looptune"}')
    assert len(build) == 1 and build[0]["metric"]["version"] == __version__ and float(build[0]["value"][1]) == 1

    host_up = prom.query('looptune_collector_up{collector="host", cluster="e2e"}')
    assert len(host_up) == 1 and float(host_up[0]["value"][1]) == 1, host_up

    # every mode together adds up to one CPU-second per second per CPU. A rate over a window that
    # holds only the first scrapes is extrapolated low, so wait (bounded) until it has filled enough.
    n = psutil.cpu_count(logical=True)
    expr = 'sum by (job) (rate(looptune_host_cpu_seconds_total[10s]))'

    def rate_settled() -> list[dict[str, Any]] | None:
        result = prom.query(expr)
        ok = len(result) == 2 and all(float(r["value"][1]) >= 0.6 * n for r in result)
        return result if ok else None

    rate = prom.wait(rate_settled, f"{expr} >= 0.6 * {n} CPUs for both jobs", 25)
    assert {r["metric"]["job"] for r in rate} == {"looptune", "looptune-file-sd"}
    for r in rate:
        assert float(r["value"][1]) <= 1.5 * n, rate
    idle = prom.query('rate(looptune_host_cpu_seconds_total{mode="idle", job="looptune"}[10s])')
    assert len(idle) == 1 and float(idle[0]["value"][1]) >= 0

    # the shipped rule files were loaded along with the scrape config
    if prom.config["rule_files"]:
        groups = prom.api("/api/v1/rules")["groups"]
        assert groups, "rule_files named in dashboards/prometheus.yml were not loaded"
        named = {os.path.realpath(f) for pattern in prom.config["rule_files"] for f in glob.glob(pattern)}
        assert {os.path.realpath(g["file"]) for g in groups} == named

    # Prometheus reports its own scrape health for the daemon: no failed or oversized samples
    scrape = prom.query('up{job=~"looptune.*"}')
    assert len(scrape) == 2 and all(float(r["value"][1]) == 1 for r in scrape), scrape
    assert d.running()
    prom.close()
    assert prom.proc.returncode == 0, prom.log
    assert d.stop() == 0
