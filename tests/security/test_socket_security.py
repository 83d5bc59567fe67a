"""The hook socket under attack, against a real `python -m daemon daemon` subprocess.

A legitimate job (this test process: hello, then a report every 0.1 s) stays connected for the
whole module. Hostile input comes from a second process, the *agent* (AGENT below, stdlib only,
driven over a pipe), that runs as root or drops to uid 65534 ('nobody') itself before it talks
to the daemon. Hypothesis builds the hostile input in this process; the agent sends it. For every
bad message the connection must be answered with one error line and closed, counted under
looptune_messages_rejected_total{reason} with the expected reason, the daemon must stay up, and
the legitimate job's figures must keep advancing, untouched.

Decision routing is checked in-process (daemon.service.Daemon), where a decision can be queued.
"""
from __future__ import annotations

import base64
import json
import os
import re
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from looptune import schema
from looptune.collectors.hookjobs import REJECT_REASONS
from looptune.daemon import config as cfg
from looptune.daemon.service import Daemon
from daemon_proc import DaemonPool, DaemonProc, Metrics, free_port
from looptune import protocol
from looptune.protocol import MAX_MESSAGE_BYTES, STEP_BUCKETS

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a second user (uid 65534)")

NOBODY = 65534
LEGIT_RUN = "legit-job"
NBUCKETS = len(STEP_BUCKETS) + 1
# no tuners: every line a job receives here is one this test caused
CONFIG = {"collectors": {"interval_seconds": 0.2, "host": {"enabled": False}, "jobs": {"enabled": False},
                         "gpu": {"enabled": False}}, "tuners": {"enabled": []}}
REJECTED = "looptune_messages_rejected_total"

FUZZ = settings(deadline=None, database=None, max_examples=40,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                       HealthCheck.data_too_large])

# ---- the second process ----

AGENT = r'''
import base64, json, os, signal, socket, sys, time
path, uid = sys.argv[1], int(sys.argv[2])
if uid >= 0:                      # drop privileges for real: groups, gid, then uid
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
held, children = [], []

def read(s, buf, want, deadline):
    """Lines until `want` of them (None: until EOF) or the deadline; (lines, eof)."""
    lines = []
    while want is None or len(lines) < want:
        nl = buf.find(b"\n")
        if nl >= 0:
            lines.append(bytes(buf[:nl]).decode("utf-8", "replace"))
            del buf[:nl + 1]
            continue
        left = deadline - time.monotonic()
        if left <= 0:
            return lines, False
        s.settimeout(left)
        try:
            chunk = s.recv(65536)
        except socket.timeout:
            return lines, False
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            return lines, True
        buf += chunk
    return lines, False

def session(cmd):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(path)
    buf, lines, eof, send_error = bytearray(), [], False, None
    deadline = time.monotonic() + cmd.get("timeout", 5.0)
    for step in cmd["steps"]:
        if step[0] == "send":
            try:
                s.settimeout(5)
                s.sendall(base64.b64decode(step[1]))
            except OSError as exc:
                send_error = type(exc).__name__
        elif step[0] == "recv":
            got, eof = read(s, buf, step[1], deadline)
            lines += got
    if cmd.get("drain", True) and not eof:
        got, eof = read(s, buf, None, deadline)
        lines += got
    s.close()
    return {"lines": lines, "eof": eof, "send_error": send_error}

def hold(cmd):
    """Open n connections, then ask each for its status: the reply or the error line, per connection."""
    for _ in range(cmd["n"]):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(5)
        s.connect(path)
        held.append(s)
    first = []
    for s in held:
        try:
            s.sendall(b'{"v":1,"type":"status"}\n')
        except OSError:
            pass
        got, _ = read(s, bytearray(), 1, time.monotonic() + 5)
        first.append(got[0] if got else None)
    return {"first": first}

def release(cmd):
    while held:
        held.pop().close()
    return {}

def fork(cmd):
    pid = os.fork()
    if pid == 0:
        time.sleep(120)
        os._exit(0)
    children.append(pid)
    return {"pid": pid}

ops = {"session": session, "hold": hold, "release": release, "fork": fork,
       "whoami": lambda cmd: {"pid": os.getpid(), "uid": os.getuid(), "gid": os.getgid()}}
try:
    for line in sys.stdin:
        cmd = json.loads(line)
        try:
            res = ops[cmd["op"]](cmd)
        except Exception as exc:
            res = {"exception": repr(exc)}
        sys.stdout.write(json.dumps(res) + "\n")
        sys.stdout.flush()
finally:
    for pid in children:
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except OSError:
            pass
'''


class Agent:
    """The hostile process, as root (uid -1: no change) or dropped to `uid`."""

    def __init__(self, socket_path: Path, uid: int = -1) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", AGENT, str(socket_path), str(uid)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd="/tmp")
        me = self.call({"op": "whoami"})
        self.pid, self.uid = me["pid"], me["uid"]
        assert self.pid == self.proc.pid and self.pid != os.getpid()
        assert self.uid == (uid if uid >= 0 else os.getuid())

    def call(self, cmd: dict[str, Any], timeout: float = 20.0) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(cmd).encode() + b"\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        assert ready, f"agent did not answer {cmd['op']} within {timeout}s"
        res = json.loads(self.proc.stdout.readline())
        assert "exception" not in res, res
        return res

    def session(self, *chunks: bytes, recv_first: int = 0, timeout: float = 5.0, drain: bool = True) -> dict[str, Any]:
        """Connect, send the chunks (after reading `recv_first` lines if asked), read until the daemon
        closes (or the timeout); the lines received, whether it closed, a send error if any."""
        steps: list[list[Any]] = []
        for i, c in enumerate(chunks):
            steps.append(["send", base64.b64encode(c).decode()])
            if i == 0 and recv_first:
                steps.append(["recv", recv_first])
        return self.call({"op": "session", "steps": steps, "timeout": timeout, "drain": drain})

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.close()
                self.proc.wait(5)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(5)


