"""Hostile clients of /metrics: idle and slow connections, TLS clients that never shake hands,
a port clash, and file descriptors run out under the hook socket.

A scraper must keep being answered while a thousand idle TCP connections are open, the daemon's
thread count must not grow with them, and the server must drop them itself within its request
timeout. Run with `-s` to print the figures the README quotes (scrape latency, threads, RSS).
"""
from __future__ import annotations

import os
import resource
import select
import selectors
import shutil
import socket
import ssl
import statistics
import subprocess
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import psutil
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily

from conftest import free_port
from daemon_proc import DaemonPool, DaemonProc, http_get
from looptune import protocol
from looptune.daemon import config as cfg
from looptune.daemon import http as metrics_http

IDLE = 1000
# the server drops a client that has not sent a whole request head this long after connecting
REQUEST_TIMEOUT = 5.0
# quiet daemon: only the host sampler, no GPU probing, no tuners
CONFIG = {"collectors": {"interval_seconds": 0.5, "gpu": {"enabled": False}, "jobs": {"enabled": False}},
          "tuners": {"enabled": []}}


@pytest.fixture(scope="module", autouse=True)
def enough_fds() -> Iterator[None]:
    """This test process holds IDLE sockets at once: raise its own soft limit for the module."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, 8192) if hard != resource.RLIM_INFINITY else 8192
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < IDLE + 200:
        pytest.skip(f"this process may not open {IDLE + 200} files (ulimit -Hn)")
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.fixture(scope="module")
def daemon() -> Iterator[DaemonProc]:
    workdir = Path(tempfile.mkdtemp(prefix="lt-", dir="/tmp"))
    pool = DaemonPool(workdir)
    try:
        d = pool.start(CONFIG)
        d.wait_ready()
        yield d
    finally:
        pool.close()
        shutil.rmtree(workdir, ignore_errors=True)


def open_idle(port: int, n: int, host: str = "127.0.0.1") -> list[socket.socket]:
    """n TCP connections that never send a byte."""
    socks = []
    try:
        for _ in range(n):
            s = socket.create_connection((host, port), timeout=5)
            s.setblocking(False)
            socks.append(s)
    except BaseException:
        close_all(socks)
        raise
    return socks


def close_all(socks: list[socket.socket]) -> None:
    for s in socks:
        s.close()


def wait_all_closed_by_server(socks: list[socket.socket], timeout: float) -> list[socket.socket]:
    """Wait until the server has closed every socket (EOF or reset); returns those still open."""
    sel = selectors.DefaultSelector()
    for s in socks:
        sel.register(s, selectors.EVENT_READ)
    left = set(socks)
    deadline = time.monotonic() + timeout
    try:
        while left and time.monotonic() < deadline:
            for key, _ in sel.select(timeout=max(0.0, deadline - time.monotonic())):
                s = key.fileobj
                try:
                    data = s.recv(4096)     # type: ignore[union-attr]
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    data = b""
                if not data:
                    sel.unregister(s)
                    left.discard(s)         # type: ignore[arg-type]
    finally:
        sel.close()
    return list(left)


def timed_scrape(url: str, context: ssl.SSLContext | None = None, timeout: float = 5.0) -> float:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}),
                                         urllib.request.HTTPSHandler(context=context))
    t0 = time.monotonic()
    with opener.open(url, timeout=timeout) as resp:
        assert resp.status == 200
        resp.read()
    return time.monotonic() - t0


# ---- idle and slow clients ----

def test_scrapes_answer_with_1000_idle_connections_open(daemon: DaemonProc) -> None:
    proc = psutil.Process(daemon.pid)
    threads_before = proc.num_threads()
    idle = open_idle(daemon.port, IDLE)
    try:
        opened = time.monotonic()
        latencies = [timed_scrape(daemon.url) for _ in range(20)]
        threads, rss = proc.num_threads(), proc.memory_info().rss
        p50 = statistics.median(latencies)
        p95 = sorted(latencies)[int(0.95 * len(latencies)) - 1]
        print(f"\n{IDLE} idle connections open: scrape p50 {p50 * 1000:.1f} ms, p95 {p95 * 1000:.1f} ms, "
              f"max {max(latencies) * 1000:.1f} ms; daemon threads {threads} (before {threads_before}), "
              f"RSS {rss / 2**20:.1f} MiB")
        assert max(latencies) < 2.0, latencies
        assert threads <= threads_before + 4, f"{threads} threads with {IDLE} idle connections"
        # the server drops the idle ones itself, within its request timeout
        left = wait_all_closed_by_server(idle, REQUEST_TIMEOUT + 3.0 - (time.monotonic() - opened))
        assert not left, f"{len(left)} of {IDLE} idle connections still open {REQUEST_TIMEOUT + 3}s later"
        assert timed_scrape(daemon.url) < 2.0
    finally:
        close_all(idle)
    assert daemon.running()


def test_slowloris_request_is_dropped(daemon: DaemonProc) -> None:
    """A client trickling its request head a byte at a time is cut off at the request timeout."""
    s = socket.create_connection(("127.0.0.1", daemon.port), timeout=5)
    try:
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        t0 = time.monotonic()
        closed = False
        while time.monotonic() - t0 < REQUEST_TIMEOUT + 3.0:
            try:
                s.sendall(b"X")
            except OSError:
                closed = True
                break
            r, _, _ = select.select([s], [], [], 0.5)
            if r:
                try:
                    data = s.recv(4096)
                except OSError:
                    data = b""
                if not data:
                    closed = True
                    break
        assert closed, f"a trickling client still connected after {time.monotonic() - t0:.1f}s"
    finally:
        s.close()
    assert timed_scrape(daemon.url) < 2.0


def counting_registry() -> CollectorRegistry:
    class One:
        def collect(self):  # noqa: ANN201
            yield GaugeMetricFamily("looptune_test_value", "test", value=1)

    reg = CollectorRegistry(auto_describe=False)
    reg.register(One())
    return reg


def test_connections_beyond_the_bound_take_no_thread_and_scrapes_still_answer() -> None:
    port = free_port()
    threads_before = threading.active_count()
    server, _ = metrics_http.start("127.0.0.1", port, counting_registry(), lambda: 0, cfg.TLS(), max_connections=16)
    idle: list[socket.socket] = []
    try:
        idle = open_idle(port, 200)
        time.sleep(0.3)
        assert threading.active_count() <= threads_before + 4
        assert server.connection_count() <= 16
        assert timed_scrape(f"http://127.0.0.1:{port}/metrics") < 2.0
    finally:
        close_all(idle)
        server.shutdown()
        server.server_close()


# ---- TLS: the handshake is under the timeout too ----

@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed")
    d = tmp_path_factory.mktemp("tls")
    crt, key = d / "cert.pem", d / "key.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(crt),
                    "-days", "2", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    return str(crt), str(key)


def test_tls_clients_that_never_handshake_do_not_block_scrapes(cert: tuple[str, str]) -> None:
    crt, key = cert
    port = free_port()
    server, app = metrics_http.start("127.0.0.1", port, counting_registry(), lambda: 0,
                                     cfg.TLS(cert_file=crt, key_file=key))
    idle: list[socket.socket] = []
    result: list[float | BaseException] = []
    try:
        idle = open_idle(port, 50)
        opened = time.monotonic()
        ctx = ssl.create_default_context(cafile=crt)

        def scrape() -> None:
            try:
                result.append(timed_scrape(f"https://127.0.0.1:{port}/metrics", ctx))
            except BaseException as exc:  # noqa: BLE001 - reported below
                result.append(exc)

        t = threading.Thread(target=scrape, daemon=True)
        t.start()
        t.join(3.0)
        assert result and isinstance(result[0], float) and result[0] < 2.0, \
            f"HTTPS scrape with 50 silent TLS clients: {result or 'no answer in 3 s'}"
        left = wait_all_closed_by_server(idle, REQUEST_TIMEOUT + 3.0 - (time.monotonic() - opened))
        assert not left, f"{len(left)} silent TLS clients still connected"
    finally:
        close_all(idle)
        server.shutdown()
        server.server_close()


# ---- the port clash ----

def test_port_clash_is_one_line_naming_the_address_and_the_setting(daemons: DaemonPool) -> None:
    first = daemons.start(CONFIG)
    first.wait_ready()
    second = daemons.start(CONFIG, port=first.port)
    assert second.wait_exit(15) != 0, second.stderr
    lines = [line for line in second.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, second.stderr
    assert f"127.0.0.1:{first.port}" in lines[0] and "in use" in lines[0]
    assert "--listen" in lines[0] and "daemon.listen" in lines[0]
    assert "Traceback" not in second.stderr
    assert first.running()


# ---- file descriptors run out: the hook socket's accept loop backs off ----

def test_hook_accept_errors_back_off_without_spinning_or_flooding_the_log(daemons: DaemonPool) -> None:
    d = daemons.start(CONFIG)
    d.wait_ready()
    proc = psutil.Process(d.pid)
    time.sleep(0.5)
    limit = proc.num_fds() + 6
    proc.rlimit(psutil.RLIMIT_NOFILE, (limit, limit))
    err_before = len(d.stderr)
    hooks: list[socket.socket] = []
    try:
        for _ in range(30):     # more than the daemon can accept: the rest wait in the backlog
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(2)
            s.connect(str(d.socket_path))
            hooks.append(s)
        time.sleep(1.0)
        cpu0 = sum(proc.cpu_times()[:2])
        time.sleep(3.0)
        cpu = (sum(proc.cpu_times()[:2]) - cpu0) / 3.0
        grown = len(d.stderr) - err_before
        assert cpu < 0.25, f"daemon used {cpu:.0%} CPU with its file descriptors exhausted"
        assert grown < 4000, f"stderr grew {grown} bytes in 4 s:\n{d.stderr[-2000:]}"
        assert f"accept on {d.socket_path} failed" in d.stderr and "Too many open files" in d.stderr, \
            d.stderr[-2000:]
    finally:
        close_all(hooks)
    # it recovers once the connections close (the limit stays low): a status request is answered
    deadline = time.monotonic() + 5
    while True:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(2)
                s.connect(str(d.socket_path))
                s.sendall(protocol.encode({"type": "status"}))
                reply = s.makefile("rb").readline()
            assert b"status_reply" in reply, reply
            break
        except (OSError, AssertionError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    assert http_get(d.url)[0] == 200
    assert d.running()


def test_oversized_request_head_is_refused() -> None:
    port = free_port()
    server, _ = metrics_http.start("127.0.0.1", port, counting_registry(), lambda: 0, cfg.TLS())
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 20000 + b"\r\n\r\n")
            answer = s.makefile("rb").readline()
        assert answer.startswith(b"HTTP/1.1 431"), answer
    finally:
        server.shutdown()
        server.server_close()
