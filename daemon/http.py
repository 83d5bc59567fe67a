"""The /metrics endpoint, with the exposition text cached per sample generation.

Formatting is most of a scrape's cost (prometheus_client spends ~10 µs per line). Samples
change once an interval while scrapes come every few seconds, so the text is rendered once
per change of the samplers' snapshots and served from memory, gzip included. The main loop
renders each new generation ahead (`prerender`) only around the time the next scrape is
expected (within `ahead_seconds` of one of the last few gaps between scrapes after the last
one), so a regular scraper finds it ready while the generations in between (several a second,
a scrape every 15 s or so) are not rendered for nobody; a scrape off that rhythm renders on
demand. With no scraper for `idle_seconds` nothing is rendered at all.

The server (`MetricsServer`) is our own, because the endpoint faces the network: one thread
multiplexes every connection with a selector and a small fixed pool of workers runs the WSGI
app, so an idle client costs a file descriptor and a few hundred bytes, never a thread. A client
must finish its TLS handshake and its request head within `request_timeout` seconds of
connecting (slow or silent ones, slowloris included, are dropped), and read its answer within
`write_timeout`. At most `max_connections` are open at once; at the bound the oldest connection
still waiting for its request is dropped, so a scraper that sends its request at once always
gets a place. The TLS context is prometheus_client's (`_get_ssl_ctx`, daemon.tls), applied to
each accepted connection without blocking.
"""
from __future__ import annotations

import errno
import gzip
import io
import logging
import queue
import resource
import selectors
import socket
import ssl
import sys
import threading
import time
from collections import deque
from email.utils import formatdate
from typing import Any, Callable, Hashable, Iterable
from urllib.parse import parse_qs, unquote

from prometheus_client import exposition

from looptune.daemon.accept import TRANSIENT, AcceptGate

log = logging.getLogger("looptune.http")

REQUEST_TIMEOUT_SECONDS = 5.0     # connect -> TLS handshake and request head complete
WRITE_TIMEOUT_SECONDS = 10.0      # the answer written (Prometheus' default scrape_timeout)
RENDER_AHEAD_SECONDS = 1.0       # render ahead this close to a scrape expected from the recent gaps
MAX_CONNECTIONS = 1024            # open at once; fewer where the file limit is low (connection_limit)
WORKERS = 2                       # threads running the WSGI app; rendering is cached, so few suffice
MAX_HEAD_BYTES = 16 * 1024        # request line and headers
_RESERVED_FDS = 128               # descriptors kept for the hook socket, /proc reads, NVML, logs