# ---- the legitimate job ----

def enc(msg: dict[str, Any]) -> bytes:
    return json.dumps({"v": 1, **msg}, separators=(",", ":")).encode() + b"\n"


def hello_msg(run: str, pid: int, rank: int = 0, **over: Any) -> dict[str, Any]:
    return {"type": "hello", "run": run, "rank": rank, "world_size": 1, "pid": pid, "tuners": [], "tune": False,
            **over}


def report_msg(n: int, **over: Any) -> dict[str, Any]:
    return {"type": "report", "world_size": 1,
            "counters": {"samples": 32 * n, "batches": n, "steps": n, "data_wait_seconds": 0.01 * n,
                         "step_seconds": 0.1 * n},
            "step_hist": [n] + [0] * (NBUCKETS - 1), "knobs": {"num_workers": 4}, "memory": {}, **over}


def read_line(sock: socket.socket, timeout: float = 5.0) -> dict[str, Any]:
    sock.settimeout(timeout)
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = sock.recv(1)
        assert chunk, f"connection closed after {buf!r}"
        buf += chunk
    return json.loads(buf)


class LegitJob:
    """A job of this (root) process that reports every 0.1 s and must never be disturbed."""

    def __init__(self, path: Path, run: str = LEGIT_RUN) -> None:
        self.run = run
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(path))
        self.sock.sendall(enc(hello_msg(run, os.getpid())))
        welcome = read_line(self.sock)
        assert welcome["type"] == "welcome", welcome
        self.n = 0
        self.received: list[bytes] = []
        self.closed = False
        self.problem: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="legit-job", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        self.sock.setblocking(False)
        while not self._stop.wait(0.1):
            try:
                data = self.sock.recv(65536)
                if not data:
                    self.closed = True
                    return
                self.received.append(data)
            except BlockingIOError:
                pass
            except OSError as exc:
                self.problem = repr(exc)
                self.closed = True
                return
            self.n += 1
            try:
                self.sock.settimeout(2)
                self.sock.sendall(enc(report_msg(self.n)))
                self.sock.setblocking(False)
            except OSError as exc:
                self.problem = repr(exc)
                self.closed = True
                return

    def assert_healthy(self) -> None:
        assert not self.closed, f"the legitimate job's connection was closed: {self.problem} {self.received}"
        assert self.received == [], f"the legitimate job was sent {self.received!r}"

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(3)
        try:
            self.sock.setblocking(True)
            self.sock.sendall(enc({"type": "bye"}))
        except OSError:
            pass
        self.sock.close()


# ---- the environment shared by the module ----

class Env:
    def __init__(self, daemon: DaemonProc, legit: LegitJob, root: Agent, nobody: Agent) -> None:
        self.daemon, self.legit, self.root, self.nobody = daemon, legit, root, nobody

    @staticmethod
    def rejected(m: Metrics) -> Counter[str]:
        return Counter({lv["reason"]: int(v) for lv, v in m.samples.get(REJECTED, [])})

    def legit_samples(self, m: Metrics) -> float | None:
        return m.get("looptune_job_samples_total", run=self.legit.run, rank="0")

    def check_legit(self, m: Metrics) -> float:
        """The legitimate job's figures are exactly what it sent; returns its samples counter."""
        self.legit.assert_healthy()
        samples = self.legit_samples(m)
        assert samples is not None, "the legitimate job vanished from /metrics"
        n = samples / 32
        assert n == int(n) and 1 <= n <= self.legit.n, (samples, self.legit.n)
        assert m.get("looptune_job_batches_total", run=self.legit.run, rank="0") == n
        assert m.get("looptune_job_optimizer_steps_total", run=self.legit.run, rank="0") == n
        assert m.get("looptune_job_knob", run=self.legit.run, rank="0", knob="num_workers") == 4.0
        assert m.get("looptune_job_hook_connected", run=self.legit.run, rank="0") == 1.0
        assert m.find("looptune_job_step_seconds_count", run=self.legit.run, rank="0") == [n]
        return samples

    def before(self) -> tuple[Counter[str], float]:
        m = self.daemon.metrics()
        return self.rejected(m), self.check_legit(m)

    def after(self, before: tuple[Counter[str], float], expected: Counter[str], timeout: float = 10.0) -> Metrics:
        """Rejections grew by exactly `expected`; the daemon is up; the legit job advanced, untouched."""
        rejected0, samples0 = before
        want = rejected0 + expected
        assert set(want) <= set(REJECT_REASONS), want
        m = self.daemon.wait_until(
            lambda m: self.rejected(m) == want      # Counter equality: missing counts as 0
            and (self.legit_samples(m) or 0) > samples0,
            f"rejections {dict(want)} and the legit job advancing past {samples0}", timeout=timeout)
        self.check_legit(m)
        self.assert_up()
        return m

    def assert_up(self) -> None:
        assert self.daemon.running(), self.daemon.stderr
        os.kill(self.daemon.pid, 0)
        self.daemon.scrape()
        err = self.daemon.stderr
        assert "socket loop error" not in err and "Traceback" not in err, err


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="lts-", dir="/tmp"))
    os.chmod(path, 0o755)    # uid 65534 must reach the socket inside
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def env(workdir: Path) -> Iterator[Env]:
    pool = DaemonPool(workdir)
    agents: list[Agent] = []
    legit: LegitJob | None = None
    try:
        d = pool.start(CONFIG, socket_path=workdir / "looptune.sock").wait_ready()
        assert (os.stat(d.socket_path).st_mode & 0o777) == 0o666
        legit = LegitJob(d.socket_path)
        agents.append(Agent(d.socket_path))
        agents.append(Agent(d.socket_path, NOBODY))
        e = Env(d, legit, *agents)
        e.daemon.wait_until(lambda m: (e.legit_samples(m) or 0) > 0, "the legitimate job's first report")
        yield e
        legit.assert_healthy()
        e.assert_up()
    finally:
        if legit is not None:
            legit.stop()
        for a in agents:
            a.close()
        pool.close()


