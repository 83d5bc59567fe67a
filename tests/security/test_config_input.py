"""Hostile config files: every one is a clear ConfigError, fast and small, never a traceback or a crash.

Each file below once crashed `looptune config check`, the daemon's start or its SIGHUP reload (or
took gigabytes and minutes): a 400-digit number (OverflowError in float()), a 5,000-digit one
(Python's limit on int digits), a Latin-1 byte (UnicodeDecodeError), 30,000-deep nesting
(RecursionError), a few hundred bytes of YAML aliases that expand to gigabytes, a 50 MB file, a lone
surrogate in a socket path. Loads run in a subprocess under an address-space limit, so a file that
expands is caught by the limit, not by the machine running the tests.
"""
from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from daemon_proc import ROOT, DaemonProc, write_config
from looptune.daemon import config as cfg

LOAD_LIMIT_BYTES = 512 << 20       # a load in its own process: far below what an expanded bomb takes
DAEMON_LIMIT_BYTES = 1 << 30       # a whole daemon (threads reserve address space); the bomb took 1.86 GB
MAX_PROBLEM_CHARS = 300            # one problem line
MAX_MESSAGE_CHARS = 4000           # the whole error, every line
MB50 = 50 * 1024 * 1024

BOMB = textwrap.dedent("""\
    a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
    b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
    c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
    d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
    e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
    f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
    g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
    h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
    i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
    jobs:
      match: *i
    daemon: *i
    """).encode()

# name -> (the file's bytes, or a function writing it; what its one problem says)
HOSTILE: dict[str, tuple[bytes | Callable[[Path], None], str]] = {
    "400-digit number for a float": (
        b"collectors:\n  interval_seconds: " + b"9" * 400 + b"\n",
        "collectors.interval_seconds: a 400-digit number is out of range; allowed 0.1..60"),
    "400-digit number for an int": (
        b"jobs:\n  max_jobs: " + b"9" * 400 + b"\n",
        "jobs.max_jobs: a 400-digit number is out of range; allowed 1..4096"),
    "5000-digit number": (
        b"jobs:\n  max_jobs: -" + b"1" * 5000 + b"\n",
        "jobs.max_jobs: a 5000-digit number is out of range; allowed 1..4096"),
    "Latin-1 byte in a comment": (
        b"daemon:\n  # caf\xe9 au lait\n  log_level: info\n",
        "line 2 column 8: byte 0xe9 is not UTF-8; a config file is UTF-8 text"),
    "30000-deep lists": (
        b"daemon: " + b"[" * 30000 + b"]" * 30000 + b"\n",
        "line 1 column 24: nested more than 16 levels deep"),
    "30000-deep mappings": (
        b"daemon: " + b"{a: " * 30000 + b"1" + b"}" * 30000 + b"\n",
        "line 1 column 69: nested more than 16 levels deep"),
    "billion laughs": (BOMB, "line 1 column 4: anchors and aliases are not allowed (&a)"),
    "50 MB file": (
        lambda p: _write_big(p, b"# padding\n", b"#" + b"x" * 1023, b"daemon: {}\n"),
        f"file is {MB50} bytes; at most 1048576"),
    "50 MB socket value": (
        lambda p: _write_big(p, b"daemon:\n  socket: '", b"x" * 1024, b"'\n"),
        f"file is {MB50} bytes; at most 1048576"),
    "lone surrogate in the socket path": (
        b'daemon:\n  socket: "/tmp/\\ud800.sock"\n',
        "daemon.socket: '/tmp/\\ud800.sock' is not text: character 6 is a lone surrogate"),
}


