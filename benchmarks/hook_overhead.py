#!/usr/bin/env python3
"""Cost of the in-process looptune hook on the training thread, in one process.

Three measurements, each repeated `--repeat` times (default 7) with the baseline and the hooked
variant interleaved (their order alternates between repeats, so drift hits both alike) and the
garbage collector disabled inside the timed loops:

1. `hook.step()` against a no-op Python method call (`def step(self): pass`), in ns per call,
   over `--calls` calls (default 1e6) per run. Both loops have the same shape (a bound method
   called from `for _ in itertools.repeat(None, n)`), so the difference is the hook's own cost.
   Target: at most 1 us (1000 ns) more than the no-op call.
2. The loader wrapper per batch: iterating a plain list of `--batches` (default 1e5) pre-made
   torch tensors of shape (32, 4) directly vs through `hook.watch(list)`; also with batches as
   a tuple (x, y) and as a dict {"x": x, "y": y} (the wrapper counts samples per batch shape).
3. A realistic check: a tiny CPU training loop (nn.Linear(32, 8), SGD, MSE, batch 32,
   `--train-steps` (default 2000) steps from a pre-made list of tensors) without and with the
   hook (`hook.watch(data)` + `hook.step()`): steps/s of each and the ratio hook/baseline.
   The two loops run alternately in chunks of `--chunk` steps (default 50, a few ms), one
   model, so that load from other processes hits both alike; whole runs one after the other
   showed a few % apart even when both were the plain loop.
   torch runs with `--threads` intra-op threads (default 1): a 32x8 layer gains nothing from
   more, and on a small shared machine OpenMP threads competing for cores turn a ~150 us step
   into milliseconds at random, which would drown the hook's microsecond in noise.

The hook runs embedded with no daemon (socket /nonexistent/looptune.sock, report interval
60 s), so its background thread only retries the missing socket now and then and the
training thread does what it does in any job.

The table is wall-clock (time.perf_counter_ns): "median (min ...)" ns per call/batch, and the
median of the per-repeat paired differences. Every timed run also reads the thread's CPU time
(time.thread_time_ns): the "CPU time" lines give the same differences without the time the
thread spent preempted, and "CPU share" (thread time / wall time) says how much of a core the
runs got; where a row's runs got under 90 % its verdict cell adds the CPU-time verdict. On a
machine busy with other work (load average above the CPU count) wall figures grow
with the run's length, so the slower hooked loop is inflated more in absolute ns; the CPU-time
figures are then the hook's own cost. The per-call/per-batch figures come from hot loops and
are a floor: in a real loop the hook's code and data are cold again after each step's torch
work, which the training loop's per-step difference includes. The training-loop line gives the median of the per-repeat
ratios and, because a loaded machine slows single runs at random, also the ratio of the best
runs.

After each measurement the hook must still be on, with no new error and with exactly the
steps/batches it was given counted; otherwise the row says INVALID (a hook that turned itself
off is cheap for the wrong reason). Exit status: 0 (also when the target is missed: this is a
measurement, not a gate); 2 when a figure is INVALID.

    python benchmarks/hook_overhead.py
    python benchmarks/hook_overhead.py --quick
    python benchmarks/hook_overhead.py --calls 2000000 --repeat 11
"""
from __future__ import annotations

import argparse
import gc
import itertools
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, NamedTuple

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from looptune.tuners.hook import Hook  # noqa: E402

TARGET_STEP_NS = 1000.0
BUSY_SHARE = 0.9        # runs that got less of a core than this were preempted: wall figures inflated
_wall = time.perf_counter_ns
_cpu = time.thread_time_ns
_repeat = itertools.repeat
_median = statistics.median


class NoOp:
    def step(self) -> None:
        pass


class Timing(NamedTuple):
    wall: float     # ns per call/batch (or per step)
    cpu: float      # the same in this thread's CPU time