def error_of(res: dict[str, Any]) -> dict[str, Any]:
    """The one error line the daemon answered with before it closed the connection."""
    assert res["eof"], f"the daemon did not close the connection: {res}"
    msgs = [json.loads(line) for line in res["lines"]]
    assert msgs and msgs[-1]["type"] == "error", res
    assert [m["type"] for m in msgs].count("error") == 1, res
    err = msgs[-1]
    assert err["v"] == 1 and err["reason"] in REJECT_REASONS and isinstance(err["detail"], str), err
    return err


def rejected_as(res: dict[str, Any], reason: str) -> None:
    err = error_of(res)
    assert err["reason"] == reason, (reason, err, res)


# ---- hostile input, fuzzed ----

def _is_json_object(data: bytes) -> bool:
    try:
        return isinstance(json.loads(data), dict)
    except (ValueError, RecursionError):
        return False


json_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False),
                         st.text(max_size=16))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=6), st.dictionaries(st.text(max_size=8), inner, max_size=5)), max_leaves=12)


def fuzz_rejections(env: Env, strategy: st.SearchStrategy, reason: str, send: Any = None,
                    examples: int = 40) -> None:
    """Each drawn payload, sent on a fresh connection by the root agent, is rejected with `reason`."""
    before = env.before()
    tally: Counter[str] = Counter()

    @settings(FUZZ, max_examples=examples)
    @given(payload=strategy)
    def check(payload: Any) -> None:
        res = send(payload) if send is not None else env.root.session(payload)
        rejected_as(res, reason)
        tally[reason] += 1

    check()
    assert tally[reason] >= min(examples, 5)
    env.after(before, tally)


garbage = st.binary(max_size=4096).filter(lambda b: b"\n" not in b and not _is_json_object(b))


def test_binary_garbage_is_malformed(env: Env) -> None:
    fuzz_rejections(env, garbage.map(lambda b: b + b"\n"), "malformed")


def test_json_that_is_not_an_object_is_malformed(env: Env) -> None:
    not_objects = json_values.filter(lambda v: not isinstance(v, dict)).map(lambda v: json.dumps(v).encode() + b"\n")
    fuzz_rejections(env, not_objects, "malformed")


@st.composite
def deeply_nested(draw: st.DrawFn) -> bytes:
    opener, closer, most = draw(st.sampled_from([(b"[", b"]", 30_000), (b'{"a":', b"}", 10_000)]))
    depth = draw(st.integers(min_value=1_100, max_value=most))
    inner = opener * depth + b"0" + closer * depth
    if draw(st.booleans()):
        inner = b'{"v":1,"type":"hello","run":' + inner + b"}"
    assert len(inner) < MAX_MESSAGE_BYTES
    return inner + b"\n"


def test_deeply_nested_json_is_malformed(env: Env) -> None:
    fuzz_rejections(env, deeply_nested(), "malformed", examples=15)


@st.composite
def huge_lines(draw: st.DrawFn) -> bytes:
    size = draw(st.integers(min_value=MAX_MESSAGE_BYTES, max_value=4 * MAX_MESSAGE_BYTES))
    fill = draw(st.sampled_from([b"x", b"\x00", b"[", b" "]))
    head = draw(st.sampled_from([b"", b'{"v":1,"type":"report","pad":"']))
    line = (head + fill * size)[:size]
    return line + (b"\n" if draw(st.booleans()) else b"")     # with or without a newline at the end


def test_huge_lines_are_oversized(env: Env) -> None:
    fuzz_rejections(env, huge_lines(), "oversized", examples=12)


def test_size_limit_boundary(env: Env) -> None:
    """A line of exactly 64 KiB with its newline is read; one byte more is oversized."""
    before = env.before()
    pad = MAX_MESSAGE_BYTES - len(enc({"type": "status", "p": ""}))
    fits = enc({"type": "status", "p": "x" * pad})
    assert len(fits) == MAX_MESSAGE_BYTES
    res = env.root.session(fits, recv_first=1, drain=False)
    assert [json.loads(x)["type"] for x in res["lines"]] == ["status_reply"], res
    rejected_as(env.root.session(enc({"type": "status", "p": "x" * (pad + 1)})), "oversized")
    rejected_as(env.root.session(b"y" * MAX_MESSAGE_BYTES), "oversized")      # no newline at all
    env.after(before, Counter(oversized=2))


def _without_v(msg: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in msg.items() if k != "v"}


bad_versions = st.one_of(st.integers().filter(lambda v: v != 1), st.floats(allow_nan=False, allow_infinity=False)
                         .filter(lambda v: v != 1), st.text(max_size=4), st.none(), st.just(True), st.just("1"),
                         st.lists(st.integers(), max_size=2))