class CachedMetricsApp:
    def __init__(self, registry: Any, generation: Callable[[], Hashable], idle_seconds: float = 120.0) -> None:
        self.registry = registry
        self.generation = generation
        self.idle_seconds = idle_seconds
        self._live = exposition.make_wsgi_app(registry)   # OPTIONS, name[] filters, anything unusual
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[Hashable, bytes, bytes | None]] = {}   # content type -> (gen, text, gzip)
        self._encoders: dict[str, Callable[[Any], bytes]] = {}
        self.last_scrape = 0.0
        self.ahead_seconds = RENDER_AHEAD_SECONDS
        self._gaps: deque[float] = deque(maxlen=4)   # seconds between recent scrapes (scrapers' rhythm)
        self.renders = 0
        self._logged_failure = False

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        if environ.get("REQUEST_METHOD") != "GET" or environ.get("PATH_INFO") == "/favicon.ico" or \
                "name[]" in parse_qs(environ.get("QUERY_STRING", "")):
            return self._live(environ, start_response)
        encoder, ctype = exposition.choose_encoder(environ.get("HTTP_ACCEPT"))
        want_gzip = exposition.gzip_accepted(environ.get("HTTP_ACCEPT_ENCODING"))
        now = time.monotonic()
        with self._lock:
            if self.last_scrape:
                self._gaps.append(now - self.last_scrape)
            self.last_scrape = now
        try:
            text, gz = self._get(ctype, encoder, want_gzip)
        except Exception:  # noqa: BLE001 - one bad render costs this scrape, never the server
            if not self._logged_failure:
                self._logged_failure = True
                log.exception("rendering /metrics failed (logged once)")
            start_response("500 Internal Server Error", [("Content-Type", "text/plain; charset=utf-8")])
            return [b"looptune: rendering /metrics failed; see the daemon's log\n"]
        headers = [("Content-Type", ctype)]
        if want_gzip:
            headers.append(("Content-Encoding", "gzip"))
        start_response("200 OK", headers)
        return [gz if want_gzip and gz is not None else text]

    def _get(self, ctype: str, encoder: Callable[[Any], bytes], want_gzip: bool) -> tuple[bytes, bytes | None]:
        gen = self.generation()
        with self._lock:
            self._encoders[ctype] = encoder
            hit = self._cache.get(ctype)
            if hit is not None and hit[0] == gen and (hit[2] is not None or not want_gzip):
                return hit[1], hit[2]
            text = hit[1] if hit is not None and hit[0] == gen else encoder(self.registry)
            gz = gzip.compress(text, compresslevel=5) if want_gzip else None
            self._cache[ctype] = (gen, text, gz)
            self.renders += 1
            return text, gz

    def prerender(self) -> None:
        """Render the formats scrapers asked for when the snapshots changed (main loop)."""
        since = time.monotonic() - self.last_scrape
        if since > self.idle_seconds:
            return
        # only near an expected scrape: a render costs ~0.3 ms per job, and generations change
        # several times a second
        with self._lock:
            gaps = tuple(self._gaps) or (0.0,)
        if not any(abs(since - gap) <= self.ahead_seconds for gap in gaps):
            return
        gen = self.generation()
        with self._lock:
            todo = [(c, e, self._cache[c][2] is not None) for c, e in self._encoders.items()
                    if c in self._cache and self._cache[c][0] != gen]
        for ctype, encoder, gz in todo:
            self._get(ctype, encoder, gz)



class ListenError(Exception):
    """/metrics cannot listen where configured: one line naming the address and the setting."""

    def __init__(self, host: str, port: int, exc: OSError) -> None:
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        if exc.errno == errno.EADDRINUSE:
            why = "is in use (another looptune daemon or another program listens there)"
        elif exc.errno == errno.EADDRNOTAVAIL:
            why = "is not an address of this host"
        elif exc.errno == errno.EACCES:
            why = "needs privileges (ports below 1024 are root's)"
        else:
            why = f"cannot be listened on ({exc.strerror or exc})"
        super().__init__(f"the /metrics address {where} {why}; choose another with --listen HOST:PORT "
                         f"or daemon.listen in the config")
        self.errno = exc.errno


def connection_limit(limit: int = MAX_CONNECTIONS) -> int:
    """At most `limit`, and no more than half the descriptors the process may open beyond a reserve."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return limit
    return max(8, min(limit, (soft - _RESERVED_FDS) // 2))


def raise_nofile_limit(want: int = 65536) -> int:
    """Raise the soft RLIMIT_NOFILE towards the hard one (at most `want`); returns the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(hard, want)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (OSError, ValueError):
            pass
    return soft


def _best_family(host: str, port: int) -> tuple[int, str]:
    try:
        from prometheus_client.exposition import _get_best_family
    except ImportError:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, _, _, _, sockaddr = infos[0]
        return family, sockaddr[0]
    return _get_best_family(host, port)


def ssl_context(tls: Any) -> ssl.SSLContext | None:
    """The server context for daemon.tls (prometheus_client's helper), or None for plain HTTP."""
    if not (tls.cert_file and tls.key_file):
        return None
    try:
        from prometheus_client.exposition import _get_ssl_ctx
    except ImportError:    # prometheus_client reorganised: the same settings by hand
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        if tls.client_ca_file:
            ctx.load_verify_locations(tls.client_ca_file)
        if tls.client_auth_required:
            ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_cert_chain(tls.cert_file, tls.key_file)
        return ctx
    return _get_ssl_ctx(tls.cert_file, tls.key_file, ssl.PROTOCOL_TLS_SERVER, tls.client_ca_file or None, None,
                        tls.client_auth_required)


_HANDSHAKE, _HEAD, _BUSY, _WRITE = "handshake", "head", "busy", "write"