@dataclass
class Row:
    name: str
    target_ns: float | None = None
    base: list[Timing] = field(default_factory=list)      # one per repeat
    hook: list[Timing] = field(default_factory=list)
    invalid: str = ""      # why the hooked figures do not measure the hook's normal path

    def diff(self, clock: str = "wall") -> float:
        return _median([getattr(h, clock) - getattr(b, clock) for b, h in zip(self.base, self.hook)])

    def values(self, which: str, clock: str = "wall") -> list[float]:
        return [getattr(t, clock) for t in getattr(self, which)]

    def passes(self, clock: str = "wall") -> bool:
        return self.target_ns is None or self.diff(clock) <= self.target_ns

    @property
    def share(self) -> float:
        """Median CPU time / wall time of this row's runs: below BUSY_SHARE others took the core."""
        return cpu_share(self.base + self.hook)

    @property
    def verdict(self) -> str:
        if self.invalid:
            return f"INVALID ({self.invalid})"
        if self.target_ns is None:
            return "—"
        verdict = "PASS" if self.passes() else "FAIL"
        if self.share < BUSY_SHARE:
            verdict += (f" (busy machine, {self.share:.0%} of a core: CPU time {self.diff('cpu'):+.1f} ns "
                        f"{'PASS' if self.passes('cpu') else 'FAIL'})")
        return verdict


# ---- timed loops (gc off inside; both variants of a pair use the same loop shape) ----

def _timed(fn: Callable[[], None], n: int) -> Timing:
    gc_was = gc.isenabled()
    gc.disable()
    try:
        c0, t0 = _cpu(), _wall()
        fn()
        t1, c1 = _wall(), _cpu()
    finally:
        if gc_was:
            gc.enable()
    return Timing((t1 - t0) / n, (c1 - c0) / n)


def time_calls(step: Callable[[], None], n: int) -> Timing:
    """Per call of `step()` over n calls."""
    def loop() -> None:
        for _ in _repeat(None, n):
            step()
    return _timed(loop, n)


def time_iter(iterable: Any, n: int) -> Timing:
    """Per item of iterating `iterable` (which yields n items)."""
    def loop() -> None:
        for _ in iterable:
            pass
    return _timed(loop, n)


def paired(row: Row, repeat: int, base: Callable[[], Timing], hooked: Callable[[], Timing]) -> Row:
    base()          # warm both paths (caches, specialisation) before anything is kept
    hooked()
    for i in range(repeat):
        if i % 2 == 0:
            b = base()
            h = hooked()
        else:
            h = hooked()
            b = base()
        row.base.append(b)
        row.hook.append(h)
    return row


def check(hook: Hook, before: dict[str, float], errors_before: int, counter: str, expected: int) -> str:
    """Empty when the hook stayed on, counted no error and counted exactly what it was given."""
    problems = []
    if hook.errors != errors_before:
        problems.append(f"{hook.errors - errors_before} hook error(s)")
    if hook.disabled:
        problems.append("hook disabled itself")
    got = hook.counters[counter] - before[counter]
    if got != expected:
        problems.append(f"counted {got:g} {counter}, expected {expected}")
    return "; ".join(problems)


def measure(hook: Hook, counter: str, expected: int, fn: Callable[[], Row]) -> Row:
    before, errors_before = hook.counters, hook.errors
    row = fn()
    row.invalid = check(hook, before, errors_before, counter, expected)
    return row


# ---- training loop ----

def train_data(steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(32, 32, generator=g), torch.randn(32, 8, generator=g)) for _ in range(steps)]


