from __future__ import annotations

import logging
import os
import socket
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from looptune.daemon.sdnotify import Notifier

SUN_PATH_MAX = 107  # sizeof(sun_path) - 1 on Linux


@pytest.fixture
def notify_path(tmp_path: Path) -> Iterator[Path]:
    # pytest's tmp_path can exceed the AF_UNIX path limit on deep setups.
    path = tmp_path / "notify.sock"
    if len(str(path)) <= SUN_PATH_MAX:
        yield path
        return
    with tempfile.TemporaryDirectory(dir="/tmp") as short:
        yield Path(short) / "n.sock"


@pytest.fixture
def listener(notify_path: Path) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(notify_path))
    sock.settimeout(2)
    yield sock
    sock.close()


def recv(sock: socket.socket) -> bytes:
    return sock.recv(4096)


def assert_nothing_received(sock: socket.socket) -> None:
    sock.settimeout(0.05)
    with pytest.raises(TimeoutError):
        sock.recv(4096)


def make(notify_path: Path, **extra: str) -> Notifier:
    return Notifier.from_env({"NOTIFY_SOCKET": str(notify_path), **extra})


def test_exact_datagrams(listener: socket.socket, notify_path: Path) -> None:
    with make(notify_path, WATCHDOG_USEC="30000000") as n:
        assert n.enabled
        n.ready()
        assert recv(listener) == b"READY=1"
        n.status("collecting 3 jobs")
        assert recv(listener) == b"STATUS=collecting 3 jobs"
        n.watchdog()
        assert recv(listener) == b"WATCHDOG=1"
        n.stopping()
        assert recv(listener) == b"STOPPING=1"
        n.send("A=1", "B=two words")
        assert recv(listener) == b"A=1\nB=two words"


def test_reloading_sends_monotonic_usec(listener: socket.socket, notify_path: Path) -> None:
    with make(notify_path) as n:
        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        n.reloading()
        after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    first, second = recv(listener).decode().split("\n")
    assert first == "RELOADING=1"
    key, value = second.split("=")
    assert key == "MONOTONIC_USEC"
    assert before <= int(value) <= after


def test_status_is_one_line(listener: socket.socket, notify_path: Path) -> None:
    with make(notify_path) as n:
        n.status("line one\nline two\r\nthree\n")
    assert recv(listener) == b"STATUS=line one line two three"


def test_send_rejects_malformed_assignments(notify_path: Path) -> None:
    n = Notifier.from_env({})
    for bad in ("READY", "A=1\nB=2"):
        with pytest.raises(ValueError):
            n.send(bad)


def test_abstract_socket() -> None:
    name = f"looptune-test-{os.getpid()}-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(2)
    try:
        with Notifier.from_env({"NOTIFY_SOCKET": "@" + name}) as n:
            assert n.enabled
            n.ready()
        assert recv(sock) == b"READY=1"
    finally:
        sock.close()


def test_socket_is_close_on_exec(listener: socket.socket, notify_path: Path) -> None:
    with make(notify_path) as n:
        n.ready()
        assert n._sock is not None
        assert not n._sock.get_inheritable()


def test_disabled_without_notify_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_socket(*args: object, **kwargs: object) -> None:
        raise AssertionError("a disabled notifier must not open a socket")

    monkeypatch.setattr(socket, "socket", no_socket)
    n = Notifier.from_env({"WATCHDOG_USEC": "1000000"})
    assert not n.enabled
    n.ready()
    n.status("x")
    n.watchdog()
    n.stopping()
    n.reloading()
    n.send("A=1")
    n.close()


def test_from_env_defaults_to_process_environment(
    monkeypatch: pytest.MonkeyPatch, notify_path: Path
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(notify_path))
    monkeypatch.setenv("WATCHDOG_USEC", "4000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    n = Notifier.from_env()
    assert n.enabled
    assert n.watchdog_interval_seconds == 2.0


def test_unsupported_socket_address_disables(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="looptune.sdnotify"):
        n = Notifier.from_env({"NOTIFY_SOCKET": "vsock:2:1234"})
    assert not n.enabled
    assert "unsupported NOTIFY_SOCKET" in caplog.text


def test_vanished_socket_logged_once(
    listener: socket.socket, notify_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with make(notify_path) as n:
        n.ready()
        assert recv(listener) == b"READY=1"
        listener.close()
        notify_path.unlink()
        with caplog.at_level(logging.DEBUG, logger="looptune.sdnotify"):
            n.watchdog()
            n.status("still alive")
            n.stopping()
        warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(warnings) == 1
        assert warnings[0].name == "looptune.sdnotify"

        # After systemd is back, a later outage is reported again.
        back = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        back.bind(str(notify_path))
        back.settimeout(2)
        try:
            n.ready()
            assert recv(back) == b"READY=1"
        finally:
            back.close()
            notify_path.unlink()
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="looptune.sdnotify"):
            n.ready()
        assert len(caplog.records) == 1


def test_missing_socket_from_start_does_not_raise(tmp_path: Path) -> None:
    with Notifier.from_env({"NOTIFY_SOCKET": str(tmp_path / "nothing-here")}) as n:
        n.ready()
        n.reloading()


@pytest.mark.parametrize(
    ("env", "interval"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "500000"}, 0.25),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "garbage"}, None),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "<self>"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "<other>"}, None),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "garbage"}, None),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": ""}, 15.0),
    ],
)
def test_watchdog_interval(
    notify_path: Path, env: dict[str, str], interval: float | None
) -> None:
    pid = {"<self>": str(os.getpid()), "<other>": str(os.getpid() + 1)}
    env = {k: pid.get(v, v) for k, v in env.items()}
    assert make(notify_path, **env).watchdog_interval_seconds == interval


def test_watchdog_for_other_pid_sends_nothing(
    listener: socket.socket, notify_path: Path
) -> None:
    other = str(os.getpid() + 1)
    with make(notify_path, WATCHDOG_USEC="30000000", WATCHDOG_PID=other) as n:
        n.watchdog()
        assert_nothing_received(listener)
        n.ready()  # other messages still go out
        listener.settimeout(2)
        assert recv(listener) == b"READY=1"
