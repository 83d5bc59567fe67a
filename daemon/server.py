"""The Unix socket the training hooks (and `looptune status`) talk to.

One thread multiplexes every connection with a selector. The peer's pid and uid come from
SO_PEERCRED, not from what it says: a job may only be registered for the peer's own process
(or a descendant of it) and is owned by the peer's uid. Anything malformed, oversized, of an
unknown version, out of order, too fast or claiming someone else's job is rejected, counted
in `rejected[reason]`, answered with one error line and the connection is closed. Nothing a
client sends can raise out of the loop.

Binding is careful: a socket file left by a dead daemon is replaced, but one that still
answers belongs to a running daemon and is left alone (start-up fails with a clear error).
"""
from __future__ import annotations

import errno
import itertools
import logging
import os
import selectors
import socket
import stat
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from looptune.daemon.accept import TRANSIENT, AcceptGate
from looptune.daemon.hooks import HookJob, HookRegistry
from looptune import protocol
from looptune.protocol import ProtocolError

log = logging.getLogger("looptune.server")

MAX_OUTBOX_BYTES = 1 << 20


class SocketInUse(Exception):
    pass


class UnsafeSocketDir(Exception):
    """A per-user socket directory that another user owns (or a symlink): not used."""


def private_dir(path: str) -> None:
    """Make `path` a directory only this process's user can enter (0700), or check that an existing
    one is ours. A per-user fallback such as /tmp/looptune-UID lives where any user can create it
    first, to catch the hooks' connections: one owned by another user, or a symlink, is refused; one
    of ours that others could write is closed (0700) before the socket goes in."""
    os.makedirs(os.path.dirname(path.rstrip("/")) or "/", exist_ok=True)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(path)
    euid = os.geteuid()
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafeSocketDir(f"{path} is not a directory (a symlink or a file): another user may have "
                              f"put it there; remove it or choose --socket")
    if st.st_uid != euid:
        raise UnsafeSocketDir(f"{path} belongs to uid {st.st_uid}, not to this daemon's uid {euid}: another "
                              f"user may have created it to receive the training jobs' connections; "
                              f"remove it or choose --socket")
    if stat.S_IMODE(st.st_mode) != 0o700:
        if stat.S_IMODE(st.st_mode) & 0o022:
            log.warning("%s was writable by other users (mode %o); closing it to 0700", path,
                        stat.S_IMODE(st.st_mode))
        os.chmod(path, 0o700)


def bind_unix(path: str, mode: int = 0o666, *, private: bool = False) -> socket.socket:
    """Bind and listen on `path`; any local user may connect (the peer's credentials decide).
    `private`: its directory is a per-user fallback (config.private_socket_dirs), see private_dir."""
    if private:
        private_dir(os.path.dirname(path) or ".")
    else:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is not None:
        if not stat.S_ISSOCK(st.st_mode):
            raise SocketInUse(f"{path} exists and is not a socket; remove it or choose --socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.settimeout(0.5)
            probe.connect(path)
        except OSError as exc:
            if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
                raise
            os.unlink(path)      # stale: its daemon is gone
        else:
            raise SocketInUse(f"{path} is in use by a running daemon")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        os.chmod(path, mode)
        sock.listen(max(1024, socket.SOMAXCONN))     # a connect flood queues instead of refusing hooks
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end, from the kernel."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", raw)