@st.composite
def wrong_versions(draw: st.DrawFn) -> bytes:
    msg = _without_v(draw(st.sampled_from([hello_msg("v-run", 1), report_msg(1), {"type": "status"},
                                           {"type": "bye"}, {"type": "nonsense"}])))
    if draw(st.booleans()):
        msg["v"] = draw(bad_versions)
    return json.dumps(msg).encode() + b"\n"


def test_wrong_versions(env: Env) -> None:
    fuzz_rejections(env, wrong_versions(), "version")


unknown_types = st.one_of(st.text(max_size=12).filter(lambda t: t not in protocol.CLIENT_TYPES),
                          st.sampled_from(list(protocol.SERVER_TYPES) + ["Hello", "HELLO", " hello", "hello\n"]),
                          st.integers(), st.none(), st.lists(st.sampled_from(protocol.CLIENT_TYPES), max_size=2))


@st.composite
def wrong_types(draw: st.DrawFn) -> bytes:
    msg: dict[str, Any] = {"v": 1}
    if draw(st.booleans()):
        msg["type"] = draw(unknown_types)
    msg.update(draw(st.dictionaries(st.sampled_from(["run", "rank", "pid", "counters", "x"]), json_values, max_size=3)))
    return json.dumps(msg).encode() + b"\n"


def test_unknown_types(env: Env) -> None:
    fuzz_rejections(env, wrong_types(), "unknown_type")


@st.composite
def before_hello(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["report", "applied", "bye"]))
    msg = {"v": 1, "type": kind, **draw(st.dictionaries(st.text(max_size=8), json_values, max_size=4))}
    msg["v"], msg["type"] = 1, kind
    if kind == "report" and draw(st.booleans()):
        msg.update(report_msg(1))                    # a perfectly good report, but no hello yet
    return json.dumps(msg).encode() + b"\n"


def test_messages_before_hello_are_not_registered(env: Env) -> None:
    fuzz_rejections(env, before_hello(), "not_registered")


def _bad_name(s: str) -> bool:
    return re.fullmatch(r"[A-Za-z0-9_.:-]{1,128}", s) is None


bad_hello_fields = st.one_of(
    st.tuples(st.just("run"), st.one_of(st.text(max_size=140).filter(_bad_name), st.integers(), st.none(),
                                        st.lists(st.text(max_size=3), max_size=2))),
    st.tuples(st.just("rank"), st.one_of(st.integers(max_value=-1), st.integers(min_value=(1 << 20) + 1),
                                         st.floats(allow_nan=False, allow_infinity=False), st.booleans(),
                                         st.text(max_size=3), st.none())),
    st.tuples(st.just("world_size"), st.one_of(st.integers(max_value=0), st.integers(min_value=(1 << 20) + 1),
                                               st.floats(allow_nan=False, allow_infinity=False), st.booleans())),
    st.tuples(st.just("pid"), st.one_of(st.integers(max_value=0), st.integers(min_value=(1 << 31) + 1),
                                        st.floats(allow_nan=False, allow_infinity=False), st.booleans(),
                                        st.just(10 ** 400))),
    st.tuples(st.just("tuners"), st.one_of(st.text(max_size=4), st.lists(st.integers(), min_size=1, max_size=3),
                                           st.lists(st.just("a"), min_size=17, max_size=20))),
    st.tuples(st.just("tune"), st.one_of(st.text(max_size=5), st.integers(), st.none())),
)


def test_bad_hello_fields_are_invalid(env: Env) -> None:
    def send(field_value: tuple[str, Any]) -> dict[str, Any]:
        msg = hello_msg("bad-hello", env.root.pid)
        msg[field_value[0]] = field_value[1]
        return env.root.session(enc(msg))
    fuzz_rejections(env, bad_hello_fields, "invalid", send=send)


bad_report_fields = st.one_of(
    st.just({"step_hist": [0] * (NBUCKETS - 1)}), st.just({"step_hist": [0] * (NBUCKETS + 1)}),
    st.lists(st.integers(max_value=-1), min_size=NBUCKETS, max_size=NBUCKETS).map(lambda h: {"step_hist": h}),
    # every declared counter, the optional ones too (comm_wire_seconds, oom_recoveries, ...)
    st.sampled_from([f.name for f in schema.FIGURES if f.kind == schema.COUNTER]).flatmap(
        lambda k: st.one_of(st.integers(max_value=-1), st.booleans(), st.text(max_size=3), st.just(10 ** 400),
                            st.just(1e19)).map(lambda v: {"counters": {**report_msg(2)["counters"], k: v}})),
    st.dictionaries(st.text(min_size=1, max_size=8).filter(lambda k: re.fullmatch(r"[a-z][a-z0-9_]{0,63}", k) is None),
                    st.integers(), min_size=1, max_size=3).map(lambda k: {"knobs": k}),
    st.just({"knobs": {"num_workers": 10 ** 400}}),      # would break float() in the exporter
    st.just({"knobs": {f"k{i}": i for i in range(33)}}),
    st.just({"memory": {"gpu_bytes": 1}}), st.just({"world_size": 0}), st.just({"hook_errors": -1}),
    st.just({"disabled": "no"}), st.just({"signature": "s" * 65}), st.just({"untunable": {"Bad": "x"}}),
    st.just({"counters": report_msg(1)["counters"]}),    # went backwards from the first report (n=2)
)


@pytest.mark.parametrize("who", ["root", "nobody"])
def test_bad_reports_after_hello_are_invalid(env: Env, who: str) -> None:
    runs = iter(range(10 ** 6))
    agent = getattr(env, who)

    def send(over: dict[str, Any]) -> dict[str, Any]:
        # a job of the agent's own: hello and one good report, then the bad one
        hello = enc(hello_msg(f"bad-report-{who}-{next(runs)}", agent.pid))
        res = agent.session(hello + enc(report_msg(2)) + enc(report_msg(2, **over)))
        assert json.loads(res["lines"][0])["type"] == "welcome", res
        return res
    fuzz_rejections(env, bad_report_fields, "invalid", send=send)


