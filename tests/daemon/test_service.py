"""The daemon as a real subprocess: /metrics, signals, reloads, sd_notify, the socket, the GPU.

Each test starts its own `python -m daemon daemon` (tests/daemon/daemon_proc.py) on a free
loopback port with its socket in a short temporary directory; read-only checks share one
daemon per module. Every wait is bounded and every process is stopped at teardown.
"""
from __future__ import annotations

import ctypes
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import psutil
import pytest

from conftest import require_binary
from looptune.daemon import __version__
from daemon_proc import ROOT, DaemonPool, DaemonProc, Metrics, free_port, http_get, write_config

GPU_LINE = re.compile(r"\bGPU\b|looptune\.gpu|collector gpu")


def nvml_present() -> bool:
    try:
        ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return False
    return True


def up(m: Metrics, name: str) -> float | None:
    return m.get("looptune_collector_up", collector=name)


def wait_for_text(read: Callable[[], str], needle: str, timeout: float = 5.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        text = read()
        if needle in text or time.monotonic() >= deadline:
            return text
        time.sleep(0.05)


def connectable(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(2)
        try:
            s.connect(str(path))
        except OSError:
            return False
        return True


# ---- one daemon shared by the read-only checks ----

@pytest.fixture(scope="module")
def shared() -> Iterator[DaemonProc]:
    workdir = Path(tempfile.mkdtemp(prefix="lt-", dir="/tmp"))
    pool = DaemonPool(workdir)
    try:
        # a short interval: many GPU samples fail in the few seconds the tests watch
        d = pool.start({"collectors": {"interval_seconds": 0.2}})
        d.wait_ready()
        d.wait_until(lambda m: up(m, "host") == 1, "the host collector up")
        yield d
    finally:
        pool.close()
        shutil.rmtree(workdir, ignore_errors=True)


def test_serves_metrics_and_socket(shared: DaemonProc) -> None:
    m = shared.metrics()
    assert m.get("looptune_host_cpus") == psutil.cpu_count(logical=True)
    assert m.get("looptune_build_info", version=__version__) == 1
    assert up(m, "host") == 1
    assert m.get("looptune_config_last_reload_successful") == 1
    assert m.get("looptune_config_reloads_total") == 0
    assert m.get("looptune_config_reload_failures_total") == 0
    assert m.get("looptune_host_cpu_seconds_total", mode="idle") > 0
    st = os.stat(shared.socket_path)
    assert stat.S_ISSOCK(st.st_mode)
    assert connectable(shared.socket_path)


def test_promtool_check_metrics(shared: DaemonProc) -> None:
    promtool = require_binary("promtool")
    body = shared.scrape()
    r = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip() == "" and r.stderr.strip() == "", r.stdout + r.stderr


def test_two_concurrent_scrapes(shared: DaemonProc) -> None:
    barrier = threading.Barrier(2, timeout=10)
    results: list[object] = [None, None]

    def scrape(i: int) -> None:
        try:
            barrier.wait()
            results[i] = http_get(shared.url, timeout=10)
        except BaseException as exc:  # noqa: BLE001 - reported below
            results[i] = exc

    threads = [threading.Thread(target=scrape, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(15)
    assert not any(t.is_alive() for t in threads)
    for r in results:
        assert isinstance(r, tuple), r
        status, body = r
        assert status == 200
        m = Metrics(body)
        assert m.get("looptune_build_info", version=__version__) == 1
        assert m.get("looptune_host_cpus") is not None


def test_daemon_process_has_no_torch_loaded(shared: DaemonProc) -> None:
    # torch brings its shared libraries (libtorch*.so, torch/_C*.so) into the process
    maps = Path(f"/proc/{shared.pid}/maps").read_text()
    loaded = sorted({line.split()[-1] for line in maps.splitlines() if "torch" in line.split()[-1]})
    assert loaded == [], loaded


@pytest.mark.skipif(nvml_present(), reason="an NVIDIA driver is installed: the GPU collector is up here")
def test_gpu_collector_down_without_driver(shared: DaemonProc) -> None:
    m = shared.wait_until(lambda m: up(m, "gpu") == 0, "looptune_collector_up{collector=gpu} 0")
    assert up(m, "host") == 1
    assert m.get("looptune_collector_errors_total", collector="gpu") == 1
    assert m.get("looptune_collector_last_success_timestamp_seconds", collector="gpu") == 0
    assert not [n for n in m.samples if n.startswith("looptune_gpu_")]
    # several more failed samples at 0.2 s: still one outage, one error, one log line
    time.sleep(2.0)
    m = shared.metrics()
    assert up(m, "gpu") == 0 and up(m, "host") == 1
    assert m.get("looptune_collector_errors_total", collector="gpu") == 1
    gpu_lines = [ln for ln in shared.stderr.splitlines() if GPU_LINE.search(ln)]
    assert len(gpu_lines) == 1, gpu_lines
    assert "NVML" in gpu_lines[0] or "driver" in gpu_lines[0]
    assert shared.running()


# ---- the daemon never imports torch ----

NO_TORCH_SCRIPT = textwrap.dedent("""
    import importlib, pkgutil, sys, time, urllib.request
    sys.path.insert(0, sys.argv[1])
    from looptune import collectors, daemon
    for pkg in (daemon, collectors):
        for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
            if not info.name.endswith("__main__"):
                importlib.import_module(info.name)
    from looptune.daemon import config as cfg
    from looptune.daemon.service import Daemon
    d = Daemon(cfg.Config(), listen="127.0.0.1:" + sys.argv[2], socket_path=sys.argv[3], environ={})
    d.start()
    try:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        body = opener.open("http://127.0.0.1:%s/metrics" % sys.argv[2], timeout=5).read().decode()
        assert "looptune_build_info" in body, body[:300]
        time.sleep(1.0)
    finally:
        d.shutdown()
    heavy = ("torch", "transformers", "accelerate", "lightning", "pytorch_lightning")   # nor a training framework
    bad = sorted(m for m in sys.modules if m.split(".")[0] in heavy)
    print("TORCH MODULES:", bad[:10])
    print("IMPORTED:", sorted(m for m in sys.modules if m.startswith("looptune.")))
    sys.exit(1 if bad else 0)
""")


def test_daemon_never_imports_torch(short_tmp: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC")}
    r = subprocess.run([sys.executable, "-c", NO_TORCH_SCRIPT, str(ROOT), str(free_port()),
                        str(short_tmp / "t.sock")], cwd=short_tmp, env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "TORCH MODULES: []" in r.stdout
    assert "daemon.service" in r.stdout and "collectors.gpu" in r.stdout


# ---- stop ----

@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_stop_signal_exits_zero_and_removes_socket(daemons: DaemonPool, sig: int) -> None:
    d = daemons.start()
    d.wait_ready()
    assert d.socket_path.exists()
    t0 = time.monotonic()
    d.send(sig)
    rc = d.wait_exit(10)
    elapsed = time.monotonic() - t0
    assert rc == 0, d.stderr
    assert elapsed < 2.0, f"took {elapsed:.2f}s to stop"
    assert not d.socket_path.exists()
    assert "looptune stopped" in d.stderr
    assert "Traceback" not in d.stderr, d.stderr


def test_sigterm_with_idle_and_slow_connections_open(daemons: DaemonPool) -> None:
    """Idle /metrics clients, one half-sent request and an idle hook connection do not delay the stop."""
    d = daemons.start()
    d.wait_ready()
    idle = [socket.create_connection(("127.0.0.1", d.port), timeout=5) for _ in range(200)]
    hook = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        idle[0].sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        hook.connect(str(d.socket_path))
        t0 = time.monotonic()
        d.send(signal.SIGTERM)
        rc = d.wait_exit(10)
        elapsed = time.monotonic() - t0
    finally:
        hook.close()
        for s in idle:
            s.close()
    assert rc == 0, d.stderr
    assert elapsed < 2.0, f"took {elapsed:.2f}s to stop with 200 idle connections open"
    assert "Traceback" not in d.stderr, d.stderr


def test_bad_config_at_start_exits_1(daemons: DaemonPool) -> None:
    d = daemons.start({"collectors": {"interval_seconds": -1}, "jobs": {"max_jobs": 0}})
    rc = d.wait_exit(15)
    assert rc == 1, d.stderr
    assert "collectors.interval_seconds: -1 is out of range; allowed 0.1..60" in d.stderr
    assert "jobs.max_jobs: 0 is out of range" in d.stderr
    assert str(d.config) in d.stderr
    assert not d.socket_path.exists()
    with pytest.raises(OSError):
        http_get(d.url, timeout=1)


def test_missing_config_file_at_start_exits_1(daemons: DaemonPool, short_tmp: Path) -> None:
    d = daemons.start(short_tmp / "absent.yaml")
    assert d.wait_exit(15) == 1
    assert "absent.yaml" in d.stderr and "cannot read" in d.stderr


# ---- reload ----

def test_sighup_good_config(daemons: DaemonPool) -> None:
    d = daemons.start({"collectors": {"host": {"interval_seconds": 30}}})
    d.wait_ready()
    m0 = d.wait_until(lambda m: up(m, "jobs") == 1 and up(m, "host") == 1, "host and jobs up")
    t_load = m0.get("looptune_config_last_reload_success_timestamp_seconds")
    assert m0.get("looptune_config_reloads_total") == 0

    write_config(d.config, {"collectors": {"host": {"interval_seconds": 0.2}, "jobs": {"enabled": False}}})
    d.send(signal.SIGHUP)
    m = d.wait_until(lambda m: m.get("looptune_config_reloads_total") == 1, "reloads_total 1")
    assert m.get("looptune_config_last_reload_successful") == 1
    assert m.get("looptune_config_reload_failures_total") == 0
    assert m.get("looptune_config_last_reload_success_timestamp_seconds") > t_load
    # jobs disabled: its sampler is gone, and with it its series
    m = d.wait_until(lambda m: up(m, "jobs") is None, "the jobs collector to disappear", timeout=5)
    assert up(m, "host") == 1
    # host interval 30 -> 0.2: the last-success time now moves several times a second (with the old
    # interval it could move once, for the sample the reload itself triggers, then not for 30 s)
    seen: set[float] = set()

    def moving(m: Metrics) -> bool:
        seen.add(m.get("looptune_collector_last_success_timestamp_seconds", collector="host"))
        return len(seen) >= 3

    d.wait_until(moving, "the host collector sampling at the new interval", timeout=5, every=0.1)
    assert "config reloaded" in wait_for_text(lambda: d.stderr, "config reloaded")
    assert d.running()


def test_sighup_bad_config_keeps_running_config(daemons: DaemonPool) -> None:
    d = daemons.start({})
    d.wait_ready()
    d.wait_until(lambda m: up(m, "jobs") == 1, "jobs up")

    # a bad value next to a good change: none of it may be applied
    write_config(d.config, {"collectors": {"interval_seconds": -1, "jobs": {"enabled": False}}})
    d.send(signal.SIGHUP)
    m = d.wait_until(lambda m: m.get("looptune_config_reloads_total") == 1, "reloads_total 1")
    assert m.get("looptune_config_last_reload_successful") == 0
    assert m.get("looptune_config_reload_failures_total") == 1
    err = wait_for_text(lambda: d.stderr, "collectors.interval_seconds")
    assert "collectors.interval_seconds: -1 is out of range" in err, err
    time.sleep(0.5)     # give a wrongly applied change time to show
    m = d.metrics()
    assert up(m, "jobs") == 1, "the rejected file's jobs.enabled: false was applied"
    assert d.running()

    # fixed: the next HUP applies it and the gauge goes back to 1
    write_config(d.config, {"collectors": {"jobs": {"enabled": False}}})
    d.send(signal.SIGHUP)
    m = d.wait_until(lambda m: m.get("looptune_config_reloads_total") == 2, "reloads_total 2")
    assert m.get("looptune_config_last_reload_successful") == 1
    assert m.get("looptune_config_reload_failures_total") == 1
    d.wait_until(lambda m: up(m, "jobs") is None, "the jobs collector to disappear", timeout=5)
    assert d.stop() == 0


# ---- systemd notify ----

class NotifyListener:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.log: list[list[str]] = []

    def next(self, pred: Callable[[list[str]], bool], what: str, timeout: float = 10.0) -> list[str]:
        """The next datagram (its KEY=VALUE lines) matching `pred`; others are kept in `log`."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {what} within {timeout}s; received {self.log}")
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            msg = data.decode().split("\n")
            self.log.append(msg)
            if pred(msg):
                return msg

    def close(self) -> None:
        self.sock.close()


def test_sd_notify(daemons: DaemonPool, short_tmp: Path) -> None:
    n = NotifyListener(short_tmp / "notify.sock")
    try:
        d = daemons.start(env={"NOTIFY_SOCKET": str(n.path), "WATCHDOG_USEC": "400000"})
        n.next(lambda m: "READY=1" in m, "READY=1", timeout=15)
        # READY=1 promises a working endpoint: it must already serve, no retry allowed here
        status, body = http_get(d.url, timeout=5)
        assert status == 200 and "looptune_build_info" in body
        status_msg = n.next(lambda m: any(a.startswith("STATUS=") for a in m), "STATUS=", timeout=5)
        assert "host" in status_msg[0]
        # watchdog pings at half of WATCHDOG_USEC
        t0 = time.monotonic()
        for _ in range(3):
            n.next(lambda m: m == ["WATCHDOG=1"], "WATCHDOG=1", timeout=3)
        assert time.monotonic() - t0 < 5

        d.send(signal.SIGHUP)
        reloading = n.next(lambda m: "RELOADING=1" in m, "RELOADING=1", timeout=10)
        assert any(re.fullmatch(r"MONOTONIC_USEC=\d+", a) for a in reloading), reloading
        n.next(lambda m: "READY=1" in m, "READY=1 after the reload", timeout=10)

        d.send(signal.SIGTERM)
        n.next(lambda m: "STOPPING=1" in m, "STOPPING=1", timeout=10)
        assert d.wait_exit(10) == 0
    finally:
        n.close()


# ---- the hook socket at start ----

def test_stale_socket_is_replaced(daemons: DaemonPool, short_tmp: Path) -> None:
    path = short_tmp / "stale.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.close()                              # the file stays; nothing listens on it
    assert path.exists() and not connectable(path)
    d = daemons.start(socket_path=path)
    d.wait_ready()
    assert connectable(path)
    assert d.stop() == 0
    assert not path.exists()


def test_socket_in_use_by_another_daemon(daemons: DaemonPool) -> None:
    first = daemons.start()
    first.wait_ready()
    second = daemons.start(socket_path=first.socket_path)
    rc = second.wait_exit(15)
    assert rc == 1, second.stderr
    assert "in use" in second.stderr
    assert str(first.socket_path) in second.stderr
    # the first daemon is untouched: still serving, its socket still there and answering
    assert first.running()
    assert first.metrics().get("looptune_build_info", version=__version__) == 1
    assert first.socket_path.exists() and connectable(first.socket_path)
    # and the second one let go of its port
    with pytest.raises(OSError):
        http_get(second.url, timeout=1)


def test_metrics_port_in_use(daemons: DaemonPool) -> None:
    first = daemons.start()
    first.wait_ready()
    second = daemons.start(port=first.port)
    assert second.wait_exit(15) == 1, second.stderr
    assert "cannot start" in second.stderr and "in use" in second.stderr.lower()
    assert not second.socket_path.exists()
    assert first.running() and first.metrics().get("looptune_host_cpus") is not None
    assert connectable(first.socket_path)


def test_socket_path_taken_by_a_regular_file(daemons: DaemonPool, short_tmp: Path) -> None:
    path = short_tmp / "not-a-socket"
    path.write_text("keep me")
    d = daemons.start(socket_path=path)
    assert d.wait_exit(15) == 1
    assert "not a socket" in d.stderr
    assert path.read_text() == "keep me"