def _proc_owner_and_ancestry(pid: int) -> tuple[int, list[int]] | None:
    """(real uid, ancestor pids) of `pid` from /proc, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        uid = int(fields["Uid"].split()[0])
        ancestors, ppid, seen = [], int(fields["PPid"].strip()), 0
        while ppid > 0 and seen < 128:
            ancestors.append(ppid)
            with open(f"/proc/{ppid}/status", encoding="ascii", errors="replace") as f:
                ppid = next(int(line.split(":", 1)[1]) for line in f if line.startswith("PPid:"))
            seen += 1
        return uid, ancestors
    except (OSError, ValueError, KeyError, StopIteration):
        return None


def _start_ticks(pid: int) -> int | None:
    """When `pid` started, in clock ticks after boot (/proc/PID/stat field 22); None if gone. With
    the pid it names one process: a pid number alone may be a recycled one."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
        return int(raw[raw.rindex(b")") + 2:].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _fit_status_reply(jobs: list[dict[str, Any]]) -> dict[str, Any]:
    """A status_reply within MAX_MESSAGE_BYTES: with many jobs on the node the list is cut (and
    `truncated` set) rather than the asker rejected as `oversized` for the daemon's own reply."""
    msg: dict[str, Any] = {"type": "status_reply", "jobs": jobs}
    while True:
        try:
            protocol.encode(msg)
            return msg
        except ProtocolError:
            jobs = jobs[:len(jobs) * 3 // 4]
            msg = {"type": "status_reply", "jobs": jobs, "truncated": True}


@dataclass
class Conn:
    id: int
    sock: socket.socket
    pid: int
    uid: int
    buf: bytearray = field(default_factory=bytearray)
    out: bytearray = field(default_factory=bytearray)
    job: HookJob | None = None
    tokens: float = 0.0
    refill_at: float = 0.0
    closing: bool = False
    peer_start: int | None = None        # the peer process's start time (clock ticks after boot)


class HookServer:
    def __init__(self, path: str, registry: HookRegistry, *, allowed_uids: Iterable[int] = (),
                 report_interval: float = 1.0, max_connections: int = 256, max_per_uid: int = 32,
                 rate_per_second: float = 50.0, burst: float = 200.0,
                 status_provider: Callable[[int], list[dict[str, Any]]] | None = None,
                 private_dir: bool = False) -> None:
        self.path = path
        self.registry = registry
        self.allowed_uids = set(allowed_uids)
        self.report_interval = report_interval
        self.max_connections = max_connections
        self.max_per_uid = max_per_uid
        self.rate, self.burst = rate_per_second, burst
        self.status_provider = status_provider
        self.rejected: Counter[str] = Counter()
        self._logged_reasons: set[str] = set()
        self._sock = bind_unix(path, private=private_dir)
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._conns: dict[int, Conn] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()      # guards _conns' outboxes against other threads' send()
        self._stop = threading.Event()
        self._recheck_uids = False
        self._accept_gate = AcceptGate(path, log)
        self._accept_paused = False
        self._thread = threading.Thread(target=self._serve, name="looptune-socket", daemon=True)

    # ---- public, thread-safe ----

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake()
        self._thread.join(1.0)
        for c in list(self._conns.values()):
            self._close(c)
        self._sel.close()
        self._sock.close()
        self._wake_r.close()
        self._wake_w.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def send_decision(self, job: HookJob, decision: dict[str, Any]) -> bool:
        """Queue a decision on the job's own connection; False if it is not connected."""
        with self._lock:
            conn = self._conns.get(job.conn_id) if job.conn_id is not None else None
            if conn is None or conn.job is not job:
                return False
            conn.out += protocol.encode({"type": "decision", **decision})
        self.registry.record_decision(job, decision)
        self._wake()
        return True

    def connections(self) -> int:
        return len(self._conns)

    def set_allowed_uids(self, uids: Iterable[int]) -> None:
        """A reload changed daemon.allowed_uids: connections of a uid no longer allowed are closed
        (in the server's thread, at its next turn), not only new ones refused."""
        self.allowed_uids = set(uids)
        self._recheck_uids = True
        self._wake()

    # ---- the loop ----

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except (BlockingIOError, OSError):
            pass

    def _serve(self) -> None:
        self._sel.register(self._sock, selectors.EVENT_READ, "listen")
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        while not self._stop.is_set():
            try:
                self._turn()
            except Exception:  # noqa: BLE001 - the server outlives any bug a client can trigger
                log.exception("socket loop error; continuing")
                time.sleep(0.05)

    def _turn(self) -> None:
        if self._recheck_uids:
            self._recheck_uids = False
            for c in list(self._conns.values()):
                if self.allowed_uids and c.uid not in self.allowed_uids:
                    self._reject(c, "uid_denied", f"uid {c.uid} may no longer connect (daemon.allowed_uids)")
        timeout = 0.5
        if self._accept_paused:
            wait = self._accept_gate.resume_at - time.monotonic()
            if wait <= 0:
                self._sel.register(self._sock, selectors.EVENT_READ, "listen")
                self._accept_paused = False
            else:
                timeout = min(timeout, wait)
        with self._lock:
            for c in self._conns.values():
                want = selectors.EVENT_READ | (selectors.EVENT_WRITE if c.out else 0)
                if self._sel.get_key(c.sock).events != want:
                    self._sel.modify(c.sock, want, c)
        for key, events in self._sel.select(timeout=timeout):
            if key.data == "listen":
                self._accept()
            elif key.data == "wake":
                try:
                    while self._wake_r.recv(4096):
                        pass
                except (BlockingIOError, OSError):
                    pass
            else:
                conn: Conn = key.data
                if events & selectors.EVENT_READ and conn.id in self._conns:
                    self._read(conn)
                if events & selectors.EVENT_WRITE and conn.id in self._conns:
                    self._flush(conn)
        self.registry.expire()

    def _accept(self) -> None:
        # everything queued, not one per turn: a flood must not starve the hooks behind it
        for _ in range(4096):
            try:
                sock, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in TRANSIENT:
                    continue
                # out of descriptors or memory: the socket stays readable, so stop watching it for a while
                self._accept_gate.failed(exc)
                self._sel.unregister(self._sock)
                self._accept_paused = True
                return
            self._accept_gate.succeeded()
            self._admit(sock)

    def _admit(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        try:
            pid, uid, _gid = peer_credentials(sock)
        except OSError:
            sock.close()
            return
        conn = Conn(next(self._ids), sock, pid, uid, tokens=self.burst, refill_at=time.monotonic(),
                    peer_start=_start_ticks(pid))
        with self._lock:
            self._conns[conn.id] = conn
        self._sel.register(sock, selectors.EVENT_READ, conn)
        if self.allowed_uids and uid not in self.allowed_uids:
            self._reject(conn, "uid_denied", f"uid {uid} may not connect (daemon.allowed_uids)")
        elif len(self._conns) > self.max_connections or \
                sum(1 for c in self._conns.values() if c.uid == uid) > self.max_per_uid:
            self._reject(conn, "too_many_connections", "connection limit reached")

    def _read(self, conn: Conn) -> None:
        try:
            data = conn.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._close(conn)
            return
        conn.buf += data
        while conn.id in self._conns and not conn.closing:
            nl = conn.buf.find(b"\n")
            if nl < 0:
                if len(conn.buf) >= protocol.MAX_MESSAGE_BYTES:
                    self._reject(conn, "oversized", f"no newline within {protocol.MAX_MESSAGE_BYTES} bytes")
                return
            line = bytes(conn.buf[:nl])
            del conn.buf[:nl + 1]
            try:
                self._handle(conn, line)
            except ProtocolError as exc:
                self._reject(conn, exc.reason, exc.detail)
            except Exception:  # noqa: BLE001 - a bug reached by client input: drop this client, not the loop
                log.exception("unexpected error handling a message from pid %d uid %d", conn.pid, conn.uid)
                self._reject(conn, "invalid", "message could not be processed")

    def _take_token(self, conn: Conn) -> bool:
        now = time.monotonic()
        conn.tokens = min(self.burst, conn.tokens + (now - conn.refill_at) * self.rate)
        conn.refill_at = now
        if conn.tokens < 1:
            return False
        conn.tokens -= 1
        return True

    def _handle(self, conn: Conn, line: bytes) -> None:
        if not self._take_token(conn):
            raise ProtocolError("rate_limited", f"more than {self.rate:g} messages/s")
        msg = protocol.decode(line)
        kind = msg["type"]
        if kind == "hello":
            if conn.job is not None:
                raise ProtocolError("invalid", "hello sent twice")
            hello = protocol.check_hello(msg)
            self._check_pid(conn, hello["pid"])
            conn.job = self.registry.register(conn.id, conn.uid, hello)
            self._send(conn, {"type": "welcome", "report_interval_seconds": self.report_interval})
            log.info("job %s rank %d registered (pid %d, uid %d)", hello["run"], hello["rank"], hello["pid"],
                     conn.uid)
        elif kind == "status":
            jobs = self.status_provider(conn.uid) if self.status_provider else []
            self._send(conn, _fit_status_reply(jobs))
        elif conn.job is None:
            raise ProtocolError("not_registered", f"{kind} before hello")
        elif kind == "report":
            if "pid" in msg and msg["pid"] != conn.job.pid:
                raise ProtocolError("pid_mismatch", "report pid differs from the registered one")
            self.registry.report(conn.job, protocol.check_report(msg))
        elif kind == "applied":
            self.registry.decision_outcome(conn.job, protocol.check_applied(msg))
        elif kind == "bye":
            self._close(conn)

    def _check_pid(self, conn: Conn, pid: int) -> None:
        """The job's pid must be the peer itself or its descendant, owned by the same uid; the peer
        must still be the process that connected (its start time unchanged), or its pid number may
        belong to someone else's process by now."""
        if conn.peer_start is None or _start_ticks(conn.pid) != conn.peer_start:
            raise ProtocolError("pid_mismatch", f"the process that connected (pid {conn.pid}) is gone")
        if pid == conn.pid:
            return
        found = _proc_owner_and_ancestry(pid)
        if found is None or found[0] != conn.uid or conn.pid not in found[1]:
            raise ProtocolError("pid_mismatch", f"pid {pid} is not the peer's process (peer pid {conn.pid})")

    def _send(self, conn: Conn, msg: dict[str, Any]) -> None:
        with self._lock:
            conn.out += protocol.encode(msg)
            too_big = len(conn.out) > MAX_OUTBOX_BYTES
        if too_big:
            self._reject(conn, "slow_consumer", "client does not read its replies")
            return
        self._flush(conn)

    def _flush(self, conn: Conn) -> None:
        with self._lock:
            if not conn.out:
                return
            try:
                n = conn.sock.send(conn.out)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                n = -1
            if n >= 0:
                del conn.out[:n]
        if n < 0:
            self._close(conn)

    def _reject(self, conn: Conn, reason: str, detail: str) -> None:
        self.rejected[reason] += 1
        level = logging.WARNING if reason not in self._logged_reasons else logging.DEBUG
        self._logged_reasons.add(reason)
        log.log(level, "rejected message from pid %d uid %d: %s: %s", conn.pid, conn.uid, reason, detail)
        conn.closing = True
        try:
            conn.sock.send(protocol.encode({"type": "error", "reason": reason, "detail": detail[:200]}))
        except (OSError, ProtocolError):
            pass
        self._close(conn)

    def _close(self, conn: Conn) -> None:
        with self._lock:
            if self._conns.pop(conn.id, None) is None:
                return
        try:
            self._sel.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        conn.sock.close()
        if conn.job is not None:
            self.registry.disconnect(conn.job)
            log.info("job %s rank %d disconnected", conn.job.run, conn.job.rank)