def test_hello_twice_is_invalid(env: Env) -> None:
    before = env.before()
    h = enc(hello_msg("twice", env.root.pid))
    res = env.root.session(h + h)
    assert json.loads(res["lines"][0])["type"] == "welcome"
    rejected_as(res, "invalid")
    env.after(before, Counter(invalid=1))


@settings(FUZZ, max_examples=4)
@given(count=st.integers(min_value=260, max_value=600))
def test_flood_beyond_rate_limit(env: Env, count: int) -> None:
    before = env.before()
    run = f"flood-{count}-{time.monotonic_ns()}"
    res = env.root.session(enc(hello_msg(run, env.root.pid)) + enc(report_msg(1)) * count)
    assert json.loads(res["lines"][0])["type"] == "welcome", res
    rejected_as(res, "rate_limited")
    env.after(before, Counter(rate_limited=1))


def test_burst_within_the_limit_is_fine(env: Env) -> None:
    """Within the burst (200 messages, refilled at 50/s): no rejection."""
    before = env.before()
    res = env.root.session(enc(hello_msg("paced", env.root.pid)) + enc(report_msg(1)) * 150 + enc({"type": "bye"}))
    assert res["eof"] and [json.loads(x)["type"] for x in res["lines"]] == ["welcome"], res
    env.after(before, Counter())


def test_many_connections_from_one_user(env: Env) -> None:
    """uid 65534 may hold its job cap (64) plus 8 connections; the rest are refused, and root is not affected.
    80 connections at once also need the accept loop to take everything queued: with a backlog of
    64 and one accept per turn the 80th connect() failed (EAGAIN)."""
    before = env.before()
    env.daemon.wait_until(lambda m: m.get("looptune_hook_connections") == 1, "only the legit job connected")
    first = env.nobody.call({"op": "hold", "n": 80})["first"]
    try:
        kinds = Counter(json.loads(x)["type"] if x else None for x in first)
        reasons = Counter(json.loads(x).get("reason") for x in first if x)
        assert kinds == Counter(status_reply=72, error=8), first
        assert reasons[None] == 72 and reasons["too_many_connections"] == 8, first
        assert not any(j["run"] == LEGIT_RUN for x in first if x for j in json.loads(x).get("jobs", [])), first
        # root still gets in while nobody is at its limit
        res = env.root.session(enc({"type": "status"}), recv_first=1, drain=False)
        assert [json.loads(x)["type"] for x in res["lines"]] == ["status_reply"], res
    finally:
        env.nobody.call({"op": "release"})
    env.after(before, Counter(too_many_connections=8))
    env.daemon.wait_until(lambda m: m.get("looptune_hook_connections") == 1, "held connections released")


@st.composite
def any_message(draw: st.DrawFn) -> bytes:
    """Anything: a valid-looking message of a client type with fields replaced, added or missing."""
    base = draw(st.sampled_from([hello_msg(LEGIT_RUN, 1), hello_msg("fz", 1), report_msg(3),
                                 {"type": "applied", "id": 1, "outcome": "applied"}, {"type": "status"},
                                 {"type": "bye"}]))
    msg = {"v": 1, **base}
    for key, value in draw(st.dictionaries(st.sampled_from(sorted({*msg, "x", "pid", "v"})), json_values,
                                           max_size=3)).items():
        msg[key] = value
    return json.dumps(msg).encode() + b"\n"


def test_fuzz_any_message_rejected_consistently(env: Env) -> None:
    """Whatever happens, the daemon closes with at most one error, counted under the reason it told."""
    before = env.before()
    tally: Counter[str] = Counter()

    @settings(FUZZ, max_examples=80)
    @given(line=any_message())
    def check(line: bytes) -> None:
        # a bye after it, so that accepted ones close too (before a hello it is itself not_registered)
        res = env.root.session(line, enc({"type": "bye"}))
        assert res["eof"], res
        msgs = [json.loads(x) for x in res["lines"]]
        errors = [m for m in msgs if m["type"] == "error"]
        assert len(errors) <= 1 and all(m["type"] in ("welcome", "status_reply", "error") for m in msgs), msgs
        if errors:
            assert errors[0]["reason"] in REJECT_REASONS and msgs[-1] is errors[0], msgs
            tally[errors[0]["reason"]] += 1

    check()
    env.after(before, tally)


# ---- impersonation ----

def test_hello_with_another_process_pid(env: Env) -> None:
    before = env.before()
    # this test process is the agent's parent: neither the agent nor its descendant
    rejected_as(env.root.session(enc(hello_msg("imp-a", os.getpid()))), "pid_mismatch")
    rejected_as(env.root.session(enc(hello_msg("imp-b", 1))), "pid_mismatch")
    rejected_as(env.root.session(enc(hello_msg("imp-c", 2 ** 22 + 12345))), "pid_mismatch")   # no such process
    # the legit job's own name and pid, from another process
    rejected_as(env.root.session(enc(hello_msg(LEGIT_RUN, os.getpid()))), "pid_mismatch")
    rejected_as(env.nobody.session(enc(hello_msg(LEGIT_RUN, os.getpid()))), "pid_mismatch")
    # a registered job whose report claims another pid
    res = env.root.session(enc(hello_msg("imp-d", env.root.pid)) + enc(report_msg(1, pid=os.getpid())))
    assert json.loads(res["lines"][0])["type"] == "welcome"
    rejected_as(res, "pid_mismatch")
    env.after(before, Counter(pid_mismatch=6))


