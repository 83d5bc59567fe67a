"""The channel to the node daemon: one background thread that reports, reconnects with
backoff and receives decisions; with no daemon it runs the embedded engine's ticks instead.
The training thread never waits on it: decisions reach it through the hook's queue.
It speaks only to a daemon that runs as root or as this process's user (the kernel's peer
credentials on the socket), and looks in a default directory only if root or this user owns it
and nobody else may write in it: anyone can create /tmp/looptune-UID first."""
from __future__ import annotations

import logging
import os
import select
import socket
import struct
import threading
import time
from collections import deque
from typing import Any

from looptune import protocol
from looptune.tuners.hook import runinfo

log = logging.getLogger("looptune.hook")


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process that listens at the other end, from the kernel (SO_PEERCRED)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", raw)


class Channel:
    """The background thread: reports, reconnects with backoff, receives decisions."""

    def __init__(self, hook: Any) -> None:
        self.hook = hook
        cfg = hook.config.hook
        self.interval = cfg.report_interval_seconds
        self.backoff_max = cfg.reconnect_max_seconds
        self.sock: socket.socket | None = None
        self.buf = bytearray()
        self.acks: deque[Any] = deque()
        self.identity: tuple[str, int, int] | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="looptune-hook", daemon=True)
        self._logged_reject: set[str] = set()
        self._logged_distrust: set[tuple[Any, ...]] = set()
        self.reconnects = 0
        self._next_embedded = 0.0
        self._connect()      # synchronously once: the mode is known when Hook() returns

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(3.0)

    def acknowledge(self, rec: Any) -> None:
        self.acks.append(rec)
        self._wake.set()

    def forget_in_child(self) -> None:
        self.sock = None   # the fd stays open in the child; the parent owns the connection

    def _distrust(self, key: tuple[Any, ...], msg: str, *args: Any) -> None:
        """Log a refused daemon once per (path, why): the channel retries every few seconds."""
        if key not in self._logged_distrust:
            self._logged_distrust.add(key)
            log.warning(msg, *args)

    def _connect(self) -> bool:
        h = self.hook
        for path in h.socket_paths:
            if not h.socket_named:
                d = os.path.dirname(path)
                problem = runinfo.socket_dir_problem(d)
                if problem == "":
                    continue                     # no such directory: no daemon there
                if problem is not None:
                    self._distrust((path, problem), "looptune: not connecting to %s: %s; a hook trusts "
                                   "only a directory of root or its own user that others cannot write. "
                                   "The job runs embedded.", path, problem)
                    continue
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.settimeout(0.5)
                s.connect(path)
                pid, uid, _ = peer_credentials(s)
                if uid not in (0, os.getuid()):
                    # before the hello: an untrusted peer learns nothing of this job
                    self._distrust((path, uid), "looptune: not trusting the daemon at %s: it runs as uid %d "
                                   "(pid %d), neither root nor this job's uid %d; nothing sent, no decision "
                                   "taken from it. The job runs embedded.", path, uid, pid, os.getuid())
                    s.close()
                    continue
                hello = h.hello()
                s.sendall(protocol.encode(hello))
                reply = self._read_line(s, deadline=time.monotonic() + 1.0)
                if reply is None or reply.get("type") != "welcome":
                    reason = (reply or {}).get("reason", "no welcome")
                    if reason not in self._logged_reject:
                        self._logged_reject.add(reason)
                        log.warning("looptune daemon at %s refused this job: %s %s", path, reason,
                                    (reply or {}).get("detail", ""))
                    s.close()
                    continue
                interval = reply.get("report_interval_seconds")
                if isinstance(interval, (int, float)) and 0.05 <= interval <= 60:
                    self.interval = float(interval)
                s.settimeout(None)
                s.setblocking(False)
                self.sock = s
                self.identity = (hello["run"], hello["rank"], hello["world_size"])
                if h.mode != "daemon":
                    log.info("looptune: reporting to the daemon at %s", path)
                h.mode = "daemon"
                self._lines()            # a decision that came in the same read as the welcome
                return True
            except (OSError, protocol.ProtocolError):
                s.close()
        if h.mode == "daemon":
            log.warning("looptune: lost the daemon; running embedded and retrying")
        h.mode = "embedded"
        return False

    def _read_line(self, s: socket.socket, deadline: float) -> dict[str, Any] | None:
        """Blocking read of one message during the handshake."""
        buf = bytearray()
        while b"\n" not in buf and len(buf) < protocol.MAX_MESSAGE_BYTES:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            s.settimeout(left)
            chunk = s.recv(4096)
            if not chunk:
                return None
            buf += chunk
        line, _, rest = bytes(buf).partition(b"\n")
        self.buf = bytearray(rest)
        return protocol.decode(line, protocol.SERVER_TYPES)

    def _drop(self) -> None:
        if self.sock is not None:
            try:
                self.sock.close()
            except OSError:
                pass
        self.sock = None
        self.buf.clear()
        if self.hook.mode == "daemon":
            log.warning("looptune: lost the daemon; running embedded and retrying")
            self.hook._abandon_trials("the daemon went away mid-trial")
        self.hook.mode = "embedded"

    def _send(self, msg: dict[str, Any]) -> None:
        assert self.sock is not None
        data = protocol.encode(msg)
        self.sock.settimeout(1.0)        # a stuck daemon costs this thread a second, never training
        try:
            self.sock.sendall(data)
        finally:
            if self.sock is not None:
                self.sock.setblocking(False)

    def _receive(self) -> None:
        while self.sock is not None:
            try:
                chunk = self.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                return
            if not chunk:
                self._drop()
                return
            self.buf += chunk
            self._lines()
            if len(self.buf) >= protocol.MAX_MESSAGE_BYTES:
                self._drop()

    def _lines(self) -> None:
        while b"\n" in self.buf:
            nl = self.buf.index(b"\n")
            line = bytes(self.buf[:nl])
            del self.buf[:nl + 1]
            self._on_message(line)

    def _on_message(self, line: bytes) -> None:
        try:
            msg = protocol.decode(line, protocol.SERVER_TYPES)
            if msg["type"] == "decision":
                self.hook._queue_decision(protocol.check_decision(msg))
            elif msg["type"] == "error":
                log.warning("looptune daemon closed this job's connection: %s %s", msg.get("reason"),
                            msg.get("detail", ""))
        except protocol.ProtocolError as exc:
            log.warning("looptune: ignored a bad message from the daemon: %s", exc)

    def _flush_acks(self) -> None:
        while self.acks and self.sock is not None:
            rec = self.acks.popleft()
            if rec.id is None:
                continue
            self._send({"type": "applied", "id": rec.id, "outcome": rec.outcome, "detail": rec.detail[:500],
                        "step": rec.step})

    def _tick(self) -> None:
        h = self.hook
        if self.sock is not None:
            rank, world = h.rank_world()
            if self.identity is not None and (rank, world) != self.identity[1:]:
                self._drop()     # torch.distributed came up after Hook(): say hello again as the right rank
        if self.sock is None:
            return
        self._receive()
        if self.sock is not None:
            self._flush_acks()
            self._send(h.report())

    def _run(self) -> None:
        backoff = 0.1
        next_report = time.monotonic()
        while True:
            stopping = self._stop.is_set()
            try:
                if self.sock is None and not stopping and time.monotonic() >= next_report:
                    if self._connect():
                        backoff = 0.1
                        self.reconnects += 1
                    else:
                        next_report = time.monotonic() + backoff
                        backoff = min(backoff * 2, self.backoff_max)
                if self.sock is not None and (stopping or time.monotonic() >= next_report or self.acks):
                    due = stopping or time.monotonic() >= next_report
                    if due:
                        self._tick()
                        next_report = time.monotonic() + self.interval
                    else:
                        self._flush_acks()
                if stopping:
                    if self.sock is not None:
                        self._send({"type": "bye"})
                        self.sock.close()
                        self.sock = None
                    return
                if self.hook._off and self.hook._errors >= self.hook.max_failures and self.sock is None:
                    return
            except (OSError, protocol.ProtocolError):
                self._drop()
            except Exception as exc:  # noqa: BLE001 - the reporter must not die quietly either
                self.hook._failed(exc)
                if stopping:
                    return
            timeout = max(0.0, next_report - time.monotonic())
            if self.sock is not None:
                try:
                    r, _, _ = select.select([self.sock], [], [], min(timeout, 0.2))
                except (OSError, ValueError):
                    r = []
                if r:
                    try:
                        self._receive()
                    except OSError:
                        self._drop()
                if self._wake.is_set():
                    self._wake.clear()
            else:
                try:
                    while self.acks:
                        self.hook.embedded.ack(self.acks.popleft())
                    if time.monotonic() >= self._next_embedded and not self.hook._off:
                        self._next_embedded = time.monotonic() + self.interval
                        self.hook.embedded.tick()
                except Exception as exc:  # noqa: BLE001
                    self.hook._failed(exc)
                self._wake.wait(min(timeout, 0.2) if timeout else 0.05)
                self._wake.clear()
