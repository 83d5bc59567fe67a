#!/usr/bin/env python3
"""Cost of the looptune daemon itself: CPU share, RSS and /metrics scrape latency.

For each number of watched processes N (default 0, 8, 32) this starts N idle dummy
"training job" processes, a daemon (`python -m looptune daemon`, cwd = repo root) whose
temporary config samples every `--interval` seconds and matches exactly those dummies,
waits until /metrics shows them all, then measures over `--seconds`:

* first part (`--cpu-fraction`, default 60 %) with no scrapes at all: the daemon's CPU time
  (user + system, psutil) divided by wall time = share of one core. Scrapes cost daemon CPU,
  so they are kept out of this part;
* the rest: `--scrapes` (default 50) sequential GETs of /metrics evenly spread (never bursts),
  each timed from connect to the last body byte: median and p95, and the body size;
* RSS polled every second over the whole window (peak) and at its end.

Layout of the watched processes: by default every dummy is a job of its own (N jobs, one
process each: the most label series and job roots for the collector). `--workers-per-job W`
makes N/W jobs of one launcher plus W-1 DataLoader-like child processes each (children do not
match the pattern; they are found as members of the launcher's tree).

`--hooked`: every dummy is instead a hooked job (one process each, stdlib only) that connects to
the daemon's socket, says `hello` (its own pid, run `bench-<token>-<i>`, rank 0, world size 1,
tune false) and then sends a valid `report` every second with growing counters, as the hook
does. Before measuring, /metrics must show every one connected (looptune_job_hook_connected 1)
and no message rejected (looptune_messages_rejected_total 0); both are checked again at the end.
`--idle-http N` keeps N idle TCP connections to the /metrics port open during the measurement
(a helper process; the endpoint drops a client that sends no request within 5 s and the helper
reopens it at once), so the CPU share and the scrapes are measured with them open.

Every run is compared with the N=0 run of the same invocation (CPU x, RSS x), because the
machines are shared and noisy. Exit status: 0, or 1 when a daemon fails to start, 130 on
Ctrl-C. Daemons and dummies are always stopped (process groups, SIGTERM then SIGKILL); the
dummies also exit by themselves when their parent goes away.

    python benchmarks/daemon_overhead.py --seconds 20
    python benchmarks/daemon_overhead.py --procs 0,8 --workers-per-job 4 --interval 1.0
    python benchmarks/daemon_overhead.py --hooked --procs 0,64 --seconds 20 --idle-http 1000
"""
from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import platform
import re
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import yaml

REPO = Path(__file__).resolve().parent.parent
MIB = 1024 * 1024

sys.path.insert(0, str(REPO))      # this checkout's looptune, not an installed one
from looptune import protocol  # noqa: E402 - pure Python, after the path

GOAL_HOOKED_CPU_PERCENT = 5.0   # of one core, with 64 hooked jobs
GOAL_HOOKED_JOBS = 64

GOAL_CPU_PERCENT = 1.0      # of one core, with 8 watched jobs
GOAL_CPU_PROCS = 8
GOAL_RSS_MB = 50.0
GOAL_SCRAPE_MS = 10.0

# A dummy job: idles, starts `argv[2]` worker children, exits when its parent goes away.
JOB_CODE = """\
import os, subprocess, sys, time
parent = os.getppid()
worker = "import os, time\\np = os.getppid()\\nwhile os.getppid() == p: time.sleep(0.5)\\n"
kids = [subprocess.Popen([sys.executable, "-c", worker, "looptune-bench-worker"])
        for _ in range(int(sys.argv[2]))]
while os.getppid() == parent:
    time.sleep(0.5)
for k in kids:
    k.terminate()
"""

