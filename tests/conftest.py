"""Shared test helpers: the repo on sys.path, free loopback ports, real servers when installed."""
from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def require_binary(name: str, *candidates: str) -> str:
    """Path of a server binary; a skip where it is missing, a failure under CI (.ci/run installs it)."""
    for c in (name, *candidates):
        path = shutil.which(c)
        if path:
            return path
    msg = f"{name} is not installed (apt-get install {name})"
    if os.environ.get("LOOPTUNE_REQUIRE_SERVERS") == "1":
        pytest.fail(msg)
    pytest.skip(msg)


@pytest.fixture
def port() -> int:
    return free_port()


def _daemon_proc() -> Any:
    """tests/daemon/daemon_proc.py, importable as `daemon_proc` from any test directory."""
    mod = sys.modules.get("daemon_proc")
    if mod is None:
        spec = importlib.util.spec_from_file_location("daemon_proc", ROOT / "tests" / "daemon" / "daemon_proc.py")
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        sys.modules["daemon_proc"] = mod
        spec.loader.exec_module(mod)
    return mod


_daemon_proc()


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A temporary directory with a short path, for AF_UNIX sockets (sun_path holds 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="lt-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def daemons(short_tmp: Path) -> Iterator[Any]:
    """`daemons.start(config, ...)` runs `python -m daemon daemon` as a subprocess (see
    tests/daemon/daemon_proc.py); every daemon started is stopped at teardown."""
    pool = _daemon_proc().DaemonPool(short_tmp)
    try:
        yield pool
    finally:
        pool.close()