def _write_big(path: Path, head: bytes, block: bytes, tail: bytes) -> None:
    """Exactly MB50 bytes: head, blocks, tail."""
    with open(path, "wb") as f:
        f.write(head)
        left = MB50 - len(head) - len(tail)
        chunk = block * ((1 << 20) // len(block))
        while left > 0:
            piece = chunk[:left]
            f.write(piece)
            left -= len(piece)
        f.write(tail)
    assert path.stat().st_size == MB50


@pytest.fixture(scope="module")
def hostile_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("hostile")
    for i, (name, (content, _)) in enumerate(HOSTILE.items()):
        path = d / f"{i:02d}.yaml"
        if callable(content):
            content(path)
        else:
            path.write_bytes(content)
    return d


def hostile_file(hostile_dir: Path, name: str) -> Path:
    return hostile_dir / f"{list(HOSTILE).index(name):02d}.yaml"


def _limit_address_space(limit: int) -> Callable[[], None]:
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    return apply


def assert_bounded(problems: list[str], text: str) -> None:
    assert all(len(p) <= MAX_PROBLEM_CHARS for p in problems), [p[:500] for p in problems]
    assert len(text) <= MAX_MESSAGE_CHARS, text[:1000]


# ---- (a) cfg.load: a ConfigError, short, fast, small ----

_LOAD = textwrap.dedent("""\
    import json, resource, sys, time
    resource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit}))
    from looptune.daemon import config as cfg
    t0 = time.perf_counter()
    try:
        cfg.load(sys.argv[1])
    except cfg.ConfigError as exc:
        out = {{"problems": exc.problems, "source": exc.source, "text": str(exc)}}
    else:
        out = {{"accepted": True}}
    out["seconds"] = time.perf_counter() - t0
    print(json.dumps(out))
    """)


def load_in_subprocess(path: Path, timeout: float = 20.0) -> dict[str, Any]:
    """cfg.load(path) in a fresh interpreter under LOAD_LIMIT_BYTES of address space."""
    code = _LOAD.format(limit=LOAD_LIMIT_BYTES)
    try:
        r = subprocess.run([sys.executable, "-c", code, str(path)], cwd=ROOT, capture_output=True,
                           timeout=timeout, text=True, errors="replace")
    except subprocess.TimeoutExpired:
        raise AssertionError(f"loading {path} still running after {timeout}s") from None
    assert r.returncode == 0, f"the load failed (exit {r.returncode}):\n{r.stderr[-3000:]}"
    return json.loads(r.stdout)


@pytest.mark.parametrize("name", list(HOSTILE))
def test_load_gives_a_short_config_error_fast(hostile_dir: Path, name: str) -> None:
    path = hostile_file(hostile_dir, name)
    out = load_in_subprocess(path)
    assert not out.get("accepted"), f"{name}: accepted"
    assert out["problems"] == [HOSTILE[name][1]], out["problems"]
    assert out["source"] == str(path)
    assert_bounded(out["problems"], out["text"])
    assert out["seconds"] < 2.0, f"{name}: load took {out['seconds']:.2f}s"


# ---- (b) looptune config check: exit 1, the problem, no traceback ----

@pytest.mark.parametrize("name", list(HOSTILE))
def test_config_check_exits_1_without_traceback(hostile_dir: Path, name: str) -> None:
    path = hostile_file(hostile_dir, name)
    try:
        r = subprocess.run([sys.executable, "-m", "looptune", "config", "check", str(path)], cwd=ROOT,
                           capture_output=True, text=True, errors="replace", timeout=20,
                           preexec_fn=_limit_address_space(LOAD_LIMIT_BYTES))
    except subprocess.TimeoutExpired:
        raise AssertionError(f"config check of {name} still running after 20s") from None
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    assert r.returncode == 1, (r.returncode, r.stdout[-500:], r.stderr[-2000:])
    assert r.stderr == f"{path}: {HOSTILE[name][1]}\n", r.stderr[-2000:]


# ---- (c) the daemon: refuses to start on it, keeps running when it is reloaded ----

class LimitedDaemon(DaemonProc):
    """`python -m looptune daemon ...` exec'd under DAEMON_LIMIT_BYTES of address space (same pid)."""

    def command(self) -> list[str]:
        wrapper = ("import os, resource, sys; "
                   f"resource.setrlimit(resource.RLIMIT_AS, ({DAEMON_LIMIT_BYTES}, {DAEMON_LIMIT_BYTES})); "
                   "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])")
        return [sys.executable, "-c", wrapper, *super().command()[1:]]


@pytest.fixture
def limited(short_tmp: Path) -> Iterator[Callable[[Path], LimitedDaemon]]:
    started: list[LimitedDaemon] = []

    def start(config: Path) -> LimitedDaemon:
        d = LimitedDaemon(short_tmp, config)
        started.append(d)
        return d.start()   # type: ignore[return-value]

    try:
        yield start
    finally:
        for d in started:
            d.close()


@pytest.mark.parametrize("name", list(HOSTILE))
def test_daemon_start_refuses_with_one_line(hostile_dir: Path, short_tmp: Path,
                                            limited: Callable[[Path], LimitedDaemon], name: str) -> None:
    config = short_tmp / "config.yaml"
    shutil.copyfile(hostile_file(hostile_dir, name), config)
    d = limited(config)
    rc = d.wait_exit(15)
    err = d.stderr
    assert "Traceback" not in err, err[-3000:]
    assert rc == 1, err[-3000:]     # the exit status of any bad config at start
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err[-3000:]
    assert lines[0].endswith(f"ERROR looptune: {config}: {HOSTILE[name][1]}"), lines[0][:1000]
    assert not d.socket_path.exists()


def test_daemon_reload_keeps_running_config_through_every_hostile_file(
        hostile_dir: Path, short_tmp: Path, limited: Callable[[Path], LimitedDaemon]) -> None:
    config = write_config(short_tmp / "config.yaml", {"collectors": {"interval_seconds": 0.5}})
    d = limited(config)
    d.wait_ready()
    d.wait_until(lambda m: m.get("looptune_collector_up", collector="jobs") == 1, "jobs up")
    # the huge number first: it killed the daemon at the first SIGHUP
    for n, name in enumerate(HOSTILE, start=1):
        shutil.copyfile(hostile_file(hostile_dir, name), config)
        started = time.monotonic()
        d.send(signal.SIGHUP)
        # reloads_total counts a reload as it starts, failures_total once it is rejected
        m = d.wait_until(lambda m: m.get("looptune_config_reloads_total") == n and
                         m.get("looptune_config_reload_failures_total") == n, f"reload {n} ({name}) rejected",
                         timeout=15)
        assert time.monotonic() - started < 5, f"reloading {name} took {time.monotonic() - started:.1f}s"
        assert m.get("looptune_config_last_reload_successful") == 0, name
        assert m.get("looptune_config_reload_failures_total") == n, name
        assert d.running(), name
        expected = f"config reload rejected, keeping the running config: {config}: {HOSTILE[name][1]}"
        deadline = time.monotonic() + 5
        while expected not in d.stderr and time.monotonic() < deadline:
            time.sleep(0.05)
        assert expected in d.stderr, d.stderr[-3000:]
    m = d.metrics()
    assert m.get("looptune_collector_up", collector="jobs") == 1
    # a good file again: applied, the gauge back to 1
    write_config(config, {"collectors": {"jobs": {"enabled": False}}})
    d.send(signal.SIGHUP)
    m = d.wait_until(lambda m: m.get("looptune_config_reloads_total") == len(HOSTILE) + 1 and
                     m.get("looptune_config_last_reload_successful") == 1, "the good reload applied")
    assert m.get("looptune_config_reload_failures_total") == len(HOSTILE)
    d.wait_until(lambda m: m.get("looptune_collector_up", collector="jobs") is None, "jobs gone", timeout=5)
    assert d.stop() == 0
    err = d.stderr
    assert "Traceback" not in err, err[-3000:]
    assert len(err) < 20_000, f"{len(err)} bytes of log"


# ---- values: strings, socket paths, numbers, how many problems ----

def problems_of(data: object) -> list[str]:
    with pytest.raises(cfg.ConfigError) as info:
        cfg.parse(data)
    assert_bounded(info.value.problems, str(info.value))
    return info.value.problems


def test_a_50_mb_socket_value_is_refused_quickly() -> None:
    started = time.monotonic()
    problems = problems_of({"daemon": {"socket": "/" + "x" * (MB50 - 1)}})
    assert problems == [f"daemon.socket: a string of {MB50} characters is too long; at most 4096"]
    assert time.monotonic() - started < 2


def test_a_long_string_in_a_file_under_the_size_limit(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("jobs:\n  match:\n    - '" + "a" * 1_000_000 + "'\n", encoding="utf-8")
    out = load_in_subprocess(path)
    assert out["problems"] == ["jobs.match[0]: a string of 1000000 characters is too long; at most 4096"]


@pytest.mark.parametrize("length", [108, 200, 4096])
def test_socket_path_longer_than_sun_path_is_refused(length: int) -> None:
    value = "/tmp/" + "s" * (length - 5)
    msg, = problems_of({"daemon": {"socket": value}})
    assert msg.startswith("daemon.socket: '/tmp/sss")
    assert msg.endswith(f" is {length} bytes long; a unix socket path is at most 107 bytes")
    assert len(msg) < 200
    assert cfg.parse({"daemon": {"socket": value[:107]}}).daemon.socket == value[:107]    # the longest that fits


def test_socket_path_counts_bytes_not_characters() -> None:
    value = "/tmp/" + "é" * 60       # 65 characters, 125 bytes
    msg, = problems_of({"daemon": {"socket": value}})
    assert msg.endswith(" is 125 bytes long; a unix socket path is at most 107 bytes")


def test_nul_in_a_string_is_refused() -> None:
    msg, = problems_of({"daemon": {"socket": "/tmp/a\0b"}})
    assert msg == "daemon.socket: '/tmp/a\\x00b' holds a NUL character"


@pytest.mark.parametrize("value", [10**400, -(10**400), 10**5000], ids=["10**400", "-10**400", "10**5000"])
def test_huge_ints_from_parse_are_out_of_range(value: int) -> None:
    # parse() takes a decoded document from any caller, not only from the YAML loader
    msg, = problems_of({"collectors": {"interval_seconds": value}})
    assert msg.startswith("collectors.interval_seconds: a ")
    assert msg.endswith(" is out of range; allowed 0.1..60")


def test_unbounded_int_key_takes_no_number_beyond_64_bits() -> None:
    msg, = problems_of({"tuners": {"workers": {"memory_budget_bytes": 2**64}}})
    assert msg == ("tuners.workers.memory_budget_bytes: 18446744073709551616 is out of range; "
                   "allowed 0..9223372036854775807")
    assert cfg.parse({"tuners": {"workers": {"memory_budget_bytes": 2**40}}})


def test_a_60_digit_number_in_a_file(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("collectors:\n  interval_seconds: " + "7" * 60 + "\n", encoding="utf-8")
    with pytest.raises(cfg.ConfigError) as info:
        cfg.load(path)
    assert info.value.problems == ["collectors.interval_seconds: a 60-digit number is out of range; "
                                   "allowed 0.1..60"]


def test_problems_are_counted_past_twenty(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("jobs:\n  match: [" + ", ".join(["1"] * 1000) + "]\n", encoding="utf-8")
    with pytest.raises(cfg.ConfigError) as info:
        cfg.load(path)
    problems = info.value.problems
    assert len(problems) == 21
    assert problems[0] == "jobs.match[0]: 1 is not a string"
    assert problems[-1] == "and 980 more problems not shown"


def test_long_lists_and_mappings_are_refused() -> None:
    msg, = problems_of({"daemon": {"allowed_uids": list(range(2000))}})
    assert msg == "daemon.allowed_uids: a list of 2000 items is too long; at most 1024"
    msg, = problems_of({"tuners": {f"t{i}": {} for i in range(2000)}})
    assert msg == "tuners: a mapping of 2000 keys is too long; at most 1024"


def test_a_long_unknown_key_is_shown_short() -> None:
    msg, = problems_of({"daemon": {"k" * 100_000: 1}})
    assert msg.startswith("daemon.'kkkk") and "…" in msg and msg.endswith(": unknown key; allowed keys "
                                                                         "here: listen, socket, log_level, "
                                                                         "allowed_uids, tls")


def test_a_large_wrong_value_is_shown_short() -> None:
    msg, = problems_of({"collectors": ["x" * 1000] * 1000})
    assert msg.startswith("collectors: ['xxx") and msg.endswith("… is not a mapping of keys")


@pytest.mark.parametrize("text, expected", [pytest.param(*case, id=str(i)) for i, case in enumerate([
    ("jobs:\n  max_jobs: !!int abc\n", "line 2 column 13: 'abc' cannot be read as !!int"),
    ("jobs:\n  gpu_processes: !!bool maybe\n", "line 2 column 18: 'maybe' cannot be read as !!bool"),
    ("jobs:\n  match: !!timestamp x\n", "line 2 column 10: 'x' cannot be read as !!timestamp"),
    ("daemon:\n  log_level: in\x01fo\n", "line 2 column 16: not valid YAML: character #x0001 is not allowed"),
    ("daemon:\n  listen: 'h:\u00b2'\n", "daemon.listen: 'h:\u00b2' is not HOST:PORT with a port in 1..65535"),
    ("jobs:\n  match: ['" + "(" * 2000 + ")" * 2000 + "']\n", "jobs.match[0]: '" + "(" * 78 + "…"
     " is not a valid regular expression: nested too deeply"),
    ("jobs:\n  match: ['a{99999999999999999999}']\n", "jobs.match[0]: 'a{99999999999999999999}' is not a valid "
     "regular expression: the repetition number is too large"),
])])
def test_odd_values_are_problems_not_crashes(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(cfg.ConfigError) as info:
        cfg.load(path)
    assert info.value.problems == [expected]


def test_a_fifo_in_place_of_the_file_does_not_hang(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    os.mkfifo(path)
    out = load_in_subprocess(path, timeout=10)
    assert out["problems"] == ["is not a regular file"]


def test_a_device_is_read_no_further_than_the_limit() -> None:
    out = load_in_subprocess(Path("/dev/zero"), timeout=10)
    assert out["problems"] == ["file is more than 1048576 bytes; at most 1048576"]
    assert out["seconds"] < 2