# A hooked dummy job: stdlib only. argv: socket path, run name, step_hist length, counter names
# (JSON), token (so the jobs pattern matches it too, as a real job's command line would).
# Connects (retrying until the daemon listens), says hello, reports every second with growing
# counters; reconnects if the daemon closes the connection; exits when its parent goes away.
HOOK_CODE = """\
import json, os, resource, socket, sys, time
path, run, nhist, names = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])
parent, pid = os.getppid(), os.getpid()
def line(msg):
    return json.dumps({"v": 1, **msg}, separators=(",", ":"), allow_nan=False).encode() + b"\\n"
hello = line({"type": "hello", "run": run, "rank": 0, "world_size": 1, "pid": pid, "tuners": [], "tune": False})
steps, wait, stepsec, hist, s = 0, 0.0, 0.0, [0] * nhist, None
while os.getppid() == parent:
    if s is None:
        try:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(5.0)
            s.connect(path)
            s.sendall(hello)
            got = b""
            while not got.endswith(b"\\n"):
                chunk = s.recv(65536)
                if not chunk:
                    raise OSError("closed")
                got += chunk
            if json.loads(got.splitlines()[0]).get("type") != "welcome":
                raise OSError(got[:200])
            s.setblocking(False)
        except (OSError, ValueError):
            s.close()
            s = None
            time.sleep(0.2)
            continue
    steps += 10
    wait += 0.05
    stepsec += 0.5
    hist[7] += 10
    counters = dict(zip(names, (steps * 32, steps, steps, wait, stepsec)))
    report = {"type": "report", "pid": pid, "world_size": 1, "counters": counters, "step_hist": hist,
              "knobs": {"num_workers": 2},
              "memory": {"max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024},
              "hook_errors": 0, "disabled": False}
    try:
        s.sendall(line(report))
        while True:          # drain replies (none expected: tune is false); b"" = closed
            if not s.recv(65536):
                raise OSError("closed")
    except BlockingIOError:
        pass
    except OSError:
        s.close()
        s = None
        continue
    time.sleep(1.0)
"""

# Idle HTTP clients: argv: port, count, stats file. Opens `count` TCP connections to the port,
# spread over the first 5 s, sends nothing; whenever the server drops one, opens another.
# Every 0.5 s writes "open reopened failed" to the stats file. Exits when its parent goes away.
IDLE_CODE = """\
import errno, os, selectors, socket, sys, time
port, n, stats = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
parent = os.getppid()
sel = selectors.DefaultSelector()
opened = reopened = failed = 0
def open_one():
    global failed
    s = socket.socket()
    s.setblocking(False)
    err = s.connect_ex(("127.0.0.1", port))
    if err not in (0, errno.EINPROGRESS):
        s.close()
        failed += 1
        return False
    sel.register(s, selectors.EVENT_READ)
    return True
start, next_write = time.monotonic(), 0.0
while os.getppid() == parent:
    now = time.monotonic()
    due = n if now - start >= 5.0 else int(n * (now - start) / 5.0)
    while opened < due:
        if not open_one():
            break
        opened += 1
    for key, _ in sel.select(timeout=0.05):
        s = key.fileobj
        try:
            data = s.recv(4096)
        except BlockingIOError:
            continue
        except OSError:
            data = b""
        if not data:
            sel.unregister(s)
            s.close()
            if open_one():
                reopened += 1
    if now >= next_write:
        next_write = now + 0.5
        tmp = stats + ".tmp"
        with open(tmp, "w") as f:
            f.write(f"{len(sel.get_map())} {reopened} {failed}")
        os.replace(tmp, stats)
"""


@dataclass
class Result:
    procs: int
    jobs: int
    seen_jobs: int
    seen_procs: int
    cpu_percent: float
    cpu_with_scrapes_percent: float
    rss_end_mb: float
    rss_peak_mb: float
    scrape_ms: list[float] = field(default_factory=list)
    scrape_bytes: int = 0
    scrape_errors: int = 0
    samples_in_cpu_window: float = 0.0
    hooked: int = 0                  # --hooked: jobs connected (before, after the measurement)
    hooked_end: int = 0
    rejected: int = 0                # looptune_messages_rejected_total, summed, at the end
    idle_open: list[int] = field(default_factory=list)   # --idle-http: open connections, each second
    idle_reopened: int = 0

    @property
    def p50(self) -> float:
        return statistics.median(self.scrape_ms) if self.scrape_ms else math.nan

    @property
    def p95(self) -> float:
        if not self.scrape_ms:
            return math.nan
        s = sorted(self.scrape_ms)
        return s[max(0, math.ceil(0.95 * len(s)) - 1)]   # nearest rank


class DaemonFailed(Exception):
    pass


# ---- child processes ----

_children: list[subprocess.Popen] = []


def _spawn(argv: list[str], **kw) -> subprocess.Popen:
    # own session: Ctrl-C in the terminal reaches only this script, which stops them in order
    p = subprocess.Popen(argv, start_new_session=True, stdin=subprocess.DEVNULL, **kw)
    _children.append(p)
    return p


