"""`looptune demo`: watch looptune fix an input-bound training loop, in one command.

It starts a real looptune daemon inside this process (daemon.service.Daemon: its /metrics on a
free loopback port, its hook socket in a temporary directory, built-in defaults otherwise, no
remembered settings), then trains a small model from a DataLoader whose items each wait 2 ms,
like reads from remote storage, starting from DataLoader's default num_workers=0. Each step
also sleeps 3 ms, standing in for the accelerator's share of a step. The training loop has the
control hook (`with Hook(...) as hook: loader = hook.watch(loader) ... hook.step()`), which
finds the daemon on its socket; the daemon's engine sees the loop waiting for data and climbs
num_workers, keeping each change only if it gains, while the epoch goes on without losing or
repeating a sample.

A live line shows, every second: samples/s, the share of the step time spent waiting for
data, num_workers, the daemon's bottleneck verdict and the trial in progress. At the end: a
before/after table (first 5 s against the last 10 s) and the decisions taken; the last line
says plainly whether tuning helped (see `outcome_line`: no faster, or within NOISE, is "did not
help"). Everything is stopped on the way out (loader workers, hook, daemon) and the temporary
directory removed.

Needs only this package and torch (`pip install 'looptune[torch]'`); torch is imported when
the demo runs, never when this module is imported.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass
from typing import Any, Sequence

RUN = "looptune-demo"
BATCH = 16
ITEMS = 16384              # an epoch lasts ~40 s at num_workers=0: the changes happen mid-epoch
FEATURES = 32
CLASSES = 4
READ_SECONDS = 0.002         # per item: a read from remote storage
ACCELERATOR_SECONDS = 0.003  # per step: stands for the GPU's share of a step
BEFORE_SECONDS = 5.0
AFTER_SECONDS = 10.0
# Two runs of the same untuned loop on a shared machine differ by several percent in samples/s;
# an end-to-start ratio within this of 1 is no evidence that tuning helped.
NOISE = 0.10


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seconds", type=float, default=60.0,
                   help="how long the training loop runs (default 60; at least 15)")
    p.add_argument("--listen", default="127.0.0.1:0",
                   help="HOST:PORT for the demo daemon's /metrics (default: a free loopback port)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="looptune demo", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run(args.seconds, listen=args.listen)


# ---- the training job ----

class RemoteReads:
    """A map-style dataset whose items each wait READ_SECONDS, as reads from object storage would.

    Content is a fixed function of the index. A plain class (DataLoader takes any object with
    __getitem__ and __len__), so this module imports without torch and pickles for `spawn`."""

    def __init__(self, n: int = ITEMS) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[Any, int]:
        import torch
        time.sleep(READ_SECONDS)
        g = torch.Generator().manual_seed(int(i))
        return torch.randn(FEATURES, generator=g), int(i) % CLASSES


@dataclass
class Tick:
    t: float               # seconds since the training loop started
    samples: float
    data_wait: float
    step_seconds: float
    workers: Any


def _share(a: Tick, b: Tick) -> float | None:
    step = b.step_seconds - a.step_seconds
    return (b.data_wait - a.data_wait) / step if step > 0 else None


def _rate(a: Tick, b: Tick) -> float | None:
    return (b.samples - a.samples) / (b.t - a.t) if b.t > a.t else None


def _at(ticks: list[Tick], t: float) -> Tick:
    """The tick nearest to t."""
    return min(ticks, key=lambda k: abs(k.t - t))


def _fmt_rate(v: float | None) -> str:
    return "-" if v is None else f"{v:,.0f}"


def _fmt_share(v: float | None) -> str:
    return "-" if v is None else f"{min(1.0, max(0.0, v)):.0%}"


def outcome_line(start_rate: float | None, end_rate: float | None, noise: float = NOISE) -> str:
    """The demo's last line: whether tuning helped, from samples/s at the start and at the end.

    "did not help" when the end is no faster than the start, or faster by no more than `noise`
    (a ratio, 0.10 = 10%); "helped" only beyond that."""
    if not start_rate or not end_rate or start_rate <= 0 or end_rate <= 0:
        return "result: not measured (no samples in the first or the last window)"
    ratio = end_rate / start_rate
    rates = f"{_fmt_rate(start_rate)} -> {_fmt_rate(end_rate)} samples/s, {ratio:.2f}x"
    if ratio <= 1.0:
        return f"result: tuning did not help: the run ended no faster than it started ({rates})"
    if ratio <= 1.0 + noise:
        return (f"result: tuning did not help: the end is within noise of the start ({rates}; "
                f"a gain counts above {1.0 + noise:.2f}x)")
    return f"result: tuning helped: the run ended {ratio:.1f}x faster than it started ({rates})"


def _workers_between(ticks: list[Tick], a: float, b: float) -> str:
    seen: list[Any] = []
    for k in ticks:
        if a - 1e-9 <= k.t <= b + 1e-9 and (not seen or seen[-1] != k.workers):
            seen.append(k.workers)
    return " -> ".join(str(v) for v in seen) if seen else "-"


# ---- the daemon ----

class _DemoDaemon:
    """daemon.service.Daemon on loopback and a temporary socket, its main loop in a thread."""

    def __init__(self, workdir: str, listen: str) -> None:
        from looptune.daemon import config as cfg
        from looptune.daemon.service import Daemon
        config = cfg.Config()
        config.daemon.log_level = "warning"          # the live line owns the terminal
        config.tuners.state_file = os.path.join(workdir, "best.json")   # a fresh start: nothing remembered
        environ = {k: v for k, v in os.environ.items()
                   if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "RUNTIME_DIRECTORY")}
        self.config = config
        self.daemon = Daemon(config, listen=listen, socket_path=os.path.join(workdir, "looptune.sock"),
                             environ=environ)
        self._thread: threading.Thread | None = None
        self._stopped = False

    def start(self) -> None:
        self.daemon.start()
        self._thread = threading.Thread(target=self.daemon.run, name="looptune-demo-daemon", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        host, port = self.daemon.address or ("127.0.0.1", 0)
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{port}/metrics"

    def stop(self) -> None:
        """Stop the main loop (which shuts the daemon down); safe to call twice."""
        if self._stopped:
            return
        self._stopped = True
        if self._thread is not None:
            self.daemon.request_stop()
            self._thread.join(10)
            self._thread = None
        else:
            self.daemon.shutdown()    # start() failed part of the way: samplers may be running

    def verdict_and_trial(self, key: tuple[str, int]) -> tuple[str, str]:
        eng = self.daemon.engine
        if eng is None:
            return "-", ""
        try:
            job = eng.jobs.get(key)
        except RuntimeError:       # the engine's dict changed under us: next second
            return "-", ""
        if job is None:
            return "-", ""
        t = job.trial
        verdict = job.verdict if job.windows else "-"      # no full window judged yet
        trial = f"trial {t.proposal.knob} {t.old} -> {t.proposal.value} ({t.phase})" if t is not None else ""
        return verdict, trial

    def history(self, key: tuple[str, int]) -> list[dict[str, Any]]:
        eng = self.daemon.engine
        job = eng.jobs.get(key) if eng is not None else None
        return [dict(h) for h in job.history] if job is not None else []


def _scrape(url: str) -> list[str]:
    """The lines of /metrics that show this demo's job and the tuner's decisions."""
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            text = r.read().decode("utf-8", "replace")
    except OSError as exc:
        return [f"(could not read {url}: {exc})"]
    keep = ("looptune_tuner_decisions_total{", "looptune_job_knob{", "looptune_job_bottleneck{",
            "looptune_job_samples_total{")
    return [line for line in text.splitlines()
            if line.startswith(keep) and f'run="{RUN}"' in line
            and not (line.startswith("looptune_job_bottleneck{") and line.endswith(" 0.0"))]


def _stop_workers(watched: Any) -> None:
    it = getattr(watched, "it", None)        # tuners.hook.actuators.loader.WatchedLoader: the running iterator
    if it is not None:
        watched.it = None
        stop = getattr(it, "_shutdown_workers", None)
        if stop is not None:
            stop()


# ---- the demo ----

def run(seconds: float = 60.0, listen: str = "127.0.0.1:0", out: Any = None) -> int:
    out = out or sys.stdout
    if seconds < BEFORE_SECONDS + AFTER_SECONDS:
        print(f"looptune demo: --seconds must be at least {BEFORE_SECONDS + AFTER_SECONDS:g}", file=sys.stderr)
        return 2
    try:
        import torch
        from torch.utils.data import DataLoader
    except ImportError:
        print("looptune demo needs torch: pip install 'looptune[torch]' (CPU is enough)", file=sys.stderr)
        return 1
    import logging
    import warnings

    from looptune.tuners.hook import Hook
    logging.getLogger("looptune").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*worker processes in total.*")

    tty = out.isatty() if hasattr(out, "isatty") else False
    workdir = tempfile.mkdtemp(prefix="looptune-demo-")
    demo: _DemoDaemon | None = None
    hook: Any = None
    watched: Any = None
    interrupted = False
    status = 0
    try:
        demo = _DemoDaemon(workdir, listen)
        try:
            demo.start()
        except Exception as exc:  # noqa: BLE001 - a busy --listen port, say
            print(f"looptune demo: cannot start the daemon: {exc}", file=sys.stderr)
            return 1
        print(f"looptune demo: daemon in this process, /metrics on {demo.url}, hook socket "
              f"{demo.daemon.socket_path}", file=out)
        print(f"training a small model for {seconds:g} s from a DataLoader whose items each wait "
              f"{READ_SECONDS * 1e3:g} ms (remote reads), batch {BATCH}, num_workers=0 (the default); "
              f"each step also waits {ACCELERATOR_SECONDS * 1e3:g} ms for a stand-in accelerator", file=out)
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(FEATURES, 64), torch.nn.ReLU(), torch.nn.Linear(64, CLASSES))
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        loss_fn = torch.nn.CrossEntropyLoss()
        gen = torch.Generator()
        gen.manual_seed(0)
        loader = DataLoader(RemoteReads(), batch_size=BATCH, shuffle=True, generator=gen, num_workers=0)

        hook = Hook(run=RUN, socket=demo.daemon.socket_path, tune=["workers"], config=demo.config)
        if hook.mode != "daemon":
            print("looptune demo: the hook did not reach the demo daemon; it tunes embedded instead",
                  file=out)
        watched = hook.watch(loader)
        key = (RUN, 0)
        t0 = time.perf_counter()
        t0_wall = time.time()
        ticks = [Tick(0.0, 0, 0.0, 0.0, hook.knobs.get("num_workers"))]
        next_tick = 1.0
        width = 0
        loss_v = float("nan")
        done = False
        try:
            while not done:
                for x, y in watched:
                    loss = loss_fn(model(x), y)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    time.sleep(ACCELERATOR_SECONDS)
                    hook.step()
                    now = time.perf_counter() - t0
                    if now < next_tick:
                        continue
                    next_tick = int(now) + 1.0
                    c = hook.counters
                    tick = Tick(now, c["samples"], c["data_wait_seconds"], c["step_seconds"],
                                hook.knobs.get("num_workers"))
                    prev = ticks[-1]
                    ticks.append(tick)
                    loss_v = loss.item()
                    verdict, trial = demo.verdict_and_trial(key) if hook.mode == "daemon" else ("-", "")
                    line = (f"{now:4.0f}s  {_fmt_rate(_rate(prev, tick)):>6} samples/s  data wait "
                            f"{_fmt_share(_share(prev, tick)):>4}  num_workers {tick.workers!s:>2}  "
                            f"bottleneck {verdict:<5}  loss {loss_v:.3f}  {trial}")
                    if tty:
                        out.write("\r" + line.ljust(width))
                        width = len(line)
                    else:
                        out.write(line + "\n")
                    out.flush()
                    if now >= seconds:
                        done = True
                        break
        except KeyboardInterrupt:
            interrupted = True
            status = 130
        if tty:
            out.write("\n")
        _stop_workers(watched)
        end = ticks[-1]
        metrics = _scrape(demo.url)
        history = demo.history(key)
        decisions = list(hook.decisions)
        hook.close()
        if len(ticks) < 2:
            print("looptune demo: stopped before the first second", file=out)
            return status
        before_a, before_b = ticks[0], _at(ticks, BEFORE_SECONDS)
        after_a, after_b = _at(ticks, end.t - AFTER_SECONDS), end
        r0, r1 = _rate(before_a, before_b), _rate(after_a, after_b)
        gain = f"{r1 / r0:.1f}x" if r0 and r1 else ""
        print("", file=out)
        print(f"| {'':<15} | first {before_b.t - before_a.t:.0f} s | last {after_b.t - after_a.t:.0f} s | change |",
              file=out)
        print("|---|---|---|---|", file=out)
        print(f"| samples/s       | {_fmt_rate(r0)} | {_fmt_rate(r1)} | {gain} |", file=out)
        print(f"| data-wait share | {_fmt_share(_share(before_a, before_b))} | "
              f"{_fmt_share(_share(after_a, after_b))} | |", file=out)
        print(f"| num_workers     | {_workers_between(ticks, before_a.t, before_b.t)} | "
              f"{_workers_between(ticks, after_a.t, after_b.t)} | |", file=out)
        print("", file=out)
        print(_decisions_table(decisions, history, t0_wall), file=out)
        print("", file=out)
        print(f"/metrics was served at {demo.url} (this demo's job, before it stopped):", file=out)
        for line in metrics:
            print(f"  {line}", file=out)
        demo.stop()
        print(_cleanup_check(), file=out)
        if interrupted:
            print("(interrupted)", file=out)
        print(outcome_line(r0, r1), file=out)
        return status
    finally:
        if watched is not None:
            _stop_workers(watched)
        if hook is not None:
            hook.close()
        if demo is not None:
            demo.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def _cleanup_check(timeout: float = 10.0) -> str:
    """Loader workers exit on their own once shut down; wait for them, and say so."""
    try:
        import psutil
    except ImportError:
        return "cleaned up: daemon stopped"
    me = psutil.Process()
    deadline = time.monotonic() + timeout
    while me.children(recursive=True) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = me.children(recursive=True)
    if not left:
        return "cleaned up: daemon stopped, no worker process left"
    for child in left:          # ours: the demo's own loader workers
        try:
            child.terminate()
        except psutil.Error:
            pass
    return f"cleaned up: daemon stopped; {len(left)} worker process(es) were left and are terminated"


def _decisions_table(decisions: list[Any], history: list[dict[str, Any]], t0_wall: float) -> str:
    """hook.decisions, each trial joined with what the engine made of it (kept, rolled back)."""
    if not decisions:
        return "no decisions were taken (the loop was not input-bound long enough)"
    lines = ["decisions (from hook.decisions; result: what the daemon's engine made of the trial):",
             "| at | knob | old | new | outcome | result | reason |", "|---|---|---|---|---|---|---|"]
    trials = iter(history)
    for d in decisions:
        if not d.trial:             # a roll back, or the confirmation that settles a kept trial
            result = ""
        else:
            h = next(trials, None)
            if h is None:
                result = "in trial when the demo ended"
            else:
                gain = h.get("gain")
                result = h["outcome"] + (f" ({gain:+.0%})" if isinstance(gain, (int, float)) else "")
        lines.append(f"| {d.time - t0_wall:.0f} s | {d.knob} | {d.old} | {d.new} | {d.outcome} | {result} | "
                     f"{d.reason} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