def train_pair(data: list[tuple[torch.Tensor, torch.Tensor]], hook: Hook | None, chunk: int
               ) -> tuple[Timing, Timing]:
    """Per training step: one pass over `data` without the hook and one with it, cut into chunks
    of `chunk` steps run alternately (their order alternating too), so that the machine's
    drift, which at a few ms per chunk is slow, hits both passes alike. Both iterate through
    islice() of one iterator each, the hooked one of `hook.watch(data)` (with hook=None both
    passes are the plain loop: an A/A check of the method)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(32, 8)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    loss_fn = torch.nn.functional.mse_loss
    islice = itertools.islice

    def plain(it: Iterator[Any], k: int) -> None:
        for x, y in islice(it, k):
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()

    def hooked(it: Iterator[Any], k: int) -> None:
        assert hook is not None
        for x, y in islice(it, k):
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
            hook.step()

    base_it = iter(data)
    hook_it = iter(hook.watch(data)) if hook is not None else iter(data)
    hook_fn = hooked if hook is not None else plain
    totals = [0, 0, 0, 0]       # base wall, base cpu, hook wall, hook cpu
    done = 0
    gc_was = gc.isenabled()
    gc.disable()
    try:
        while done < len(data):
            k = min(chunk, len(data) - done)
            for j in ((0, 2) if (done // chunk) % 2 == 0 else (2, 0)):
                fn, it = (plain, base_it) if j == 0 else (hook_fn, hook_it)
                c0, t0 = _cpu(), _wall()
                fn(it, k)
                t1, c1 = _wall(), _cpu()
                totals[j] += t1 - t0
                totals[j + 1] += c1 - c0
            done += k
    finally:
        if gc_was:
            gc.enable()
    n = len(data)
    return Timing(totals[0] / n, totals[1] / n), Timing(totals[2] / n, totals[3] / n)


# ---- report ----

def _fmt_ns(values: list[float]) -> str:
    return f"{_median(values):.1f} (min {min(values):.1f})"


def table(rows: list[Row]) -> str:
    out = ["| measurement | baseline ns | with looptune ns | difference ns | target | verdict |",
           "|---|---:|---:|---:|---|---|"]
    for r in rows:
        target = f"<= {r.target_ns:.0f} ns" if r.target_ns is not None else "—"
        out.append(f"| {r.name} | {_fmt_ns(r.values('base'))} | {_fmt_ns(r.values('hook'))} | "
                   f"{r.diff():+.1f} | {target} | {r.verdict} |")
    return "\n".join(out)


def cpu_share(timings: list[Timing]) -> float:
    return _median([t.cpu / t.wall for t in timings if t.wall > 0])


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"


def header(args: argparse.Namespace) -> str:
    return (f"machine: {platform.node()} {platform.machine()} | python {platform.python_version()} "
            f"({platform.python_implementation()}) | torch {torch.__version__} "
            f"(intra-op threads {torch.get_num_threads()}) | cpu_count {os.cpu_count()} "
            f"(usable {_usable_cpus()}) | load avg {_load()} | calls {args.calls} | batches {args.batches} | "
            f"train steps {args.train_steps} | repeat {args.repeat}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=None, help="hook.step() calls per timed run (default 1e6)")
    p.add_argument("--batches", type=int, default=None, help="batches per loader run (default 1e5)")
    p.add_argument("--train-steps", type=int, default=None, help="steps per training run (default 2000)")
    p.add_argument("--repeat", type=int, default=None, help="timed runs of each variant (default 7)")
    p.add_argument("--chunk", type=int, default=50,
                   help="training steps per chunk; the plain and hooked loops alternate by chunks (default 50)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (torch.set_num_threads) for the whole run (default 1)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 1e5 calls, 1e4 batches, 300 train steps, 3 repeats (unless given)")
    args = p.parse_args(argv)
    if args.threads < 1 or args.chunk < 1:
        p.error("--threads and --chunk must be >= 1")
    defaults = (100_000, 10_000, 300, 3) if args.quick else (1_000_000, 100_000, 2000, 7)
    for name, default in zip(("calls", "batches", "train_steps", "repeat"), defaults):
        if getattr(args, name) is None:
            setattr(args, name, default)
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    print(header(args), flush=True)

    # made before the hook exists, so their allocation is outside every timed loop
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(32, 4, generator=g) for _ in range(args.batches)]
    ys = [torch.randn(32, generator=g) for _ in range(args.batches)]
    tuples = list(zip(xs, ys))
    dicts = [{"x": x, "y": y} for x, y in tuples]
    data = train_data(args.train_steps)
    runs = args.repeat + 1      # + the warm-up run of each variant

    with Hook(run="bench", socket="/nonexistent/looptune.sock",
              config={"hook": {"report_interval_seconds": 60}}) as hook:
        if hook.disabled or hook.mode != "embedded":
            print(f"error: the hook is {'disabled' if hook.disabled else hook.mode}, not embedded "
                  f"({hook.errors} error(s))", file=sys.stderr)
            return 2
        noop = NoOp()
        rows = [measure(hook, "steps", runs * args.calls, lambda: paired(
            Row("`hook.step()` per call", TARGET_STEP_NS), args.repeat,
            lambda: time_calls(noop.step, args.calls), lambda: time_calls(hook.step, args.calls)))]
        n = args.batches
        for label, batches in (("tensor", xs), ("tuple (x, y)", tuples), ('dict {"x", "y"}', dicts)):
            row = measure(hook, "batches", runs * n, lambda b=batches, label=label: paired(
                Row(f"loader wrapper per batch, {label}"), args.repeat,
                lambda: time_iter(b, n), lambda: time_iter(hook.watch(b), n)))
            if not row.invalid and hook.watch(batches) is batches:
                row.invalid = "watch() returned the list itself"
            rows.append(row)

        train_row = Row("training step")
        before, errors_before = hook.counters, hook.errors
        train_pair(data, hook, args.chunk)      # warm-up: first autograd/optimizer calls are slow
        for _ in range(args.repeat):
            b, h = train_pair(data, hook, args.chunk)
            train_row.base.append(b)
            train_row.hook.append(h)
        train_row.invalid = check(hook, before, errors_before, "steps", runs * args.train_steps)

    print()
    print(table(rows))
    print()
    sps = {w: [1e9 / t.wall for t in getattr(train_row, w)] for w in ("base", "hook")}
    ratios = [h / b for b, h in zip(sps["base"], sps["hook"])]
    cpu_ratios = [b.cpu / h.cpu for b, h in zip(train_row.base, train_row.hook)]
    print(f"training loop (Linear(32, 8), SGD, batch 32, {args.train_steps} steps, median of {args.repeat}): "
          f"baseline {_median(sps['base']):,.0f} steps/s, with looptune {_median(sps['hook']):,.0f} steps/s, "
          f"ratio hook/baseline {_median(ratios):.4f} (range {min(ratios):.4f}..{max(ratios):.4f}; "
          f"best-of-{args.repeat} ratio {max(sps['hook']) / max(sps['base']):.4f}; "
          f"CPU-time ratio {_median(cpu_ratios):.4f}); per step {train_row.diff():+,.0f} ns"
          + (f" — INVALID ({train_row.invalid})" if train_row.invalid else ""))
    print("CPU time (thread_time_ns) differences: "
          + ", ".join(f"{r.name.replace('`', '')} {r.diff('cpu'):+.1f} ns" for r in rows)
          + f", training step {train_row.diff('cpu'):+,.0f} ns")
    timings = [t for r in rows + [train_row] for t in r.base + r.hook]
    share = cpu_share(timings)
    print(f"CPU share of the timed runs: {share:.0%} of a core (median); load avg now {_load()} "
          f"on {_usable_cpus()} usable CPU(s)"
          + ("; the machine is busy: wall figures include preemption, read the CPU-time ones"
             if share < BUSY_SHARE else ""))
    step = rows[0]
    print(f"hook.step() overhead: {step.diff():.1f} ns (target <= {TARGET_STEP_NS:.0f} ns): "
          f"{'INVALID' if step.invalid else 'PASS' if step.passes() else 'FAIL'} "
          f"(CPU time: {step.diff('cpu'):.1f} ns, {'PASS' if step.passes('cpu') else 'FAIL'}; "
          f"runs got {step.share:.0%} of a core)")
    if any(r.invalid for r in rows) or train_row.invalid:
        print("error: some hooked figures do not measure the hook's normal path (see INVALID above)",
              file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
