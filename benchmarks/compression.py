#!/usr/bin/env python3
"""DDP gradient compression: each fixed grad_compression setting and the compression tuner, against
uncompressed DDP, over three links and two models.

Two gloo ranks (forked from this process, one torch thread each) train the same model on the same
data for the same number of steps in every run:

  links   loopback  both ranks on 127.0.0.1 (GLOO_SOCKET_IFNAME=lo), unshaped
          10gbit    two network namespaces joined by a veth pair, both ends shaped with
          1gbit     `tc qdisc ... root tbf rate R` (tests/netbed.py; each rank runs in its own
                    namespace, rendezvous over TCP at rank 0's veth address, GLOO_SOCKET_IFNAME = its
                    veth end). Needs root and iproute2; without them those links are reported as
                    not run, with the reason, and the exit status is 2.
  models  wire      wire-bound: an MLP 1024-4096-1024 (tanh), 8.4 M parameters, batch 32 per rank
                    (the issue's case: ~34 MB of gradients a step for little compute)
          compute   compute-bound: an MLP 128-256-256-128 (tanh), 0.13 M parameters, batch 4096
                    per rank (~3 GFLOP a step, 0.5 MB of gradients)

  Both learn a fixed random teacher (y = tanh(x A) B, A and B drawn from a fixed seed; x standard
  normal, each rank's batches from its own seeded generator, made before the first step so the loop
  never waits for data: up to 64 MB of them per rank, cycled where a run needs more), SGD with
  learning rate 0.3 and momentum 0.9, MSE: the held-out loss still falls steeply at the last step
  (wire-bound 0.46 -> 0.14 in 120 steps), so a setting that slows the descent shows in it. The model
  starts from the same seed in every run.

Runs per link and model (--steps steps each, the first --warmup not timed):

  none      plain DistributedDataParallel: no looptune at all (the baseline of every ratio)
  hooked    (only when asked for: --settings) Hook(tune=False) watching the DDP model at none: what
            the hook itself costs (at none no comm hook: DDP's timer read each step; its reporter thread)
  fp16, bf16, powersgd   Hook(tune=False) watching the DDP model, its grad_compression set before
            the first step and never changed (powersgd at the default powersgd_rank 1); bf16 only
            where the backend can all-reduce it (the hook's probe; otherwise the row says why)
  tuned     Hook(tune=["compression"]) from none, no daemon (rank 0 runs the engine in-process),
            the default config but for a fresh state file (no remembered setting) and what
            --tuner-config sets (reported); hook.step(loss=...) so the engine's loss guard works.
  paired    none and tuned in the same two processes, in turns of 5 steps: a plain DDP model and a
            DDP model watched by a tuned hook (the same model, seeds and batches; each trains its
            own copy), so both meet the same moments of a shared host. Separate runs of a
            compute-bound model on loopback differ by 10-30% from run to run on a shared 2-core VM
            (the two ranks contend with everything else), which hides a 2% cost; turns of 5 steps
            do not (the order of the two turns alternates from pair to pair). The hook's step clock restarts at each of its turns, so its windows' shares
            (data wait, communication) are its model's own; its samples/s per window is about half
            (the plain model's turns are wall time too), which the engine compares only with itself.
            Figures: plain seconds over tuned seconds of the turns after the warm-up, and the
            tuned model's held-out loss over the plain one's. By default run for the compute-bound
            model only, where it is the do-no-harm check.
  paired-hooked   (only when asked for) the same with Hook(tune=False): the hook's own cost (its
            step, its reporter), without the tuner's rank syncs and engine
  paired-null     (only when asked for) the control: both turns plain DDP (a hook exists but watches
            nothing): what the method reads where there is no difference

Figures, each a ratio against `none` of the same link and model measured in this run of the script
(with --repeat N: N rounds of every run in turn, medians, and the range of the per-round ratios):

  samples/s whole   samples/s from the end of the warm-up to the last step
  samples/s end     samples/s over the last quarter of the steps (for tuned: what it settled on)
  loss              the loss on a fixed held-out set of 2048 samples after the last step: the loss
                    at an equal number of steps, same seeds, same data
  ms/step, CPU ms/step   wall time per timed step (median over rounds), and rank 0's process CPU time
                    per timed step (all its threads: the hook's reporter too; gloo's waits count)
  final             the setting the run ended on (tuned: with the engine's trials: kept / rolled
                    back / failed, and the gain each measured)
  hook thread       (notes) CPU ms per second of the hook's background thread (reports, the
                    embedded engine's ticks), over the run's second half: it runs beside training,
                    so `paired` spreads it over both turns, and this says how much it is

The tuned runs also print their engine's windows: samples/s, communication share and verdict.

Goals (the issue's done-when):
  - 1gbit, wire-bound: the tuned run's samples/s end >= 1.5 x none's, and its loss at equal steps
    no more than 2% above none's (a lower loss passes);
  - loopback, compute-bound: the tuned run's samples/s whole >= 0.98 x none's (from the paired run
    where it was run, else from the separate tuned and none runs).

The header gives the host's 1-minute load average at the start and at the end, each row its range
over the run (the two ranks alone make ~2): the machine may be shared, and every figure moves with it.

    python benchmarks/compression.py                 # 3 links x 2 models x 5 runs (+ paired): ~16 minutes on 2 cores
    python benchmarks/compression.py --quick         # the goals' two cases, none, fp16, tuned (+ paired): ~3.5 minutes a round
    python benchmarks/compression.py --links 1gbit --models wire --steps 200
    python benchmarks/compression.py --links loopback --models compute --settings none,hooked,tuned --repeat 6
    python benchmarks/compression.py --tuner-config '{"window_seconds": 0.5}'   # NOT the defaults: reported

Exit status 0 when every goal checked passes, 1 when a goal fails, 2 when a run could not be made
(no network namespaces here, a rank that failed or hung).
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import platform
import queue
import shutil
import signal
import socket
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from tests.netbed import NetBed, NetBedUnavailable  # noqa: E402

SEED = 20240601
WORLD = 2
EVAL_N = 2048
RUN_TIMEOUT = 300.0       # one run, both ranks; killed beyond
LINKS = ("loopback", "10gbit", "1gbit")
END_GOAL = 1.5            # 1gbit wire-bound: tuned samples/s end / none's
LOSS_GOAL = 0.02          # ... with the loss at equal steps at most this much above none's
KEEP_GOAL = 0.98          # loopback compute-bound: tuned samples/s whole / none's


@dataclass(frozen=True)
class ModelSpec:
    key: str
    title: str
    dims: tuple[int, ...]
    batch: int
    lr: float
    steps: int            # default steps per run
    quick_steps: int

    @property
    def params(self) -> int:
        return sum(a * b + b for a, b in zip(self.dims, self.dims[1:]))


MODELS = {
    "wire": ModelSpec("wire", "wire-bound", (1024, 4096, 1024), 32, 0.3, 120, 120),
    # 400 steps: ~18 s a run (45 ms a step), warm well past the hook's first windows
    "compute": ModelSpec("compute", "compute-bound", (128, 256, 256, 128), 4096, 0.3, 400, 400),
}


def make_model(spec: ModelSpec) -> torch.nn.Module:
    torch.manual_seed(SEED)
    layers: list[torch.nn.Module] = []
    for i, (a, b) in enumerate(zip(spec.dims, spec.dims[1:])):
        if i:
            layers.append(torch.nn.Tanh())
        layers.append(torch.nn.Linear(a, b))
    return torch.nn.Sequential(*layers)


def teacher(spec: ModelSpec) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(SEED + 1)
    d_in, d_out, h = spec.dims[0], spec.dims[-1], 256
    return torch.randn(d_in, h, generator=g) / math.sqrt(d_in), torch.randn(h, d_out, generator=g) / math.sqrt(h)


POOL_BYTES = 64 << 20     # this rank's batches made before the run, at most this much: the loop never waits on them


class Batches:
    """This rank's batches (x, teacher(x)), x from the rank's own seeded generator, made before the
    first step (so loading costs nothing: no `input` verdict); `steps` of them, cycling through the
    pool where all of them would not fit in POOL_BYTES."""

    def __init__(self, spec: ModelSpec, rank: int, steps: int) -> None:
        self.steps = steps
        a, b = teacher(spec)
        g = torch.Generator().manual_seed(SEED + 100 + rank)
        per = spec.batch * (spec.dims[0] + spec.dims[-1]) * 4
        self.pool = []
        for _ in range(max(1, min(steps, POOL_BYTES // per))):
            x = torch.randn(spec.batch, spec.dims[0], generator=g)
            self.pool.append((x, torch.tanh(x @ a) @ b))

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Any:
        for i in range(self.steps):
            yield self.pool[i % len(self.pool)]


def eval_set(spec: ModelSpec) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(SEED + 2)
    a, b = teacher(spec)
    x = torch.randn(EVAL_N, spec.dims[0], generator=g)
    return x, torch.tanh(x @ a) @ b


# ---- one run: two forked ranks ----

@dataclass
class Spec:
    link: str
    model: ModelSpec
    setting: str            # none (plain DDP), fp16, bf16, powersgd, tuned
    steps: int
    warmup: int
    bed: NetBed | None
    port: int
    tmp: str
    tuner_config: dict[str, Any]


@dataclass
class Result:
    link: str
    model: str
    setting: str
    ok: bool = True
    why: str = ""
    times: list[float] = field(default_factory=list)          # rank 0: end of each step (perf_counter)
    settings: list[str] = field(default_factory=list)         # rank 0: the setting each step ran
    losses: list[float] = field(default_factory=list)         # rank 0: each step's training loss
    eval_loss: float | None = None
    final: str = ""
    history: list[dict[str, Any]] = field(default_factory=list)
    windows: list[dict[str, Any]] = field(default_factory=list)
    unusable: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    comm_mb_per_step: float | None = None
    load: tuple[float, float] = (0.0, 0.0)                    # 1-minute load average at the start and the end
    cpu_ms: float | None = None                               # rank 0: process CPU per timed step
    pairs: list[tuple[float, float]] = field(default_factory=list)   # paired: (plain, tuned) seconds per block
    plain_eval_loss: float | None = None                      # paired: the plain model's held-out loss
    thread_ms_per_s: float | None = None                      # rank 0: the hook thread's CPU ms per second, 2nd half

    def rate(self, first: int, last: int, batch: int) -> float | None:
        """Samples/s (both ranks) over steps first..last (indices into times)."""
        if not self.ok or last >= len(self.times) or last <= first:
            return None
        dt = self.times[last] - self.times[first]
        return (last - first) * batch * WORLD / dt if dt > 0 else None


BLOCK = 5      # paired: steps per block


def paired_steps(spec: Spec, rank: int, hook: Any, data: Any, out: dict[str, Any]) -> None:
    """`paired`: a plain DDP model and a DDP model watched by a tuned hook, the same model, seeds and
    batches, in turns of BLOCK steps in these same two processes, so both see the same moments of
    a shared host. The hook's step clock restarts at each of its blocks: the plain model's steps are
    not its step time (its windows' shares are its own; its samples/s per window is about half)."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    m = spec.model
    plain = DDP(make_model(m))
    null = spec.setting == "paired-null"        # the control: both turns plain, the method's own bias
    tuned = DDP(make_model(m)) if null else hook.watch(DDP(make_model(m)))
    opts = [torch.optim.SGD(x.parameters(), lr=m.lr, momentum=0.9) for x in (plain, tuned)]
    src, watched = iter(data), iter(data if null else hook.watch(data))
    times, settings, losses, pairs = [], [], [], []
    turns = ((0, plain, opts[0], src), (1, tuned, opts[1], watched))
    for i in range(spec.steps // BLOCK):
        spent = [0.0, 0.0]
        # the order alternates (plain first, then tuned first): a turn's place in the pair costs both alike
        for which, model, opt, it in (turns if i % 2 == 0 else turns[::-1]):
            if which and not null:
                hook.meter.restart_step_clock()
            t = time.perf_counter()
            for _ in range(BLOCK):
                x, y = next(it)
                if which:
                    settings.append("none" if null else hook.comm.setting)
                loss = torch.nn.functional.mse_loss(model(x), y)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                if which:
                    if not null:
                        hook.step(loss=loss.detach())
                    times.append(time.perf_counter())
                    losses.append(float(loss.detach()))
                    if not null and len(times) == spec.steps // 2:
                        out["thread_mark"] = (time.perf_counter(), thread_cpu_ms(hook))
            spent[which] = time.perf_counter() - t
        pairs.append((spent[0], spent[1]))
    out.update(times=times, settings=settings, losses=losses, pairs=pairs)
    if rank == 0:
        xe, ye = eval_set(m)
        with torch.no_grad():
            out["eval_loss"] = float(torch.nn.functional.mse_loss(tuned.module(xe), ye))
            out["plain_eval_loss"] = float(torch.nn.functional.mse_loss(plain.module(xe), ye))


def rank_main(rank: int, spec: Spec, results: Any) -> None:
    try:
        if spec.bed is not None:
            spec.bed.enter(rank)             # every socket (and gloo thread) of this rank lives there
            addr, ifname = spec.bed.addr(0), spec.bed.ifname(rank)
        else:
            addr, ifname = "127.0.0.1", "lo"
        os.environ["GLOO_SOCKET_IFNAME"] = ifname
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel as DDP
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"tcp://{addr}:{spec.port}", rank=rank, world_size=WORLD,
                                timeout=timedelta(seconds=120))
        m = spec.model
        # the batches first: making them is this benchmark's own set-up, which a job's loader does not
        # do before its first step (the hook's first window would count it)
        data: Any = Batches(m, rank, spec.steps)
        paired = spec.setting in ("paired", "paired-hooked", "paired-null")
        hook = None
        if spec.setting != "none":          # hooked: Hook(tune=False) at none, the hook's own cost
            from looptune import Hook
            tuners = {"state_file": os.path.join(spec.tmp, f"best-{rank}.json"), **spec.tuner_config}
            hook = Hook(run=f"bench-{m.key}", socket=os.path.join(spec.tmp, f"nobody-{rank}.sock"),
                        tune=["compression"] if spec.setting in ("tuned", "paired") else False,
                        config={"tuners": tuners})
        out: dict[str, Any] = {"rank": rank}
        try:
            if paired:
                t0 = time.monotonic()
                paired_steps(spec, rank, hook, data, out)
                out["seconds"] = time.monotonic() - t0
            ddp = DDP(make_model(m)) if not paired else None
            if hook is not None and not paired:
                ddp = hook.watch(ddp)
                data = hook.watch(data)
                out["unusable"] = dict(hook.comm.unusable)
                if spec.setting not in ("tuned", "hooked"):
                    setting, _, rank_ = spec.setting.partition("@")      # powersgd@4: at powersgd_rank 4
                    if setting in hook.comm.unusable:
                        out["skip"] = hook.comm.unusable[setting]
                        results.put(out)
                        return
                    hook.comm.set_setting(setting)
                    if rank_:
                        hook.comm.set_rank(int(rank_))
            opt = torch.optim.SGD(ddp.parameters(), lr=m.lr, momentum=0.9) if ddp is not None else None
            times, settings, losses = [], [], []
            t0 = time.monotonic()
            for x, y in (data if not paired else ()):
                settings.append(hook.comm.setting if hook is not None else "none")
                loss = torch.nn.functional.mse_loss(ddp(x), y)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                if hook is not None:
                    hook.step(loss=loss.detach())
                times.append(time.perf_counter())
                if hook is not None and len(times) == spec.steps // 2:
                    out["thread_mark"] = (time.perf_counter(), thread_cpu_ms(hook))
                if len(times) == spec.warmup:
                    cpu0 = time.process_time()
                losses.append(float(loss.detach()))
            # CPU of this rank's process (every thread: the hook's too) per timed step: where the host is
            # shared, a steadier figure of what the hook costs than wall time
            if not paired:
                cpu_ms = ((time.process_time() - cpu0) / (len(times) - spec.warmup) * 1e3
                          if len(times) > spec.warmup else None)
                out.update(times=times, settings=settings, losses=losses, seconds=time.monotonic() - t0,
                           cpu_ms=cpu_ms)
            if hook is not None and "thread_mark" in out:
                t, cpu = out.pop("thread_mark")
                out["thread_ms_per_s"] = (thread_cpu_ms(hook) - cpu) / (time.perf_counter() - t)
            if hook is not None and hook.meter.comm_bytes:
                out["comm_mb_per_step"] = hook.meter.comm_bytes / max(1, hook.meter.steps) / 1e6
            if rank == 0:
                xe, ye = eval_set(m)
                if not paired:
                    with torch.no_grad():
                        out["eval_loss"] = float(torch.nn.functional.mse_loss(ddp.module(xe), ye))
                if hook is not None and hook.comm is not None:
                    out["final"] = hook.comm.setting
                    if hook.comm.setting == "powersgd" and hook.comm.get_rank() != 1:
                        out["final"] += f"@{hook.comm.get_rank()}"
                    eng = hook.engine
                    job = eng.jobs.get(("self",)) if eng is not None else None
                    if job is not None:
                        from looptune.tuners.bottleneck import verdict
                        out["history"] = list(job.history)
                        t = job.trial
                        if t is not None:      # a trial the run ended in: not in the history yet
                            out["history"].append({"knob": t.proposal.knob, "new": t.proposal.value,
                                                   "outcome": f"in flight ({t.phase})", "gain": None, "detail": ""})
                        out["windows"] = [{"sps": w.samples_per_second, "comm": w.comm_share, "verdict": verdict(w),
                                           "loss": w.loss} for w in job.windows]
        finally:
            if hook is not None:
                hook.close()
        dist.destroy_process_group()
        results.put(out)
    except BaseException:  # noqa: BLE001
        results.put({"rank": rank, "error": traceback.format_exc()})


def thread_cpu_ms(hook: Any) -> float:
    """CPU the hook's background thread (reports, the embedded engine's ticks) has used, in ms: it
    runs beside the training thread, so `paired` spreads it over both turns; this says how much.
    Read from the run's middle to its end: the first tick's imports and set-up are no steady cost."""
    tid = hook._channel._thread.native_id
    with open(f"/proc/self/task/{tid}/schedstat") as f:
        return int(f.read().split()[0]) / 1e6


def run_once(spec: Spec) -> Result:
    res = Result(spec.link, spec.model.key, spec.setting)
    ctx = mp.get_context("fork")          # the ranks inherit the imported torch (and the bed object)
    q = ctx.Queue()
    procs = [ctx.Process(target=rank_main, args=(r, spec, q)) for r in range(WORLD)]
    t0 = time.monotonic()
    load0 = os.getloadavg()[0]
    for p in procs:
        p.start()
    got: dict[int, dict[str, Any]] = {}
    deadline = t0 + RUN_TIMEOUT
    try:
        for _ in range(WORLD):
            try:
                item = q.get(timeout=max(1.0, deadline - time.monotonic()))
            except queue.Empty:
                res.ok, res.why = False, f"a rank did not finish within {RUN_TIMEOUT:.0f} s; finished: {sorted(got)}"
                return res
            got[item["rank"]] = item
        for p in procs:
            p.join(30)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(10)
        res.seconds = time.monotonic() - t0
        res.load = (load0, os.getloadavg()[0])
    errors = [g["error"] for g in got.values() if "error" in g]
    if errors:
        res.ok, res.why = False, errors[0].strip().splitlines()[-1]
        print(errors[0], file=sys.stderr)
        return res
    r0 = got[0]
    res.unusable = r0.get("unusable", {})
    if "skip" in r0:
        res.ok, res.why = False, f"not usable here: {r0['skip']}"
        return res
    res.times, res.settings, res.losses = r0["times"], r0["settings"], r0["losses"]
    res.eval_loss, res.final = r0.get("eval_loss"), r0.get("final", "none")
    res.history, res.windows = r0.get("history", []), r0.get("windows", [])
    res.comm_mb_per_step = r0.get("comm_mb_per_step")
    res.cpu_ms = r0.get("cpu_ms")
    res.thread_ms_per_s = r0.get("thread_ms_per_s")
    res.pairs = [tuple(p) for p in r0.get("pairs", [])]
    res.plain_eval_loss = r0.get("plain_eval_loss")
    return res


# ---- the report ----

def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def fmt(x: float | None, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def path_of(r: Result) -> str:
    """Where the setting changed: value@step (1-based)."""
    out, prev = [], None
    for i, s in enumerate(r.settings):
        if s != prev:
            out.append(f"{s}@{i + 1}")
            prev = s
    return " -> ".join(out)


def trials_of(r: Result) -> str:
    parts = []
    for h in r.history:
        gain = f" {h['gain']:+.0%}" if isinstance(h.get("gain"), (int, float)) else ""
        what = h["new"] if h["knob"] == "grad_compression" else f"{h['knob']}={h['new']}"
        why = f" ({h['detail']})" if h["outcome"] != "kept" and h.get("detail") else ""
        parts.append(f"{what} {h['outcome']}{gain}{why}")
    return "; ".join(parts) or "no trial"


@dataclass
class Figures:
    whole: float | None
    end: float | None
    loss: float | None
    whole_range: tuple[float, float] | None = None     # per round (ratio to the same round's none), repeats > 1
    end_range: tuple[float, float] | None = None


def _median(xs: list[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return statistics.median(vals) if vals else None


def _rates(r: Result, m: ModelSpec, warmup: int) -> tuple[float | None, float | None]:
    n = len(r.times)
    return r.rate(warmup - 1, n - 1, m.batch), r.rate(n - 1 - max(2, n // 4), n - 1, m.batch)


def timed_pairs(r: Result, warmup: int) -> list[tuple[float, float]]:
    """A paired run's turns after those that hold the warm-up steps (at least the first)."""
    return r.pairs[max(1, -(-warmup // BLOCK)):] or r.pairs


def paired_figures(rs: list[Result], warmup: int) -> Figures:
    """`paired` runs: plain seconds over tuned seconds of the blocks after the warm-up (whole) and of
    the last quarter of the blocks (end), the tuned model's held-out loss over the plain one's; the
    median over rounds, with the range."""
    per = []
    for r in rs:
        if not r.ok or not r.pairs:
            continue
        p = timed_pairs(r, warmup)
        last = p[-max(1, len(p) // 4):]
        per.append((sum(a for a, _ in p) / sum(b for _, b in p), sum(a for a, _ in last) / sum(b for _, b in last),
                    ratio(r.eval_loss, r.plain_eval_loss)))
    if not per:
        return Figures(None, None, None)
    f = Figures(_median([x[0] for x in per]), _median([x[1] for x in per]), _median([x[2] for x in per]))
    if len(per) > 1:
        f.whole_range = (min(x[0] for x in per), max(x[0] for x in per))
        f.end_range = (min(x[1] for x in per), max(x[1] for x in per))
    return f


def figures(rs: list[Result], base: list[Result], m: ModelSpec, warmup: int) -> Figures:
    """Ratios of the median over the repeats of `rs` to the median of `base` (none's repeats)."""
    if rs and rs[0].setting.startswith("paired"):
        return paired_figures(rs, warmup)
    ok, bok = [r for r in rs if r.ok], [b for b in base if b.ok]
    if not ok or not bok:
        return Figures(None, None, None)
    mine, theirs = [_rates(r, m, warmup) for r in ok], [_rates(b, m, warmup) for b in bok]
    f = Figures(ratio(_median([w for w, _ in mine]), _median([w for w, _ in theirs])),
                ratio(_median([e for _, e in mine]), _median([e for _, e in theirs])),
                ratio(_median([r.eval_loss for r in ok]), _median([b.eval_loss for b in bok])))
    if len(rs) > 1 and len(rs) == len(base):
        pairs = [(_rates(r, m, warmup), _rates(b, m, warmup)) for r, b in zip(rs, base) if r.ok and b.ok]
        ws = [x for x in (ratio(a[0], b[0]) for a, b in pairs) if x is not None]
        es = [x for x in (ratio(a[1], b[1]) for a, b in pairs) if x is not None]
        f.whole_range = (min(ws), max(ws)) if ws else None
        f.end_range = (min(es), max(es)) if es else None
    return f


def ms_per_step(r: Result, warmup: int) -> float | None:
    if r.pairs:        # paired: the tuned model's blocks only
        p = timed_pairs(r, warmup)
        return sum(b for _, b in p) / (len(p) * BLOCK) * 1e3
    n = len(r.times)
    return (r.times[-1] - r.times[warmup - 1]) / (n - warmup) * 1e3 if r.ok and n > warmup else None


def _with_range(x: float | None, rng: tuple[float, float] | None) -> str:
    return fmt(x) + (f" ({rng[0]:.2f}–{rng[1]:.2f})" if rng is not None else "")


Results = dict[tuple[str, str, str], list[Result]]


def goals(results: Results, args: argparse.Namespace) -> list[tuple[str, bool | None, str]]:
    out: list[tuple[str, bool | None, str]] = []
    checks = [("1gbit", "wire"), ("loopback", "compute")]
    for link, model in checks:
        m = MODELS[model]
        name = f"{link}, {m.title}"
        if (link, model) not in args.cases:
            continue
        # the do-no-harm check reads the paired run where there is one: it resolves what separate runs cannot
        which = "paired" if link == "loopback" and results.get((link, model, "paired")) else "tuned"
        base, tuned = results.get((link, model, "none"), []), results.get((link, model, which), [])
        if not any(r.ok for r in base) or not any(r.ok for r in tuned):
            why = "; ".join(f"{r.setting}: {r.why}" for r in base + tuned if not r.ok) or "not run"
            out.append((name, None, f"could not be checked ({why})"))
            continue
        f = figures(tuned, base, m, args.warmup)
        finals = " / ".join(r.final for r in tuned if r.ok)
        trials = " | ".join(trials_of(r) for r in tuned if r.ok)
        if link == "1gbit":
            ok = f.end is not None and f.end >= END_GOAL and f.loss is not None and f.loss <= 1 + LOSS_GOAL
            out.append((f"{name}: tuned samples/s at the end >= {END_GOAL}x none, loss at equal steps within "
                        f"{LOSS_GOAL:.0%}", ok, f"{_with_range(f.end, f.end_range)}x, loss {fmt(f.loss, '.3f')}x; "
                        f"final {finals}; {trials}"))
        else:
            ok = f.whole is not None and f.whole >= KEEP_GOAL
            out.append((f"{name}: tuned samples/s over the whole run >= {KEEP_GOAL:.0%} of none ({which})", ok,
                        f"{_with_range(f.whole, f.whole_range)}x; final {finals}; {trials}"))
    return out


def report(results: Results, args: argparse.Namespace, load: tuple[float, float],
           unavailable: dict[str, str]) -> str:
    lines = [f"# compression benchmark: {platform.node()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
             f"gloo, {WORLD} ranks x 1 thread; load average {load[0]:.2f} at the start, {load[1]:.2f} at the end",
             f"steps per run: {', '.join(f'{k} {args.steps_of[k]}' for k in args.model_list)} "
             f"(first {args.warmup} not timed); " + (f"{args.repeat} rounds, medians (per-round ratio range); "
                                                    if args.repeat > 1 else "")
             + ("tuner config: defaults but a fresh state file" if not args.tuner_config else
                f"tuner config NOT the defaults: {json.dumps(args.tuner_config)}"),
             ""]
    lines.append("| link | model | run | samples/s whole | samples/s end | loss at equal steps | ms/step | CPU ms/step | "
                 "final | load | notes |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|")
    for link in args.link_list:
        if link in unavailable:
            lines.append(f"| {link} | | | | | | | | | | not run: {unavailable[link]} |")
            continue
        for mk in args.model_list:
            if (link, mk) not in args.cases:
                continue
            m = MODELS[mk]
            base = results.get((link, mk, "none"), [])
            for setting in args.setting_list:
                rs = results.get((link, mk, setting), [])
                if not rs:
                    continue
                title = f"{m.title} ({m.params / 1e6:.2f} M params, batch {m.batch})"
                ok = [r for r in rs if r.ok]
                if not ok:
                    lines.append(f"| {link} | {title} | {setting} | - | - | - | - | - | - | - | {rs[0].why} |")
                    continue
                f = figures(rs, base, m, args.warmup)
                notes = []
                if setting in ("tuned", "paired"):
                    notes.append(" \\| ".join(f"{trials_of(r)}; {path_of(r)}" for r in ok))
                mb = _median([r.comm_mb_per_step for r in ok])
                if mb is not None:
                    notes.append(f"{mb:.2f} MB/step sent")
                th = _median([r.thread_ms_per_s for r in ok])
                if th is not None and setting in ("tuned", "paired", "paired-hooked", "hooked"):
                    notes.append(f"hook thread {th:.1f} ms CPU/s")
                if len(ok) < len(rs):
                    notes.append(f"{len(rs) - len(ok)} round(s) failed: {next(r.why for r in rs if not r.ok)}")
                loads = [x for r in ok for x in r.load]
                lines.append(f"| {link} | {title} | {setting} | {_with_range(f.whole, f.whole_range)} | "
                             f"{_with_range(f.end, f.end_range)} | {fmt(f.loss, '.3f')} | "
                             f"{fmt(_median([ms_per_step(r, args.warmup) for r in ok]), '.0f')} | "
                             f"{fmt(_median([r.cpu_ms for r in ok]), '.0f')} | "
                             f"{' / '.join(dict.fromkeys(r.final for r in ok))} | {min(loads):.1f}–{max(loads):.1f} | "
                             f"{'; '.join(notes)} |")
    lines.append("")
    lines.append("Ratios against `none` (plain DDP, no looptune) of the same link and model in this run; "
                 "loss: held-out MSE after the same number of steps.")
    lines.append("")
    lines.append("Goals:")
    for name, ok, value in goals(results, args):
        lines.append(f"- {name}: {'PASS' if ok else 'FAIL' if ok is False else 'NOT CHECKED'} ({value})")
    return "\n".join(lines)


def windows_text(r: Result) -> str:
    return " ".join(f"{w['sps']:.0f}/{w['comm'] if w['comm'] is None else round(w['comm'], 2)}/{w['verdict'][:4]}"
                    f"/{w['loss'] if w['loss'] is None else format(w['loss'], '.3g')}" for w in r.windows)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="the goals' two cases only (1gbit wire-bound, loopback "
                   "compute-bound), runs none, fp16 and tuned")
    p.add_argument("--links", default=None, help=f"comma list of {', '.join(LINKS)} (default all; --quick: "
                   "loopback,1gbit)")
    p.add_argument("--models", default=None, help="comma list of wire, compute (default both)")
    p.add_argument("--settings", default=None, help="comma list of none, hooked, fp16, bf16, powersgd, powersgd@R (at "
                   "powersgd_rank R), tuned (default none,fp16,bf16,powersgd,tuned; --quick: none,fp16,tuned); "
                   "none is always run: every ratio needs it")
    p.add_argument("--steps", type=int, default=None, help="steps per run (default: wire 120, compute 400; "
                   "the same with --quick)")
    p.add_argument("--warmup", type=int, default=5, help="first steps not timed (default 5)")
    p.add_argument("--repeat", type=int, default=1, help="rounds of every run (default 1): figures are medians, "
                   "with the per-round ratio range; on a shared host a few rounds tell a 2%% difference from noise")
    p.add_argument("--tuner-config", default="", help="JSON merged into the tuned run's config section `tuners`")
    p.add_argument("--json", default="", help="also write the raw figures here")
    args = p.parse_args(argv)
    args.models_default = args.models is None
    args.models = args.models or "wire,compute"
    args.link_list = [x.strip() for x in (args.links or ("loopback,1gbit" if args.quick else ",".join(LINKS))).split(",")
                      if x.strip()]
    args.model_list = [x.strip() for x in args.models.split(",") if x.strip()]
    # the (link, model) cases run: every pair; --quick without --links/--models: the goals' two only
    args.cases = [(lk, mk) for lk in args.link_list for mk in args.model_list
                  if not (args.quick and args.links is None and args.models_default)
                  or (lk, mk) in (("1gbit", "wire"), ("loopback", "compute"))]
    settings = [x.strip() for x in (args.settings or ("none,fp16,tuned,paired" if args.quick else
                                                        "none,fp16,bf16,powersgd,tuned,paired")).split(",")
                if x.strip()]
    args.setting_list = ["none"] + [s for s in settings if s != "none"]
    bad = ([x for x in args.link_list if x not in LINKS] + [x for x in args.model_list if x not in MODELS]
           + [x for x in args.setting_list if x not in ("none", "hooked", "fp16", "bf16", "powersgd", "tuned", "paired",
                                                  "paired-hooked", "paired-null")
              and not (x.startswith("powersgd@") and x[9:].isdigit() and 1 <= int(x[9:]) <= 1024)])
    if bad:
        p.error(f"unknown link(s), model(s) or setting(s): {bad}")
    args.tuner_config = json.loads(args.tuner_config) if args.tuner_config else {}
    args.steps_of = {k: args.steps or (MODELS[k].quick_steps if args.quick else MODELS[k].steps) for k in MODELS}
    # a SIGTERM runs the clean-up (the namespaces) like Ctrl-C does
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    load0 = os.getloadavg()[0]
    tmp = tempfile.mkdtemp(prefix="lt-cbench-", dir="/tmp")
    results: Results = {}
    unavailable: dict[str, str] = {}
    port = 29600
    try:
        for link in args.link_list:
            bed: NetBed | None = None
            if link != "loopback":
                try:
                    bed = NetBed(link).open()
                except NetBedUnavailable as exc:
                    unavailable[link] = str(exc)
                    print(f"[{link}] not run: {exc}", file=sys.stderr, flush=True)
                    continue
            try:
                for rnd in range(args.repeat):          # rounds: every setting once, in order, then again
                    for mk in args.model_list:
                        if (link, mk) not in args.cases:
                            continue
                        m = MODELS[mk]
                        for setting in args.setting_list:
                            if setting == "paired" and args.settings is None and mk != "compute":
                                continue        # by default only where it is the do-no-harm check
                            port += 1
                            spec = Spec(link, m, setting, args.steps_of[mk], args.warmup, bed,
                                        free_port() if bed is None else port, tempfile.mkdtemp(dir=tmp),
                                        args.tuner_config)
                            r = run_once(spec)
                            results.setdefault((link, mk, setting), []).append(r)
                            f = figures([r], results[(link, mk, "none")][-1:], m, args.warmup)
                            tag = f" round {rnd + 1}" if args.repeat > 1 else ""
                            print(f"[{link} {mk}{tag}] {setting}: " + (
                                f"{fmt(ms_per_step(r, args.warmup), '.0f')} ms/step (CPU {fmt(r.cpu_ms, '.0f')}), "
                                f"whole {fmt(f.whole)}x, end "
                                f"{fmt(f.end)}x, loss {fmt(r.eval_loss, '.5f')} ({fmt(f.loss, '.3f')}x), final "
                                f"{r.final}, {r.seconds:.0f} s, load {r.load[0]:.1f}-{r.load[1]:.1f}"
                                if r.ok else f"not run: {r.why}"), file=sys.stderr, flush=True)
                            if setting in ("tuned", "paired") and r.ok:
                                print(f"    trials: {trials_of(r)}\n    path: {path_of(r)}\n"
                                      f"    windows (samples/s / comm share / verdict / loss): {windows_text(r)}",
                                      file=sys.stderr, flush=True)
            finally:
                if bed is not None:
                    bed.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    load1 = os.getloadavg()[0]
    print(report(results, args, (load0, load1), unavailable), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({f"{k[0]}/{k[1]}/{k[2]}": [vars(r) for r in v] for k, v in results.items()},
                                              indent=1, default=str))
    gs = goals(results, args)
    if unavailable or any(not r.ok and not r.why.startswith("not usable") for rs in results.values() for r in rs) \
            or any(ok is None for _, ok, _ in gs):
        return 2
    return 0 if all(ok for _, ok, _ in gs) else 1


if __name__ == "__main__":
    sys.exit(main())
