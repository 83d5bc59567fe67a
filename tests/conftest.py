"""Shared test helpers: the repo on sys.path, free loopback ports, real servers when installed."""
from __future__ import annotations

import os
import shutil
import socket
import sys
from pathlib import Path

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