def _stop(p: subprocess.Popen, grace: float = 5.0) -> None:
    """SIGTERM its process group, SIGKILL what is left. Until the leader is reaped its pid, and so
    the group id, cannot be reused, so both signals go out before the wait that reaps it."""
    if p.returncode is None:
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            try:
                if os.waitid(os.P_PID, p.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                    break
            except ChildProcessError:
                break
            time.sleep(0.05)
        try:   # leftovers: dummy workers, or a leader that ignored SIGTERM
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            p.wait(5.0)
        except subprocess.TimeoutExpired:
            pass
    if p in _children:
        _children.remove(p)


def stop_all() -> None:
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)   # a second Ctrl-C must not skip cleanup
    try:
        for p in reversed(list(_children)):
            _stop(p)
    finally:
        signal.signal(signal.SIGINT, old)


def start_dummies(n: int, per_job: int, token: str) -> list[subprocess.Popen]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("LOOPTUNE_RUN", "TORCHELASTIC_RUN_ID", "RANK", "WORLD_SIZE")}
    roots = []
    for i in range(n // per_job):
        roots.append(_spawn([sys.executable, "-c", JOB_CODE, token, str(per_job - 1)],
                            env={**env, "LOOPTUNE_RUN": f"bench{i}"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    return roots


def start_hooked(n: int, token: str, sock_path: Path) -> list[subprocess.Popen]:
    """n hooked dummy jobs, run bench-<token>-<i>, talking the protocol's field names."""
    nhist = str(len(protocol.STEP_BUCKETS) + 1)
    names = json.dumps(list(protocol.COUNTERS))
    env = {k: v for k, v in os.environ.items()
           if k not in ("LOOPTUNE_RUN", "TORCHELASTIC_RUN_ID", "RANK", "WORLD_SIZE", "LOOPTUNE_SOCKET")}
    return [_spawn([sys.executable, "-c", HOOK_CODE, str(sock_path), f"bench-{token}-{i}", nhist, names, token],
                   env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for i in range(n)]


def start_idle_http(port: int, n: int, stats: Path) -> subprocess.Popen:
    return _spawn([sys.executable, "-c", IDLE_CODE, str(port), str(n), str(stats)],
                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def read_idle_stats(stats: Path) -> tuple[int, int, int]:
    """(open, reopened, failed) as the idle-client helper last wrote them; zeros before its first."""
    try:
        a, b, c = stats.read_text().split()
        return int(a), int(b), int(c)
    except (OSError, ValueError):
        return 0, 0, 0


# ---- daemon ----

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_metrics(port: int, timeout: float = 5.0) -> bytes:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", "/metrics")
        resp = conn.getresponse()
        body = resp.read()
        if resp.status != 200:
            raise OSError(f"HTTP {resp.status}")
        return body
    finally:
        conn.close()


def count_jobs(body: bytes) -> tuple[int, int]:
    """(jobs in looptune_job_info, processes summed over looptune_job_processes)."""
    jobs = procs = 0
    for line in body.decode("utf-8", "replace").splitlines():
        if line.startswith("looptune_job_info{"):
            jobs += 1
        elif line.startswith("looptune_job_processes{"):
            procs += int(float(line.rsplit(" ", 1)[1]))
    return jobs, procs


_SAMPLE = re.compile(r'^(\w+)\{([^}]*)\} (\S+)$')


def hook_state(body: bytes, token: str) -> tuple[int, int]:
    """(this benchmark's hooked jobs with looptune_job_hook_connected 1, messages rejected in all)."""
    connected = rejected = 0
    for line in body.decode("utf-8", "replace").splitlines():
        m = _SAMPLE.match(line)
        if not m:
            continue
        name, labels, value = m.groups()
        if name == "looptune_job_hook_connected" and f'run="bench-{token}-' in labels and float(value) == 1.0:
            connected += 1
        elif name == "looptune_messages_rejected_total":
            rejected += int(float(value))
    return connected, rejected


def wait_hooked(p: subprocess.Popen, port: int, log: Path, n: int, token: str, timeout: float) -> int:
    """Until all n hooked dummies are connected with nothing rejected (else DaemonFailed: in hooked
    mode a job that cannot connect is the finding, not something to measure around)."""
    deadline = time.monotonic() + timeout
    state = (0, 0)
    while time.monotonic() < deadline:
        if p.poll() is not None:
            raise DaemonFailed(f"daemon exited with status {p.returncode}:\n{_tail(log)}")
        try:
            state = hook_state(get_metrics(port, timeout=2.0), token)
            if state[1]:
                break
            if state[0] == n:
                return n
        except OSError:
            pass
        time.sleep(0.2)
    raise DaemonFailed(f"after {timeout:.0f}s {state[0]} of {n} hooked jobs connected, {state[1]} messages "
                       f"rejected:\n{_tail(log)}")


def start_daemon(repo: Path, workdir: Path, interval: float, pattern: str, n: int) -> tuple[subprocess.Popen, int, Path]:
    cfg = workdir / f"daemon-{n}.yaml"
    cfg.write_text(yaml.safe_dump({"collectors": {"interval_seconds": interval},
                                   "jobs": {"match": [pattern]}}))
    port = free_port()
    log = workdir / f"daemon-{n}.log"
    env = {k: v for k, v in os.environ.items() if k != "LOOPTUNE_CONFIG"}
    with open(log, "wb") as f:
        p = _spawn([sys.executable, "-m", "looptune", "daemon", "--config", str(cfg),
                    "--listen", f"127.0.0.1:{port}", "--socket", str(workdir / f"looptune-{n}.sock")],
                   cwd=repo, env=env, stdout=f, stderr=subprocess.STDOUT)
    return p, port, log


def wait_ready(p: subprocess.Popen, port: int, log: Path, jobs: int, procs: int,
               timeout: float) -> tuple[int, int]:
    """Until /metrics answers (else DaemonFailed) and shows the dummies (else warn, go on)."""
    deadline = time.monotonic() + timeout
    answered, seen = False, (0, 0)
    while time.monotonic() < deadline:
        if p.poll() is not None:
            raise DaemonFailed(f"daemon exited with status {p.returncode}:\n{_tail(log)}")
        try:
            seen = count_jobs(get_metrics(port, timeout=2.0))
            answered = True
            if seen == (jobs, procs):
                return seen
        except OSError:
            pass
        time.sleep(0.2)
    if not answered:
        raise DaemonFailed(f"/metrics did not answer within {timeout:.0f}s:\n{_tail(log)}")
    print(f"warning: after {timeout:.0f}s /metrics shows {seen[0]} job(s) / {seen[1]} process(es), "
          f"expected {jobs} / {procs}; measuring anyway", file=sys.stderr)
    return seen


def _tail(log: Path, lines: int = 20) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# ---- measurement ----

def cpu_seconds(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return t.user + t.system


def measure(n: int, args: argparse.Namespace, workdir: Path, token: str) -> Result:
    pattern = rf"(^|\s){token}(\s|$)"
    jobs = n // args.workers_per_job
    if args.hooked:
        start_hooked(n, token, workdir / f"looptune-{n}.sock")
    else:
        start_dummies(n, args.workers_per_job, token)
    daemon, port, log = start_daemon(args.repo, workdir, args.interval, pattern, n)
    try:
        hooked = 0
        if args.hooked:
            hooked = wait_hooked(daemon, port, log, n, token, timeout=args.ready_timeout)
        # (hooked: the process-tree side of the same jobs, under the hooks' run and rank)
        seen = wait_ready(daemon, port, log, jobs, n, timeout=args.ready_timeout)
        idle_stats = workdir / f"idle-{n}.txt"
        if args.idle_http:
            start_idle_http(port, args.idle_http, idle_stats)
            deadline = time.monotonic() + 30.0
            while read_idle_stats(idle_stats)[0] < args.idle_http and time.monotonic() < deadline:
                time.sleep(0.2)
            opened = read_idle_stats(idle_stats)[0]
            if opened < args.idle_http:
                print(f"warning: only {opened} of {args.idle_http} idle HTTP connections open; measuring anyway",
                      file=sys.stderr)
        proc = psutil.Process(daemon.pid)
        time.sleep(args.interval)   # settle: one more sample after the dummies were all seen

        rss_peak = 0
        idle_open: list[int] = []

        def poll_rss() -> int:
            nonlocal rss_peak
            rss = proc.memory_info().rss
            rss_peak = max(rss_peak, rss)
            if args.idle_http:
                idle_open.append(read_idle_stats(idle_stats)[0])
            return rss

        reopened0 = read_idle_stats(idle_stats)[1]

        # part 1: no scrapes, CPU share
        cpu_window = args.seconds * args.cpu_fraction
        t0, c0 = time.monotonic(), cpu_seconds(proc)
        end = t0 + cpu_window
        next_poll = t0
        while True:
            now = time.monotonic()
            if now >= next_poll:
                poll_rss()
                next_poll += 1.0
            if now >= end:
                break
            time.sleep(max(0.0, min(next_poll, end) - time.monotonic()))
        t1, c1 = time.monotonic(), cpu_seconds(proc)
        if daemon.poll() is not None:
            raise DaemonFailed(f"daemon died while measured:\n{_tail(log)}")

        # part 2: scrapes evenly spread (and RSS each second)
        scrape_window = args.seconds - cpu_window
        period = scrape_window / max(1, args.scrapes)
        lat, sizes, errors = [], [], 0
        t2, c2 = time.monotonic(), cpu_seconds(proc)
        next_poll = t2
        for i in range(args.scrapes):
            at = t2 + (i + 0.5) * period
            while True:
                now = time.monotonic()
                if now >= next_poll:
                    poll_rss()
                    next_poll += 1.0
                if now >= at:
                    break
                time.sleep(max(0.0, min(at, next_poll) - now))
            s = time.perf_counter()
            try:
                body = get_metrics(port)
            except OSError:
                errors += 1
                continue
            lat.append((time.perf_counter() - s) * 1000.0)
            sizes.append(len(body))
        while time.monotonic() < t2 + scrape_window:
            time.sleep(0.01)
        t3, c3 = time.monotonic(), cpu_seconds(proc)
        rss_end = poll_rss()
        reopened = read_idle_stats(idle_stats)[1] - reopened0
        hooked_end, rejected = 0, 0
        try:
            hooked_end, rejected = hook_state(get_metrics(port), token)
        except OSError:
            rejected = -1
        return Result(procs=n, jobs=jobs, seen_jobs=seen[0], seen_procs=seen[1],
                      cpu_percent=100.0 * (c1 - c0) / (t1 - t0),
                      cpu_with_scrapes_percent=100.0 * (c3 - c2) / (t3 - t2),
                      rss_end_mb=rss_end / MIB, rss_peak_mb=rss_peak / MIB,
                      scrape_ms=lat, scrape_bytes=int(statistics.median(sizes)) if sizes else 0,
                      scrape_errors=errors, samples_in_cpu_window=(t1 - t0) / args.interval,
                      hooked=hooked, hooked_end=hooked_end, rejected=rejected,
                      idle_open=idle_open, idle_reopened=reopened)
    finally:
        stop_all()


# ---- report ----

def _ratio(value: float, base: float | None) -> str:
    if base is None or base <= 0 or math.isnan(value):
        return "n/a"
    return f"{value / base:.2f}×"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def report(results: list[Result], args: argparse.Namespace, load_before: tuple[float, float, float]) -> str:
    base = next((r for r in results if r.procs == 0), None)
    out = ["| watched processes | daemon CPU (% of one core) | CPU vs 0 procs | RSS MB (end, peak) "
           "| RSS vs 0 procs | scrape p50 ms | scrape p95 ms | scrape bytes |",
           "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        if args.hooked:
            layout = f"{r.jobs} hooked job{'s' if r.jobs != 1 else ''}, {r.hooked_end} connected" \
                if r.procs else "none"
        else:
            layout = f"{r.jobs} job{'s' if r.jobs != 1 else ''} × {args.workers_per_job} proc" if r.procs else "none"
        seen = "" if (r.seen_jobs, r.seen_procs) == (r.jobs, r.procs) else \
            f" ⚠ seen {r.seen_jobs} jobs/{r.seen_procs} procs"
        if args.hooked and (r.hooked_end != r.procs or r.rejected):
            seen += f" ⚠ {r.hooked_end}/{r.procs} connected at the end, {r.rejected} rejected"
        out.append(
            f"| {r.procs} ({layout}){seen} | {r.cpu_percent:.2f} | "
            f"{_ratio(r.cpu_percent, base.cpu_percent if base else None)} | "
            f"{r.rss_end_mb:.1f} (peak {r.rss_peak_mb:.1f}) | "
            f"{_ratio(r.rss_end_mb, base.rss_end_mb if base else None)} | "
            f"{r.p50:.2f} | {r.p95:.2f} | {r.scrape_bytes} |")
    out.append("")

    goal8 = next((r for r in results if r.procs == GOAL_CPU_PROCS), None)
    cpu_goal = (f"{'PASS' if goal8.cpu_percent < GOAL_CPU_PERCENT else 'FAIL'} ({goal8.cpu_percent:.2f}%)"
                if goal8 else f"n/a (no {GOAL_CPU_PROCS}-process run)")
    rss_max = max(r.rss_peak_mb for r in results)
    p95s = [r.p95 for r in results if r.scrape_ms]
    p95_max = max(p95s) if p95s else math.nan
    scrape_goal = (f"{'PASS' if p95_max < GOAL_SCRAPE_MS else 'FAIL'} (worst p95 {p95_max:.2f} ms)"
                   if p95s else "n/a (no scrape answered)")
    if args.hooked:
        g = next((r for r in results if r.procs == GOAL_HOOKED_JOBS), None)
        cpu_goal = (f"{'PASS' if g.cpu_percent < GOAL_HOOKED_CPU_PERCENT else 'FAIL'} ({g.cpu_percent:.2f}%)"
                    if g else f"n/a (no {GOAL_HOOKED_JOBS}-job run)")
        conn_goal = (f"{'PASS' if g.hooked == g.hooked_end == g.procs and g.rejected == 0 else 'FAIL'} "
                     f"({g.hooked_end}/{g.procs} connected at the end, {g.rejected} messages rejected)"
                     if g else "n/a")
        out.append(f"Goals: all {GOAL_HOOKED_JOBS} hooked jobs of one user connected: {conn_goal}; "
                   f"CPU < {GOAL_HOOKED_CPU_PERCENT:g}% of a core with them: {cpu_goal}; "
                   f"RSS < {GOAL_RSS_MB:g} MB: {'PASS' if rss_max < GOAL_RSS_MB else 'FAIL'} "
                   f"(worst peak {rss_max:.1f} MB); "
                   f"scrape < {GOAL_SCRAPE_MS:g} ms: {scrape_goal}.")
    else:
        out.append(f"Goals: CPU < {GOAL_CPU_PERCENT:g}% of a core with {GOAL_CPU_PROCS} watched processes: {cpu_goal}; "
                   f"RSS < {GOAL_RSS_MB:g} MB: {'PASS' if rss_max < GOAL_RSS_MB else 'FAIL'} "
                   f"(worst peak {rss_max:.1f} MB); "
                   f"scrape < {GOAL_SCRAPE_MS:g} ms: {scrape_goal}.")
    out.append("")
    cpu_win = args.seconds * args.cpu_fraction
    notes = [
        f"Sampling interval {args.interval:g} s (all collectors: host, gpu, jobs; gpu reports itself down "
        f"where no NVML is present). {args.seconds:g} s per case after the daemon showed all dummies.",
        f"CPU share: daemon user+system CPU time / wall time over the first {cpu_win:g} s with no scrapes "
        f"(~{cpu_win / args.interval:.0f} samples; psutil counts clock ticks, so the resolution is "
        f"{100.0 / os.sysconf('SC_CLK_TCK') / cpu_win:.2f}% of a core). Including the {args.scrapes} scrapes of the remaining "
        f"{args.seconds - cpu_win:g} s it was: "
        + ", ".join(f"{r.procs} procs {r.cpu_with_scrapes_percent:.2f}%" for r in results) + ".",
        f"Scrapes: {args.scrapes} sequential GETs of /metrics, evenly spread (one every "
        f"{(args.seconds - cpu_win) / max(1, args.scrapes) * 1000:.0f} ms), new connection each, timed to the "
        f"last body byte; p95 is nearest-rank. Scrape bytes: median body size."
        + ("".join(f" {r.procs} procs: {r.scrape_errors} failed." for r in results if r.scrape_errors)),
        "RSS: MB = 2^20 bytes, polled every second; end = at the end of the window.",
        ("Hooked jobs: one process each (`python -c ... looptune-bench-job-<pid>`, also matched by the "
         "jobs pattern), connected to the daemon's socket: hello (tune false), then a report every second "
         "with growing counters, a step histogram, knobs and max RSS; checked before measuring: every "
         "job's looptune_job_hook_connected is 1 and looptune_messages_rejected_total is 0."
         if args.hooked else
         "Watched processes: idle dummy processes (`python -c ... looptune-bench-job-<pid>`), "
         + ("each a job of its own." if args.workers_per_job == 1 else
            f"{args.workers_per_job} per job: a matching launcher and {args.workers_per_job - 1} "
            f"non-matching children.")),
        *([f"Idle HTTP clients: {args.idle_http} TCP connections to the /metrics port that send nothing, "
           f"held by a helper process over the whole window (CPU part and scrapes); the endpoint drops each "
           f"after 5 s and the helper reopens it at once. Open, polled each second (mean, min): "
           + ", ".join(f"{r.procs} procs {statistics.mean(r.idle_open):.0f} ({min(r.idle_open)}), "
                       f"{r.idle_reopened} reopened" for r in results if r.idle_open) + "."]
          if args.idle_http else []),
        f"Machine: {psutil.cpu_count()} logical CPUs ({psutil.cpu_count(logical=False)} physical), "
        f"{_cpu_model()}, {psutil.virtual_memory().total / 2**30:.1f} GiB; Python "
        f"{platform.python_version()} ({sys.executable}); {platform.system()} {platform.release()}; "
        f"{len(psutil.pids())} processes on the host; daemon from {args.repo}; load average before "
        f"{load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}, after "
        + " ".join(f"{x:.2f}" for x in os.getloadavg()) + ".",
    ]
    out.extend(f"- {n}" for n in notes)
    return "\n".join(out)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--procs", default="0,8,32", help="watched process counts, comma separated (default 0,8,32)")
    p.add_argument("--seconds", type=float, default=30.0, help="measured seconds per case (default 30)")
    p.add_argument("--interval", type=float, default=1.0, help="collectors.interval_seconds (default 1.0)")
    p.add_argument("--scrapes", type=int, default=50, help="GETs of /metrics per case (default 50)")
    p.add_argument("--cpu-fraction", type=float, default=0.6,
                   help="part of each window measured for CPU without scrapes (default 0.6)")
    p.add_argument("--workers-per-job", type=int, default=1,
                   help="processes per dummy job: 1 launcher + W-1 children (default 1: every process a job)")
    p.add_argument("--repo", type=Path, default=REPO,
                   help="source tree the daemon runs from (cwd of `python -m looptune`; default: this repo)")
    p.add_argument("--ready-timeout", type=float, default=30.0,
                   help="seconds to wait for /metrics and the dummies (default 30)")
    p.add_argument("--hooked", action="store_true",
                   help="each dummy is a hooked job: connects to the daemon's socket, hello, a report every second")
    p.add_argument("--idle-http", type=int, default=0, metavar="N",
                   help="keep N idle TCP connections to /metrics open while measuring (default 0)")
    args = p.parse_args(argv)
    try:
        args.procs = [int(x) for x in args.procs.split(",") if x.strip()]
    except ValueError:
        p.error("--procs: comma separated integers")
    if any(n < 0 or n % args.workers_per_job for n in args.procs) or args.workers_per_job < 1:
        p.error("--procs: each count must be >= 0 and a multiple of --workers-per-job")
    if args.hooked and args.workers_per_job != 1:
        p.error("--hooked: one process per job (--workers-per-job 1)")
    if args.idle_http < 0:
        p.error("--idle-http must be >= 0")
    if not 0 < args.cpu_fraction < 1 or args.seconds <= 0 or args.scrapes < 1:
        p.error("--cpu-fraction must be in (0, 1), --seconds > 0, --scrapes >= 1")
    return args


def _sigterm(*_: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGINT, signal.default_int_handler)   # even where started with SIGINT ignored
    signal.signal(signal.SIGTERM, _sigterm)
    signal.signal(signal.SIGHUP, _sigterm)
    token = f"looptune-bench-job-{os.getpid()}"
    load_before = os.getloadavg()
    results: list[Result] = []
    try:
        with tempfile.TemporaryDirectory(prefix="looptune-bench-") as tmp:
            for n in args.procs:
                print(f"measuring {n} watched processes for {args.seconds:g} s ...", file=sys.stderr, flush=True)
                results.append(measure(n, args, Path(tmp), token))
    except DaemonFailed as exc:
        stop_all()
        print(f"error: the daemon failed to start: {exc}", file=sys.stderr)
        if results:
            print(report(results, args, load_before))
        return 1
    except KeyboardInterrupt:
        stop_all()
        print("interrupted; all benchmark processes stopped", file=sys.stderr)
        if results:
            print(report(results, args, load_before))
        return 130
    finally:
        stop_all()
    print(report(results, args, load_before))
    return 0


if __name__ == "__main__":
    sys.exit(main())
