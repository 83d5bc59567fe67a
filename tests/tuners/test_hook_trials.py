"""A trial the daemon cannot finish: the hook rolls it back itself when it loses the daemon before
the outcome (a daemon restart once left the trial's value in place for good); a kept trial stays.
The "daemon" here is a few lines of socket server in the test (same uid: trusted), so the test
controls exactly what it sends and when it goes away. Also: a decision that arrives in the same
read as the welcome is applied without waiting for more data."""
from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable

import pytest
from torch.utils.data import DataLoader

from looptune import Hook


def line(msg: dict[str, Any]) -> bytes:
    return json.dumps({"v": 1, **msg}).encode() + b"\n"


class FakeDaemon:
    """Accepts one hook, sends `script(conn)` and closes when told to."""

    def __init__(self, path: Path, script: Callable[[socket.socket], None]) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(4)
        self.received: list[dict[str, Any]] = []
        self.done = threading.Event()
        self._script = script
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        conn, _ = self.sock.accept()
        self.sock.close()            # one connection only: the hook's retries find nobody
        conn.settimeout(10)
        f = conn.makefile("rb")
        self.received.append(json.loads(f.readline()))          # hello
        self._script(conn)
        deadline = time.monotonic() + 10
        while not self.done.is_set() and time.monotonic() < deadline:
            raw = f.readline()
            if not raw:
                break
            msg = json.loads(raw)
            self.received.append(msg)
            if msg["type"] == "applied" and msg["id"] == 99:
                break
        conn.close()
        self.done.set()


def run_steps(hook: Hook, loader: Any, until: Callable[[], bool], limit: float = 15.0) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        for _ in loader:
            hook.step()
            time.sleep(0.01)
            if until():
                return
    raise AssertionError("timed out")


@pytest.mark.parametrize("kept", [False, True], ids=["cut off: rolled back", "kept: stays"])
def test_a_trial_cut_off_by_the_daemon_going_away_is_rolled_back(short_tmp: Path, kept: bool) -> None:
    path = short_tmp / "fake.sock"

    def script(conn: socket.socket) -> None:
        # the welcome and the trial in one write: applied without waiting for more data
        conn.sendall(line({"type": "welcome", "report_interval_seconds": 0.1}) +
                     line({"type": "decision", "id": 98 if kept else 99, "knob": "num_workers", "value": 2,
                           "reason": "trial", "tuner": "workers", "trial": True}))
        if kept:
            conn.sendall(line({"type": "decision", "id": 99, "knob": "num_workers", "value": 2,
                               "reason": "kept: +50% samples/s", "tuner": "workers"}))

    daemon = FakeDaemon(path, script)
    hook = Hook(run="cut-off", socket=str(path), config={"hook": {"reconnect_max_seconds": 0.2}})
    try:
        assert hook.mode == "daemon"
        loader = hook.watch(DataLoader(list(range(64)), batch_size=4))
        run_steps(hook, loader, lambda: daemon.done.is_set() and hook.mode == "embedded")
        run_steps(hook, loader, lambda: len(hook.decisions) >= (2 if kept else 2))
        outcomes = [(d.new, d.reason.split(":")[0], d.outcome) for d in hook.decisions]
        if kept:
            assert outcomes == [(2, "trial", "applied"), (2, "kept", "applied")], outcomes
            time.sleep(0.3)
            for _ in loader:
                hook.step()
            assert hook.knobs["num_workers"] == 2 and len(hook.decisions) == 2
        else:
            assert outcomes == [(2, "trial", "applied"), (0, "roll back", "applied")], outcomes
            assert "went away mid-trial" in hook.decisions[1].reason
            assert hook.knobs["num_workers"] == 0
        acks = [m for m in daemon.received if m["type"] == "applied"]
        assert acks and acks[0]["outcome"] == "applied"
    finally:
        hook.close()
