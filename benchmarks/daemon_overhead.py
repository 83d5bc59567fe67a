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

Every run is compared with the N=0 run of the same invocation (CPU x, RSS x), because the
machines are shared and noisy. Exit status: 0, or 1 when a daemon fails to start, 130 on
Ctrl-C. Daemons and dummies are always stopped (process groups, SIGTERM then SIGKILL); the
dummies also exit by themselves when their parent goes away.

    python benchmarks/daemon_overhead.py --seconds 20
    python benchmarks/daemon_overhead.py --procs 0,8 --workers-per-job 4 --interval 1.0
"""
from __future__ import annotations

import argparse
import http.client
import math
import os
import platform
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
    start_dummies(n, args.workers_per_job, token)
    daemon, port, log = start_daemon(args.repo, workdir, args.interval, pattern, n)
    try:
        seen = wait_ready(daemon, port, log, jobs, n, timeout=args.ready_timeout)
        proc = psutil.Process(daemon.pid)
        time.sleep(args.interval)   # settle: one more sample after the dummies were all seen

        rss_peak = 0

        def poll_rss() -> int:
            nonlocal rss_peak
            rss = proc.memory_info().rss
            rss_peak = max(rss_peak, rss)
            return rss

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
        return Result(procs=n, jobs=jobs, seen_jobs=seen[0], seen_procs=seen[1],
                      cpu_percent=100.0 * (c1 - c0) / (t1 - t0),
                      cpu_with_scrapes_percent=100.0 * (c3 - c2) / (t3 - t2),
                      rss_end_mb=rss_end / MIB, rss_peak_mb=rss_peak / MIB,
                      scrape_ms=lat, scrape_bytes=int(statistics.median(sizes)) if sizes else 0,
                      scrape_errors=errors, samples_in_cpu_window=(t1 - t0) / args.interval)
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
        layout = f"{r.jobs} job{'s' if r.jobs != 1 else ''} × {args.workers_per_job} proc" if r.procs else "none"
        seen = "" if (r.seen_jobs, r.seen_procs) == (r.jobs, r.procs) else \
            f" ⚠ seen {r.seen_jobs} jobs/{r.seen_procs} procs"
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
        "Watched processes: idle dummy processes (`python -c ... looptune-bench-job-<pid>`), "
        + ("each a job of its own." if args.workers_per_job == 1 else
           f"{args.workers_per_job} per job: a matching launcher and {args.workers_per_job - 1} "
           f"non-matching children."),
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
    args = p.parse_args(argv)
    try:
        args.procs = [int(x) for x in args.procs.split(",") if x.strip()]
    except ValueError:
        p.error("--procs: comma separated integers")
    if any(n < 0 or n % args.workers_per_job for n in args.procs) or args.workers_per_job < 1:
        p.error("--procs: each count must be >= 0 and a multiple of --workers-per-job")
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