def test_hello_for_a_descendant_is_accepted(env: Env) -> None:
    before = env.before()
    child = env.root.call({"op": "fork"})["pid"]
    res = env.root.session(enc(hello_msg("descendant", child)) + enc(report_msg(1)) + enc({"type": "bye"}))
    assert res["eof"] and [json.loads(x)["type"] for x in res["lines"]] == ["welcome"], res
    env.after(before, Counter())


def test_same_user_cannot_take_a_connected_job(env: Env) -> None:
    before = env.before()
    rejected_as(env.root.session(enc(hello_msg(LEGIT_RUN, env.root.pid))), "duplicate_job")
    env.after(before, Counter(duplicate_job=1))


def test_other_user_cannot_take_the_job(env: Env) -> None:
    before = env.before()
    res = env.nobody.session(enc(hello_msg(LEGIT_RUN, env.nobody.pid)) + enc(report_msg(10 ** 6)))
    err = error_of(res)
    assert err["reason"] in ("job_owned", "duplicate_job") and err["reason"] == "job_owned", err
    env.after(before, Counter(job_owned=1))


@pytest.mark.parametrize("field", ["knob", "signature", "untunable"])
def test_unencodable_strings_from_another_user_are_rejected_and_scrapes_go_on(env: Env, field: str) -> None:
    """A lone surrogate passes JSON but not UTF-8: once it crashed every scrape and then the daemon."""
    before = env.before()
    over = {"knob": {"knobs": {"num_workers": 4, "mode": "\ud800"}}, "signature": {"signature": "a\udfffb"},
            "untunable": {"untunable": {"num_workers": "\ud83d"}}}[field]
    res = env.nobody.session(enc(hello_msg(f"surrogate-{field}", env.nobody.pid)) + enc(report_msg(2, **over)))
    assert json.loads(res["lines"][0])["type"] == "welcome", res
    rejected_as(res, "invalid")
    env.after(before, Counter(invalid=1))
    time.sleep(1.5)                           # a few main-loop turns: renders ahead, still up
    env.assert_up()


def test_other_user_sees_only_its_own_jobs(env: Env) -> None:
    before = env.before()
    # uid 65534 registers a job of its own and asks for the status on the same connection
    res = env.nobody.session(enc(hello_msg("nobody-job", env.nobody.pid)) + enc(report_msg(5)) +
                             enc({"type": "status"}), recv_first=2, drain=False)
    msgs = [json.loads(x) for x in res["lines"]]
    assert [m["type"] for m in msgs] == ["welcome", "status_reply"], res
    # its own jobs only (other tests' jobs of uid 65534 may still be listed: the shared daemon keeps a
    # job a while after its connection closes), every one with its own pid, root's not among them
    own = [(j["run"], j["rank"], j["pid"]) for j in msgs[1]["jobs"]]
    assert ("nobody-job", "0", env.nobody.pid) in own, own
    assert {pid for _, _, pid in own} == {env.nobody.pid} and LEGIT_RUN not in {run for run, _, _ in own}, own
    # a status-only connection of uid 65534: still none of root's jobs
    res = env.nobody.session(enc({"type": "status"}), recv_first=1, drain=False)
    jobs = json.loads(res["lines"][0])["jobs"]
    assert LEGIT_RUN not in {j["run"] for j in jobs} and {j["pid"] for j in jobs} == {env.nobody.pid}, jobs
    # root sees every job, its own with the right pid
    res = env.root.session(enc({"type": "status"}), recv_first=1, drain=False)
    jobs = {j["run"]: j for j in json.loads(res["lines"][0])["jobs"]}
    assert jobs[LEGIT_RUN]["pid"] == os.getpid() and jobs[LEGIT_RUN]["connected"] is True
    assert "nobody-job" in jobs
    env.after(before, Counter())


def test_allowed_uids_denies_other_users(workdir: Path) -> None:
    pool = DaemonPool(workdir)
    nobody = root = None
    try:
        path = workdir / "allowed.sock"
        d = pool.start({**CONFIG, "daemon": {"allowed_uids": [0]}}, socket_path=path).wait_ready()
        nobody, root = Agent(path, NOBODY), Agent(path)
        for msg in (hello_msg("denied", nobody.pid), {"type": "status"}):
            rejected_as(nobody.session(enc(msg)), "uid_denied")
        res = root.session(enc(hello_msg("allowed", root.pid)) + enc({"type": "bye"}))
        assert [json.loads(x)["type"] for x in res["lines"]] == ["welcome"], res
        d.wait_until(lambda m: Env.rejected(m)["uid_denied"] == 2 and sum(Env.rejected(m).values()) == 2,
                     "two uid_denied rejections")
    finally:
        for a in (nobody, root):
            if a is not None:
                a.close()
        pool.close()