class _Conn:
    __slots__ = ("sock", "peer", "state", "deadline", "buf", "out", "events")

    def __init__(self, sock: socket.socket, peer: Any, state: str, deadline: float) -> None:
        self.sock = sock
        self.peer = peer
        self.state = state
        self.deadline = deadline
        self.buf = bytearray()
        self.out = b""
        self.events = 0


def _simple_response(status: str, text: str) -> bytes:
    body = text.encode()
    return (f"HTTP/1.1 {status}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {len(body)}\r\n"
            f"Connection: close\r\n\r\n").encode("latin-1") + body


class MetricsServer:
    """The /metrics HTTP(S) server: one selector thread for all I/O, `workers` threads for the app.

    `shutdown()` stops serving and `server_close()` closes every socket, like socketserver's."""

    def __init__(self, host: str, port: int, app: Callable[..., Iterable[bytes]], *,
                 context: ssl.SSLContext | None = None, max_connections: int | None = None,
                 workers: int = WORKERS, request_timeout: float = REQUEST_TIMEOUT_SECONDS,
                 write_timeout: float = WRITE_TIMEOUT_SECONDS) -> None:
        self.app = app
        self.context = context
        self.max_connections = max_connections if max_connections is not None else connection_limit()
        self.request_timeout = request_timeout
        self.write_timeout = write_timeout
        try:
            family, addr = _best_family(host, port)
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError as exc:
            raise ListenError(host, port, exc) from None
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((addr, port))
            sock.listen(128)
        except OSError as exc:
            sock.close()
            raise ListenError(host, port, exc) from None
        sock.setblocking(False)
        self.socket = sock
        self.server_address = sock.getsockname()
        self.scheme = "https" if context is not None else "http"
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._conns: dict[int, _Conn] = {}          # fd -> connection, in the order accepted
        self._jobs: queue.SimpleQueue[tuple[_Conn, dict[str, Any]] | None] = queue.SimpleQueue()
        self._done: queue.SimpleQueue[tuple[_Conn, bytes]] = queue.SimpleQueue()
        self._gate = AcceptGate(f"{host}:{port} (/metrics)", log)
        self._accepting = False
        self._stop = threading.Event()
        self._closed = False
        self._logged_app_error = False
        self._thread = threading.Thread(target=self.serve_forever, name="looptune-http", daemon=True)
        self._workers = [threading.Thread(target=self._work, name=f"looptune-http-{i}", daemon=True)
                         for i in range(workers)]

    # ---- public ----

    def start(self) -> None:
        for w in self._workers:
            w.start()
        self._thread.start()

    def connection_count(self) -> int:
        return len(self._conns)

    def shutdown(self) -> None:
        self._stop.set()
        self._wake()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(2.0)

    def server_close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        for _ in self._workers:
            self._jobs.put(None)
        for conn in list(self._conns.values()):
            self._close(conn)
        for s in (self.socket, self._wake_r, self._wake_w):
            s.close()
        self._sel.close()

    # ---- the loop ----

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass

    def serve_forever(self) -> None:
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._listen(True)
        next_sweep = 0.0
        while not self._stop.is_set():
            try:
                timeout = 0.25
                if not self._accepting and len(self._conns) < self.max_connections:
                    wait = self._gate.resume_at - time.monotonic()
                    if wait <= 0:
                        self._listen(True)
                    else:
                        timeout = min(timeout, wait)
                for key, events in self._sel.select(timeout):
                    if key.data is None:
                        self._drain_wake()
                    elif key.data == "listen":
                        self._accept()
                    else:
                        self._io(key.data, events)
                self._finish_done()
                now = time.monotonic()
                if now >= next_sweep:
                    next_sweep = now + 0.25
                    for conn in [c for c in self._conns.values() if c.state != _BUSY and c.deadline <= now]:
                        self._close(conn)
            except Exception:  # noqa: BLE001 - nothing a client does may stop the endpoint
                log.exception("/metrics server loop error; continuing")
                time.sleep(0.05)

    def _listen(self, on: bool) -> None:
        if on and not self._accepting:
            self._sel.register(self.socket, selectors.EVENT_READ, "listen")
        elif not on and self._accepting:
            self._sel.unregister(self.socket)
        self._accepting = on

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except OSError:
            pass

    def _accept(self) -> None:
        for _ in range(64):        # a burst at a time, then the other sockets get a turn
            if len(self._conns) >= self.max_connections and not self._evict_one():
                self._listen(False)      # every slot is answering a request: the rest wait in the backlog
                return
            try:
                sock, peer = self.socket.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in TRANSIENT:
                    continue
                self._gate.failed(exc)
                self._listen(False)
                return
            self._gate.succeeded()
            sock.setblocking(False)
            deadline = time.monotonic() + self.request_timeout
            if self.context is not None:
                try:
                    sock = self.context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
                except (OSError, ValueError):
                    sock.close()
                    continue
                conn = _Conn(sock, peer, _HANDSHAKE, deadline)
            else:
                conn = _Conn(sock, peer, _HEAD, deadline)
            self._conns[sock.fileno()] = conn
            self._want(conn, selectors.EVENT_READ)

    def _evict_one(self) -> bool:
        """Close the oldest connection that has not sent its whole request yet."""
        for conn in self._conns.values():
            if conn.state in (_HANDSHAKE, _HEAD):
                self._close(conn)
                return True
        return False

    def _want(self, conn: _Conn, events: int) -> None:
        if events == conn.events:
            return
        if conn.events and events:
            self._sel.modify(conn.sock, events, conn)
        elif events:
            self._sel.register(conn.sock, events, conn)
        else:
            self._sel.unregister(conn.sock)
        conn.events = events

    def _close(self, conn: _Conn) -> None:
        if self._conns.get(conn.sock.fileno()) is not conn:
            return
        del self._conns[conn.sock.fileno()]
        self._want(conn, 0)
        try:
            conn.sock.close()
        except OSError:
            pass
        if not self._accepting and not self._stop.is_set() and time.monotonic() >= self._gate.resume_at:
            self._listen(True)

    def _io(self, conn: _Conn, events: int) -> None:
        if self._conns.get(conn.sock.fileno()) is not conn:
            return
        try:
            if conn.state == _HANDSHAKE:
                self._handshake(conn)
            elif conn.state == _HEAD:
                self._read(conn)
            elif conn.state == _WRITE:
                self._write(conn)
        except ssl.SSLWantReadError:
            self._want(conn, selectors.EVENT_READ)
        except ssl.SSLWantWriteError:
            self._want(conn, selectors.EVENT_WRITE)
        except (OSError, ValueError):    # reset, TLS alert, bad certificate: this client only
            self._close(conn)

    def _handshake(self, conn: _Conn) -> None:
        conn.sock.do_handshake()         # type: ignore[attr-defined]
        conn.state = _HEAD
        self._want(conn, selectors.EVENT_READ)
        self._read(conn)                 # the request may have come with the handshake's last flight

    def _read(self, conn: _Conn) -> None:
        while True:
            try:
                data = conn.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                return
            if not data:
                self._close(conn)
                return
            conn.buf += data
            end = conn.buf.find(b"\r\n\r\n")
            if (end < 0 and len(conn.buf) > MAX_HEAD_BYTES) or end > MAX_HEAD_BYTES:
                self._respond(conn, _simple_response("431 Request Header Fields Too Large", "request head too large\n"))
                return
            if end >= 0:
                self._dispatch(conn, bytes(conn.buf[:end]), bytes(conn.buf[end + 4:]))
                return
            if not isinstance(conn.sock, ssl.SSLSocket):
                return                   # level-triggered: the selector says when more comes

    def _dispatch(self, conn: _Conn, head: bytes, rest: bytes) -> None:
        environ = self._environ(conn, head, rest)
        if environ is None:
            self._respond(conn, _simple_response("400 Bad Request", "bad request\n"))
            return
        conn.state = _BUSY
        conn.buf = bytearray()
        self._want(conn, 0)
        self._jobs.put((conn, environ))

    def _respond(self, conn: _Conn, data: bytes) -> None:
        conn.state = _WRITE
        conn.out = data
        conn.deadline = time.monotonic() + self.write_timeout
        self._want(conn, selectors.EVENT_WRITE)
        self._write(conn)

    def _write(self, conn: _Conn) -> None:
        while conn.out:
            try:
                n = conn.sock.send(conn.out)
            except (BlockingIOError, InterruptedError):
                return
            conn.out = conn.out[n:]
        self._close(conn)

    def _finish_done(self) -> None:
        while True:
            try:
                conn, data = self._done.get_nowait()
            except queue.Empty:
                return
            if self._conns.get(conn.sock.fileno()) is conn:
                try:
                    self._respond(conn, data)
                except ssl.SSLWantReadError:
                    self._want(conn, selectors.EVENT_READ)
                except ssl.SSLWantWriteError:
                    self._want(conn, selectors.EVENT_WRITE)
                except (OSError, ValueError):
                    self._close(conn)

    def _environ(self, conn: _Conn, head: bytes, rest: bytes) -> dict[str, Any] | None:
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            return None
        method, target, version = parts
        path, _, query = target.partition("?")
        host, port = self.server_address[:2]
        env: dict[str, Any] = {
            "REQUEST_METHOD": method, "SCRIPT_NAME": "", "PATH_INFO": unquote(path, "iso-8859-1"),
            "QUERY_STRING": query, "SERVER_NAME": str(host), "SERVER_PORT": str(port), "SERVER_PROTOCOL": version,
            "REMOTE_ADDR": str(conn.peer[0]) if isinstance(conn.peer, tuple) else "",
            "wsgi.version": (1, 0), "wsgi.url_scheme": self.scheme, "wsgi.input": io.BytesIO(rest),
            "wsgi.errors": sys.stderr, "wsgi.multithread": True, "wsgi.multiprocess": False, "wsgi.run_once": False,
        }
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep or not name or name != name.strip():
                return None
            key = name.upper().replace("-", "_")
            value = value.strip()
            if key in ("CONTENT_TYPE", "CONTENT_LENGTH"):
                env[key] = value
            else:
                key = "HTTP_" + key
                env[key] = f"{env[key]},{value}" if key in env else value
        return env

    # ---- workers ----

    def _work(self) -> None:
        while True:
            item = self._jobs.get()
            if item is None:
                return
            conn, environ = item
            try:
                data = self._call_app(environ)
            except Exception:  # noqa: BLE001 - one failing request, never the server
                if not self._logged_app_error:
                    self._logged_app_error = True
                    log.exception("/metrics request failed (logged once)")
                data = _simple_response("500 Internal Server Error", "internal error\n")
            self._done.put((conn, data))
            self._wake()

    def _call_app(self, environ: dict[str, Any]) -> bytes:
        started: list[Any] = []
        body: list[bytes] = []

        def start_response(status: str, headers: list[tuple[str, str]],
                           exc_info: Any = None) -> Callable[[bytes], None]:
            if exc_info is not None and started:
                raise exc_info[1].with_traceback(exc_info[2])
            started[:] = [status, headers]
            return body.append

        result = self.app(environ, start_response)
        try:
            for chunk in result:
                body.append(chunk)
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()
        status, headers = started
        payload = b"" if environ["REQUEST_METHOD"] == "HEAD" else b"".join(body)
        names = {k.lower() for k, _ in headers}
        lines = [f"HTTP/1.1 {status}", f"Date: {formatdate(usegmt=True)}"]
        lines += [f"{k}: {v}" for k, v in headers if k.lower() != "connection"]
        if "content-length" not in names:
            lines.append(f"Content-Length: {sum(len(b) for b in body)}")
        lines.append("Connection: close")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + payload


def start(host: str, port: int, registry: Any, generation: Callable[[], Hashable], tls: Any, *,
          max_connections: int | None = None, request_timeout: float = REQUEST_TIMEOUT_SECONDS
          ) -> tuple[MetricsServer, CachedMetricsApp]:
    """Serve /metrics; returns (server, app). `tls` is daemon.config.TLS. Raises ListenError when
    the address cannot be listened on."""
    app = CachedMetricsApp(registry, generation)
    server = MetricsServer(host, port, app, context=ssl_context(tls), max_connections=max_connections,
                           request_timeout=request_timeout)
    server.start()
    return server, app
