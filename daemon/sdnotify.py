"""Minimal, dependency-free sd_notify(3) client.

systemd passes the notification socket in ``NOTIFY_SOCKET`` and the watchdog
deadline in ``WATCHDOG_USEC``/``WATCHDOG_PID``.  Every message is one datagram of
newline-separated ``KEY=VALUE`` assignments.  When ``NOTIFY_SOCKET`` is unset (not
run by systemd, or a unit without Type=notify) every method is a cheap no-op.

Sending never raises: the daemon must keep monitoring even if systemd's socket
went away (e.g. during a systemd re-exec).  The first failure of an outage is
logged as a warning, further ones at debug level until a send succeeds again.

Reload protocol (Type=notify-reload, and Type=notify on systemd >= 253): on
SIGHUP call ``reloading()``, reload, then ``ready()`` again.
"""
from __future__ import annotations

import logging
import os
import re
import socket
import threading
import time
from collections.abc import Mapping

log = logging.getLogger("looptune.sdnotify")

_NEWLINES = re.compile(r"[\r\n]+")


def _parse_positive_int(value: str | None) -> int | None:
    if not value:
        return None
    try:
        number = int(value)
    except ValueError:
        return None
    return number if number > 0 else None


def _socket_address(notify_socket: str | None) -> str | None:
    """Map $NOTIFY_SOCKET to an AF_UNIX address; None when absent/unsupported."""
    if not notify_socket:
        return None
    if notify_socket.startswith("@"):
        # Linux abstract namespace: the name starts with a NUL byte.
        return "\0" + notify_socket[1:]
    if notify_socket.startswith("/"):
        return notify_socket
    # e.g. "vsock:..." (systemd >= 254); not needed on a host daemon.
    log.warning("unsupported NOTIFY_SOCKET %r; notifications disabled", notify_socket)
    return None


class Notifier:
    """Sends sd_notify messages over one AF_UNIX datagram socket."""

    def __init__(self, address: str | None, watchdog_usec: int | None = None) -> None:
        self._address = address
        self._watchdog_usec = watchdog_usec
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()  # the watchdog may be pinged from a thread
        self._failing = False

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Notifier:
        address = _socket_address(environ.get("NOTIFY_SOCKET"))
        watchdog_usec = _parse_positive_int(environ.get("WATCHDOG_USEC"))
        watchdog_pid = environ.get("WATCHDOG_PID")
        # The watchdog belongs to WATCHDOG_PID only; a forked child must not ping it.
        if watchdog_pid and _parse_positive_int(watchdog_pid) != os.getpid():
            watchdog_usec = None
        return cls(address, watchdog_usec)

    @property
    def enabled(self) -> bool:
        return self._address is not None

    @property
    def watchdog_interval_seconds(self) -> float | None:
        """How often to ping: half the deadline, as sd_watchdog_enabled(3) advises."""
        if self._watchdog_usec is None:
            return None
        return self._watchdog_usec / 2 / 1_000_000

    def ready(self) -> None:
        self.send("READY=1")

    def status(self, text: str) -> None:
        self.send("STATUS=" + _NEWLINES.sub(" ", text).strip())

    def watchdog(self) -> None:
        if self._watchdog_usec is not None:
            self.send("WATCHDOG=1")

    def stopping(self) -> None:
        self.send("STOPPING=1")

    def reloading(self) -> None:
        # systemd uses the timestamp to tell this reload apart from older ones.
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def send(self, *assignments: str) -> None:
        """Send KEY=VALUE assignments as one datagram; never raises on I/O errors."""
        for item in assignments:
            if "=" not in item or "\n" in item:
                raise ValueError(f"invalid sd_notify assignment: {item!r}")
        if self._address is None or not assignments:
            return
        payload = "\n".join(assignments).encode("utf-8")
        with self._lock:
            try:
                if self._sock is None:
                    # Python sockets are created with SOCK_CLOEXEC (PEP 446).
                    self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._sock.sendto(payload, self._address)
            except OSError as exc:
                self._report_failure(exc)
            else:
                self._failing = False

    def _report_failure(self, exc: OSError) -> None:
        if self._failing:
            log.debug("sd_notify to %r failed again: %s", self._address, exc)
            return
        self._failing = True
        log.warning("sd_notify to %r failed: %s (further failures not logged)",
                    self._address, exc)

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None

    def __enter__(self) -> Notifier:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
