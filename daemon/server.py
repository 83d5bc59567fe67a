"""The Unix socket the training hooks talk to.

Binding is careful: a socket file left by a dead daemon is replaced, but one that still
answers belongs to a running daemon and is left alone (start-up fails with a clear error).
"""
from __future__ import annotations

import errno
import logging
import os
import selectors
import socket
import stat
import threading
from typing import Callable

log = logging.getLogger("looptune.server")


class SocketInUse(Exception):
    pass


def bind_unix(path: str, mode: int = 0o666) -> socket.socket:
    """Bind and listen on `path`; any local user may connect (the peer's credentials decide)."""
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
        sock.listen(64)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


class SocketServer:
    """Accepts hook connections in one thread; `handler(conn)` takes each accepted connection."""

    def __init__(self, path: str, handler: Callable[[socket.socket], None] | None = None) -> None:
        self.path = path
        self._handler = handler
        self._sock = bind_unix(path)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="looptune-socket", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _serve(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self._sock, selectors.EVENT_READ)
        while not self._stop.is_set():
            for _ in sel.select(timeout=0.2):
                try:
                    conn, _addr = self._sock.accept()
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError as exc:
                    log.warning("accept on %s failed: %s", self.path, exc)
                    continue
                if self._handler is None:
                    conn.close()
                else:
                    self._handler(conn)
        sel.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(1.0)
        self._sock.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