def test_the_run_owner_wins_after_a_daemon_restart(workdir: Path) -> None:
    """Once another user won the race for root's run name after every restart and locked root's job
    out: the owner is remembered across restarts and the other user's hello is refused."""
    state = workdir / "restart-state"
    state.mkdir()
    config = {**CONFIG, "tuners": {**CONFIG.get("tuners", {}), "state_file": str(state / "best.json")}}
    path = workdir / "restart.sock"
    pool = DaemonPool(workdir)
    agents: list[Agent] = []
    try:
        d = pool.start(config, socket_path=path).wait_ready()
        root = Agent(path)
        agents.append(root)
        res = root.session(enc(hello_msg("roots-run", root.pid)) + enc({"type": "bye"}))
        assert [json.loads(x)["type"] for x in res["lines"]] == ["welcome"], res
        assert d.stop() == 0
        d = pool.start(config, socket_path=path).wait_ready()
        nobody = Agent(path, NOBODY)
        agents.append(nobody)
        # the other user is first after the restart: refused, and it cannot squat the name
        err = error_of(nobody.session(enc(hello_msg("roots-run", nobody.pid))))
        assert err["reason"] == "job_owned", err
        res = root.session(enc(hello_msg("roots-run", root.pid)) + enc(report_msg(1)) + enc({"type": "bye"}))
        assert [json.loads(x)["type"] for x in res["lines"]] == ["welcome"], res
        # a run name nobody has claimed is the first registrant's, as before
        res = nobody.session(enc(hello_msg("nobodys-run", nobody.pid)) + enc({"type": "bye"}))
        assert [json.loads(x)["type"] for x in res["lines"]] == ["welcome"], res
        owners = json.loads((state / "owners.json").read_text())
        assert owners["roots-run"][0] == 0 and owners["nobodys-run"][0] == NOBODY
    finally:
        for a in agents:
            a.close()
        pool.close()


# ---- decisions go only to the job's own connection (daemon in-process) ----

class Client:
    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)

    def send(self, msg: dict[str, Any]) -> None:
        self.sock.sendall(protocol.encode(msg))

    def line(self, timeout: float = 5.0) -> dict[str, Any]:
        return read_line(self.sock, timeout)

    def quiet(self, wait: float = 0.3) -> bool:
        ready, _, _ = select.select([self.sock], [], [], wait)
        return not ready

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def inproc(workdir: Path) -> Iterator[Daemon]:
    config = cfg.parse({"collectors": {"host": {"enabled": False}, "jobs": {"enabled": False},
                                       "gpu": {"enabled": False}}, "tuners": {"enabled": []}})
    d = Daemon(config, listen=f"127.0.0.1:{free_port()}", socket_path=str(workdir / "inproc.sock"), environ={})
    d.start()
    try:
        yield d
    finally:
        d.shutdown()


def test_one_user_cannot_register_unbounded_jobs(inproc: Daemon) -> None:
    inproc.hooks.max_jobs_per_uid = 3
    for i in range(4):
        c = Client(inproc.socket_path)
        try:
            c.send(hello_msg(f"many-{i}", os.getpid()))
            reply = c.line()
            if i < 3:
                assert reply["type"] == "welcome"
                c.send({"type": "bye"})
            else:
                assert reply["type"] == "error" and reply["reason"] == "too_many_jobs"
        finally:
            c.close()
    assert inproc.socket_server is not None and inproc.socket_server.rejected["too_many_jobs"] == 1


def test_one_user_64_ranks_all_connect_and_the_node_has_a_total_cap(inproc: Daemon) -> None:
    """The per-user connection cap is above the per-user job cap (it was 32 under 64), and all
    users together are capped too."""
    clients = []
    try:
        for rank in range(64):
            c = Client(inproc.socket_path)
            clients.append(c)
            c.send(hello_msg("wide", os.getpid(), rank=rank, world_size=64))
            reply = c.line()
            assert reply["type"] == "welcome", (rank, reply)
        assert len(inproc.hooks) == 64
        inproc.hooks.max_jobs, inproc.hooks.max_jobs_per_uid = 65, 100     # now the node cap is the one hit
        extra = Client(inproc.socket_path)
        clients.append(extra)
        extra.send(hello_msg("one-more", os.getpid()))
        assert extra.line()["type"] == "welcome"
        late = Client(inproc.socket_path)
        clients.append(late)
        late.send(hello_msg("too-many", os.getpid()))
        reply = late.line()
        assert reply["type"] == "error" and reply["reason"] == "too_many_jobs" and "jobs.max_jobs" in reply["detail"]
    finally:
        for c in clients:
            c.close()


def test_a_hello_for_the_pid_of_a_connection_whose_process_is_gone_is_refused(inproc: Daemon) -> None:
    """The peer's pid is read at connect time; once that process is gone its number can be anyone's
    (another user recycled one in 3.6 s). A hello naming it is refused: the start time differs."""
    r, w = os.pipe()
    child = os.fork()
    if child == 0:                                  # the connecting process
        try:
            os.close(r)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(inproc.socket_path)
            me = os.getpid()
            if os.fork() == 0:                      # a child keeps the connection; its parent exits
                # until the test has reaped it: a zombie still shows its start time in /proc, and a
                # hello sent then (a loaded machine reaps late) would rightly be welcomed
                deadline = time.monotonic() + 10
                while os.path.exists(f"/proc/{me}") and time.monotonic() < deadline:
                    time.sleep(0.01)
                sock.sendall(enc(hello_msg("recycled", me)))
                sock.settimeout(5)
                os.write(w, sock.recv(4096) or b"closed")
                os._exit(0)
            os._exit(0)
        except BaseException:  # noqa: BLE001
            os._exit(1)
    os.close(w)
    os.waitpid(child, 0)                            # reaped: its pid is free for anyone now
    reply = b""
    ready, _, _ = select.select([r], [], [], 15)
    if ready:
        reply = os.read(r, 4096)
    os.close(r)
    msg = json.loads(reply.split(b"\n")[0])
    assert msg["type"] == "error" and msg["reason"] == "pid_mismatch" and "gone" in msg["detail"], msg


