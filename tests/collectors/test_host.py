"""The host collector against the kernel's own figures (/proc) and against node_exporter."""
from __future__ import annotations

import os
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from looptune.collectors.host import HostCollector, HostSnapshot
from conftest import require_binary

# the columns of /proc/stat's cpu lines, in clock ticks (proc(5))
STAT_MODES = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal", "guest", "guest_nice")
HZ = os.sysconf("SC_CLK_TCK")
CPUS = os.cpu_count() or 1
SLACK = 0.05 * CPUS + 2 / HZ   # seconds: readings of a moving counter a moment apart

DOCUMENTED = {
    "looptune_host_cpu_seconds": ("counter", {"mode"}),
    "looptune_host_cpus": ("gauge", set()),
    "looptune_host_memory_total_bytes": ("gauge", set()),
    "looptune_host_memory_available_bytes": ("gauge", set()),
    "looptune_host_swap_total_bytes": ("gauge", set()),
    "looptune_host_swap_used_bytes": ("gauge", set()),
}


def proc_stat_cpu() -> dict[str, float]:
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu "):
                return {m: int(v) / HZ for m, v in zip(STAT_MODES, line.split()[1:])}
    raise AssertionError("no cpu line in /proc/stat")


def meminfo() -> dict[str, int]:
    out = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, rest = line.split(":", 1)
            parts = rest.split()
            out[key] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    return out


def registry_of(snapshot: HostSnapshot) -> CollectorRegistry:
    class Fixed:
        def collect(self) -> Any:
            return HostCollector().families(snapshot)
    reg = CollectorRegistry(auto_describe=False)
    reg.register(Fixed())
    return reg


def test_sample_matches_proc() -> None:
    before = proc_stat_cpu()
    snap = HostCollector().sample()
    after = proc_stat_cpu()
    mem = meminfo()

    for mode in ("user", "system", "idle"):
        assert before[mode] - SLACK <= snap.cpu_seconds[mode] <= after[mode] + SLACK, mode
    assert set(STAT_MODES) >= set(snap.cpu_seconds) >= {"user", "system", "idle", "iowait"}
    # guest time is counted inside user/nice by the kernel: exporting it as a mode would count it twice
    assert not {"guest", "guest_nice"} & set(snap.cpu_seconds)
    assert all(v >= 0 for v in snap.cpu_seconds.values())
    assert snap.cpus == CPUS
    assert snap.memory_total_bytes == mem["MemTotal"]
    assert snap.memory_available_bytes == pytest.approx(mem["MemAvailable"], rel=0.05)
    assert snap.swap_total_bytes == mem["SwapTotal"]
    swap_used = mem["SwapTotal"] - mem["SwapFree"]
    assert abs(snap.swap_used_bytes - swap_used) <= 0.05 * mem["SwapTotal"] + (1 << 20)


def test_families_are_the_documented_ones() -> None:
    snap = HostCollector().sample()
    reg = registry_of(snap)
    # through the text format, as Prometheus reads it
    fams = {f.name: f for f in text_string_to_metric_families(generate_latest(reg).decode())}
    assert {n: (f.type, {k for s in f.samples for k in s.labels}) for n, f in fams.items()} == DOCUMENTED
    assert [s.name for s in fams["looptune_host_cpu_seconds"].samples] == \
        ["looptune_host_cpu_seconds_total"] * len(snap.cpu_seconds)
    assert {s.labels["mode"] for s in fams["looptune_host_cpu_seconds"].samples} == set(snap.cpu_seconds)
    for name, (_, labels) in DOCUMENTED.items():
        if not labels:
            assert len(fams[name].samples) == 1, name

    get = reg.get_sample_value
    assert get("looptune_host_cpus") == CPUS
    assert get("looptune_host_memory_total_bytes") == meminfo()["MemTotal"]
    assert get("looptune_host_memory_available_bytes") == snap.memory_available_bytes
    assert get("looptune_host_swap_total_bytes") == snap.swap_total_bytes
    assert get("looptune_host_swap_used_bytes") == snap.swap_used_bytes
    for mode, seconds in snap.cpu_seconds.items():
        assert get("looptune_host_cpu_seconds_total", {"mode": mode}) == seconds
    now = proc_stat_cpu()
    assert get("looptune_host_cpu_seconds_total", {"mode": "user"}) <= now["user"] + SLACK


@pytest.fixture
def node_exporter(port: int, tmp_path: Path) -> Iterator[str]:
    exe = require_binary("prometheus-node-exporter", "node_exporter")
    log = (tmp_path / "node_exporter.log").open("wb")
    proc = subprocess.Popen([exe, f"--web.listen-address=127.0.0.1:{port}", "--collector.disable-defaults",
                             "--collector.meminfo", "--collector.cpu"], stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        deadline = time.monotonic() + 20
        while True:
            assert proc.poll() is None, (tmp_path / "node_exporter.log").read_text()
            try:
                with urllib.request.urlopen(url, timeout=2):
                    break
            except (urllib.error.URLError, ConnectionError):
                assert time.monotonic() < deadline, "node_exporter did not answer in 20s"
                time.sleep(0.05)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()


@pytest.mark.e2e
def test_agrees_with_node_exporter(node_exporter: str) -> None:
    host = HostCollector()
    before = host.sample()
    with urllib.request.urlopen(node_exporter, timeout=10) as r:
        text = r.read().decode()
    after = host.sample()
    node: dict[str, list[Any]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            node.setdefault(s.name, []).append(s)

    assert node["node_memory_MemTotal_bytes"][0].value == after.memory_total_bytes
    assert registry_of(after).get_sample_value("looptune_host_memory_available_bytes") == \
        pytest.approx(node["node_memory_MemAvailable_bytes"][0].value, rel=0.05)
    user = [s for s in node["node_cpu_seconds_total"] if s.labels["mode"] == "user"]
    assert len(user) == CPUS
    node_user = sum(s.value for s in user)
    # per-CPU lines are rounded to ticks one by one: up to a tick per CPU apart from the total
    assert before.cpu_seconds["user"] - SLACK <= node_user <= after.cpu_seconds["user"] + SLACK
    assert registry_of(after).get_sample_value("looptune_host_cpu_seconds_total", {"mode": "user"}) == \
        after.cpu_seconds["user"]
