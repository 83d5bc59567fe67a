"""Run `python -m daemon daemon` as a real subprocess in tests, and read its /metrics.

Every wait here is bounded, and `DaemonPool.close()` (used by the `daemons` fixture in
tests/conftest.py) terminates, then kills, every process it started, so a failing test never
leaves a daemon behind.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import yaml
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[2]

# variables of the test runner's own environment that would change what the daemon does
_SCRUB = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LOOPTUNE_CONFIG", "RUNTIME_DIRECTORY",
          "INVOCATION_ID", "LISTEN_FDS", "LISTEN_PID")

# loopback only, never through a proxy from the environment
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    """(status, body) of a GET; raises OSError when nothing answers."""
    try:
        with _OPENER.open(url, timeout=timeout) as resp:
            return resp.status, resp.read().decode("utf-8")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode("utf-8", "replace")


def write_config(path: Path, data: Mapping[str, Any] | None) -> Path:
    """Write a config file; None or {} writes an empty file (all defaults)."""
    path.write_text(yaml.safe_dump(dict(data), sort_keys=False) if data else "", encoding="utf-8")
    return path


class Metrics:
    """One parsed scrape: sample name (with its _total suffix) -> [(labels, value)]."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.samples: dict[str, list[tuple[dict[str, str], float]]] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                self.samples.setdefault(s.name, []).append((dict(s.labels), s.value))

    def find(self, name: str, **labels: str) -> list[float]:
        return [v for lv, v in self.samples.get(name, []) if all(lv.get(k) == w for k, w in labels.items())]

    def get(self, name: str, **labels: str) -> float | None:
        """The value of the one matching sample; None if absent; an error if several match."""
        found = self.find(name, **labels)
        assert len(found) <= 1, f"{name}{labels} matches {len(found)} samples"
        return found[0] if found else None

    def __contains__(self, name: str) -> bool:
        return name in self.samples


class DaemonProc:
    """One daemon subprocess. `start()` launches it; `wait_ready()` waits until /metrics answers."""

    _seq = 0

    def __init__(self, workdir: Path, config: Path | None = None, *, port: int | None = None,
                 socket_path: Path | None = None, env: Mapping[str, str] | None = None,
                 args: Sequence[str] = ()) -> None:
        DaemonProc._seq += 1
        n = DaemonProc._seq
        self.workdir = Path(workdir)
        self.config = config if config is not None else write_config(self.workdir / f"empty-{n}.yaml", None)
        self.port = port if port is not None else free_port()
        self.socket_path = socket_path if socket_path is not None else self.workdir / f"d{n}.sock"
        self.extra_env = dict(env or {})
        self.args = list(args)
        self.stderr_path = self.workdir / f"daemon-{n}.stderr"
        self.stdout_path = self.workdir / f"daemon-{n}.stdout"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/metrics"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def command(self) -> list[str]:
        return [sys.executable, "-m", "looptune", "daemon", "--config", str(self.config),
                "--listen", f"127.0.0.1:{self.port}", "--socket", str(self.socket_path), *self.args]

    def start(self) -> DaemonProc:
        env = {k: v for k, v in os.environ.items() if k not in _SCRUB}
        env["PYTHONUNBUFFERED"] = "1"
        env.update(self.extra_env)
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            # own session: a ^C at the test terminal does not reach it; signals go to this pid only
            self.proc = subprocess.Popen(self.command(), cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                                         stdout=out, stderr=err, start_new_session=True)
        return self

    # ---- output ----

    @property
    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def _describe(self) -> str:
        rc = self.proc.poll() if self.proc is not None else None
        return f"daemon pid {self.proc.pid if self.proc else '-'} (exit status {rc}); stderr:\n{self.stderr}"

    # ---- waiting ----

    def wait_ready(self, timeout: float = 15.0) -> DaemonProc:
        """Wait until /metrics answers with the daemon's own metrics; fail if the process exits."""
        assert self.proc is not None, "start() first"
        deadline = time.monotonic() + timeout
        last: BaseException | None = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited before serving /metrics: {self._describe()}")
            try:
                status, body = http_get(self.url, timeout=2.0)
                if status == 200 and "looptune_build_info" in body:
                    return self
                last = AssertionError(f"HTTP {status}")
            except OSError as exc:
                last = exc
            time.sleep(0.05)
        raise AssertionError(f"/metrics did not answer within {timeout}s ({last!r}): {self._describe()}")

    def wait_until(self, predicate: Callable[[Metrics], bool], what: str, timeout: float = 10.0,
                   every: float = 0.1) -> Metrics:
        """Scrape until `predicate(metrics)` holds; fail naming `what` after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        m = self.metrics()
        while not predicate(m):
            if time.monotonic() >= deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}; last scrape:\n"
                                     f"{_own_lines(m.text)}\n{self._describe()}")
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"daemon exited while waiting for {what}: {self._describe()}")
            time.sleep(every)
            m = self.metrics()
        return m

    def wait_exit(self, timeout: float) -> int:
        """Exit status, or AssertionError if still running after `timeout` seconds."""
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"daemon still running {timeout}s later: {self._describe()}") from None

    # ---- talking to it ----

    def scrape(self, timeout: float = 5.0) -> str:
        status, body = http_get(self.url, timeout)
        assert status == 200, f"/metrics answered HTTP {status}: {body[:500]}"
        return body

    def metrics(self) -> Metrics:
        return Metrics(self.scrape())

    def send(self, sig: int) -> None:
        assert self.proc is not None and self.proc.poll() is None, self._describe()
        os.kill(self.proc.pid, sig)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 5.0) -> int:
        """Signal and wait (bounded); returns the exit status."""
        if self.running():
            self.send(sig)
        return self.wait_exit(timeout)

    def close(self) -> None:
        """Make sure the process is gone: SIGTERM, then SIGKILL; never raises."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                self.proc.terminate()
                self.proc.wait(3)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                try:
                    self.proc.wait(3)
                except subprocess.TimeoutExpired:
                    pass
            except ProcessLookupError:
                pass


def _own_lines(text: str) -> str:
    return "\n".join(line for line in text.splitlines() if line.startswith("looptune_") and
                     not line.startswith("looptune_daemon_process"))


class DaemonPool:
    """Starts daemons in one work directory and stops them all on close()."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir)
        self.procs: list[DaemonProc] = []

    def start(self, config: Path | Mapping[str, Any] | None = None, **kwargs: Any) -> DaemonProc:
        """Start a daemon; `config` is a path, or a mapping written to a fresh file."""
        if config is not None and not isinstance(config, Path):
            config = write_config(self.workdir / f"config-{len(self.procs) + 1}.yaml", config)
        d = DaemonProc(self.workdir, config, **kwargs)
        self.procs.append(d)
        return d.start()

    def close(self) -> None:
        for d in self.procs:
            d.close()