def test_a_reload_that_denies_a_uid_closes_its_open_connections(inproc: Daemon, workdir: Path) -> None:
    nobody = Agent(Path(inproc.socket_path), NOBODY)
    try:
        nobody.call({"op": "hold", "n": 3})
        server = inproc.socket_server
        assert server is not None
        wait_for(lambda: server.connections() == 3, "nobody's 3 connections")
        path = workdir / "deny.yaml"
        path.write_text("daemon:\n  allowed_uids: [0]\ncollectors:\n  host: {enabled: false}\n"
                        "  jobs: {enabled: false}\n  gpu: {enabled: false}\ntuners:\n  enabled: []\n")
        inproc.config_cli_path = str(path)
        assert inproc.reload()
        wait_for(lambda: server.connections() == 0, "the denied uid's connections closed")
        assert server.rejected["uid_denied"] == 3
    finally:
        nobody.call({"op": "release"})
        nobody.close()


def test_decision_counters_leave_with_their_run(inproc: Daemon) -> None:
    assert inproc.engine is not None
    inproc.engine.outcomes[("gone-run", "workers", "num_workers", "kept")] = 2
    c = Client(inproc.socket_path)
    try:
        c.send(hello_msg("here-run", os.getpid()))
        assert c.line()["type"] == "welcome"
        c.send(report_msg(1))
        inproc.engine.outcomes[("here-run", "workers", "num_workers", "kept")] = 1
        wait_for(lambda: inproc.hooks.connected(), "the report")
        inproc.tune_tick()                       # one turn of the main loop's tuning
        assert ("gone-run", "workers", "num_workers", "kept") not in inproc.engine.outcomes
        assert inproc.engine.outcomes[("here-run", "workers", "num_workers", "kept")] == 1
    finally:
        c.close()


def wait_for(pred: Any, what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_decisions_reach_only_their_job(inproc: Daemon) -> None:
    server = inproc.socket_server
    assert server is not None
    a, b = Client(inproc.socket_path), Client(inproc.socket_path)
    try:
        for c, run in ((a, "job-a"), (b, "job-b")):
            c.send(hello_msg(run, os.getpid()))
            assert c.line()["type"] == "welcome"
            c.send(report_msg(1))
        job_a, job_b = inproc.hooks.find("job-a", 0), inproc.hooks.find("job-b", 0)
        assert job_a is not None and job_b is not None and job_a.conn_id != job_b.conn_id
        decision = {"id": 1, "knob": "num_workers", "value": 8, "reason": "data wait", "tuner": "workers",
                    "at_step": None}
        assert server.send_decision(job_a, decision) is True
        got = a.line()
        assert got["type"] == "decision" and protocol.check_decision(got) == {**decision, "trial": False}
        # B's next line is the answer to its own request: nothing was queued for it before
        b.send({"type": "status"})
        reply = b.line()
        assert reply["type"] == "status_reply", reply
        assert b.quiet() and a.quiet()
        # the outcome comes back on A's connection and lands on A's job only
        a.send({"type": "applied", "id": 1, "outcome": "applied", "detail": "", "step": 3})
        wait_for(lambda: (job_a.decisions[-1].get("outcome") == "applied"), "A's outcome")
        assert list(job_b.decisions) == []
        views = {v.run: v for v in inproc.hooks.views()}
        assert views["job-a"].last_decision["outcome"] == "applied" and views["job-b"].last_decision is None
        # once A is gone, its decisions go nowhere (not to B, not to a newcomer under A's name)
        a.close()
        wait_for(lambda: job_a.conn_id is None, "A's disconnect")
        assert server.send_decision(job_a, {**decision, "id": 2}) is False
        a2 = Client(inproc.socket_path)
        try:
            a2.send(hello_msg("job-a", os.getpid()))
            assert a2.line()["type"] == "welcome"
            assert server.send_decision(job_a, {**decision, "id": 3}) is False    # the old job object
            new_a = inproc.hooks.find("job-a", 0)
            assert new_a is not None and new_a is not job_a
            assert server.send_decision(new_a, {**decision, "id": 4}) is True
            assert a2.line()["id"] == 4
            assert a2.quiet() and b.quiet()
        finally:
            a2.close()
    finally:
        a.close()
        b.close()


def test_status_on_a_crowded_node_fits_one_line(inproc: Daemon) -> None:
    """Hundreds of jobs: the status_reply is cut to 64 KiB (truncated), the asker is not rejected."""
    inproc.hooks.max_jobs_per_uid = inproc.hooks.max_jobs = 1000     # past the default caps (64 per user, 256 in all)
    for i in range(300):
        c = Client(inproc.socket_path)
        try:
            c.send(hello_msg(f"crowd-{i}", os.getpid()))
            assert c.line()["type"] == "welcome"
            c.send(report_msg(1))
            c.send({"type": "status"} if i == 0 else {"type": "bye"})
            if i == 0:
                assert c.line()["type"] == "status_reply"
        finally:
            c.close()
    wait_for(lambda: len(inproc.hooks.views()) == 300, "300 reported jobs")
    c = Client(inproc.socket_path)
    try:
        c.send({"type": "status"})
        sock = c.sock
        sock.settimeout(5)
        raw = b""
        while not raw.endswith(b"\n"):
            chunk = sock.recv(65536)
            assert chunk, raw[-200:]
            raw += chunk
        reply = json.loads(raw)
        assert reply["type"] == "status_reply" and reply.get("truncated") is True, reply.get("reason")
        assert len(raw) <= MAX_MESSAGE_BYTES and 100 < len(reply["jobs"]) < 300
    finally:
        c.close()
    assert inproc.socket_server is not None and sum(inproc.socket_server.rejected.values()) == 0
