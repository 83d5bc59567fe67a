"""Training jobs as process trees: CPU, memory, I/O and GPU use of each job and its workers.

A job is found by its command line (`jobs.match` regexes) or by holding a GPU context, until
its hook registers it (the hook issue). A process is identified by (pid, create_time), never
by pid alone. Its tree is every descendant (DataLoader workers included), except subtrees that
are jobs of their own. Counters stay monotonic when workers exit: the last reading of a
process that leaves is kept in the job's retired totals.

CPU demand is what the tree's threads ran plus what they waited on a run queue, from
/proc/PID/task/TID/schedstat (nanoseconds; run time, run-queue wait, timeslices). Beside a
neighbour that holds the cores a job's CPU use falls while it still wants the CPU; its demand
does not. Threads are summed one by one (a process's own schedstat is its main thread only)
and a thread that exits leaves its last reading in its process's total, as a process leaves
its own in the job's. A kernel without schedstat (no CONFIG_SCHED_INFO: the file is absent;
sched_info off: it reads zeros) gives no demand: None, never an error.

Cost per sample: one listdir of /proc, one read of command line and environment per *new*
process (cached by pid and create time), and reads of the job members only (one listdir of
its task/ folder and one small read per thread for the demand). USS and PSS walk
the page tables, so they are read every `memory_detail_interval` seconds, and a job's own
process (the training process: the most mappings) every `root_detail_interval` where given.
"""
from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import psutil
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric

log = logging.getLogger("looptune.jobs")

ENV_KEYS = ("LOOPTUNE_RUN", "TORCHELASTIC_RUN_ID", "RANK", "WORLD_SIZE")
_NAME_OK = re.compile(r"[^A-Za-z0-9_.:-]+")


def parse_schedstat(text: str) -> tuple[int, int] | None:
    """(ns on a CPU, ns waiting on a run queue) from a schedstat line ("run wait timeslices");
    None when it is not two non-negative integers first."""
    parts = text.split()
    if len(parts) < 2:
        return None
    try:
        run, wait = int(parts[0]), int(parts[1])
    except ValueError:
        return None
    if run < 0 or wait < 0:
        return None
    return run, wait


def read_schedstat(pid: int, proc: str = "/proc") -> dict[int, int] | None:
    """Thread id -> ns run + ns waited on a run queue, for every thread of the process.

    None when there is no figure: the process is gone, the kernel has no schedstat (the file is
    absent without CONFIG_SCHED_INFO, and reads "0 0 0" with sched_info off: the main thread of a
    process that ran has run for more than 0 ns), or a line is malformed. A thread that exits
    between the listing and its read is left out (its process keeps its last reading)."""
    try:
        with open(f"{proc}/{pid}/schedstat", encoding="ascii") as f:
            main = parse_schedstat(f.read())
        tids = os.listdir(f"{proc}/{pid}/task")
    except (OSError, UnicodeDecodeError):
        return None
    if main is None or main == (0, 0):
        return None
    out: dict[int, int] = {}
    for name in tids:
        if not name.isdigit():
            continue
        try:
            with open(f"{proc}/{pid}/task/{name}/schedstat", encoding="ascii") as f:
                text = f.read()
        except OSError:
            continue
        except UnicodeDecodeError:
            return None
        v = parse_schedstat(text)
        if v is None:
            return None
        out[int(name)] = v[0] + v[1]
    return out


def _no_schedstat(pid: int) -> None:
    return None


@dataclass(frozen=True)
class ProcId:
    pid: int
    create_time: float


@dataclass
class _Entry:
    """What is cached about one process between samples."""
    proc: psutil.Process
    id: ProcId
    ppid: int
    cmdline: list[str]
    matched: bool
    env: dict[str, str] | None = None      # read lazily, only for candidates
    job: ProcId | None = None              # root of the job tree it was last counted in
    cpu: tuple[float, float] = (0.0, 0.0)  # user, system seconds at the last reading
    io: tuple[int, int] | None = None      # read, write bytes at the last reading
    uss: int | None = None
    pss: int | None = None
    detail_at: float = float("-inf")
    rss: int = 0
    threads: dict[int, int] = field(default_factory=dict)   # tid -> ns run + waited at the last reading
    threads_gone_ns: int = 0            # last readings of the threads that exited
    demand_ns: int | None = None        # the process's demand at its last complete reading


@dataclass
class _Retired:
    cpu: list[float] = field(default_factory=lambda: [0.0, 0.0])
    io: list[int] = field(default_factory=lambda: [0, 0])
    last_cpu: tuple[float, float] = (0.0, 0.0)  # exported values, kept monotonic
    last_io: tuple[int, int] = (0, 0)
    rate_at: tuple[float, float] | None = None  # (monotonic, cpu seconds) for the CPU rate
    demand_ns: int = 0                          # demand of the processes that left
    last_demand: float = 0.0                    # exported seconds, kept monotonic
    demand_at: tuple[float, float] | None = None   # (monotonic, demand seconds) for the demand rate


@dataclass(frozen=True)
class JobSample:
    run: str
    rank: str
    world_size: str
    root_pid: int
    processes: int
    cpu_user_seconds: float
    cpu_system_seconds: float
    rss_bytes: int
    uss_bytes: int | None
    pss_bytes: int | None
    io_read_bytes: int | None
    io_write_bytes: int | None
    gpu: dict[int, tuple[int | None, float | None]]  # gpu index -> (memory bytes, SM ratio)
    pids: tuple[int, ...] = ()
    cpu_cores: float | None = None   # CPU use over the last sample interval, in cores
    worker_uss_bytes: int | None = None   # USS of the tree without its root (loader workers)
    root_rss_bytes: int | None = None
    cpu_demand_seconds: float | None = None   # run + run-queue wait of the tree's threads, cumulative
    cpu_cores_demand: float | None = None     # the same over the last sample interval, in cores


@dataclass(frozen=True)
class JobsSnapshot:
    jobs: list[JobSample]
    not_exported: int = 0         # jobs found beyond jobs.max_jobs, left out of /metrics


def derive_run(cmdline: Sequence[str]) -> str:
    """A stable name from a command: the script's stem, the -m module, else the program name."""
    args = list(cmdline)
    for i, arg in enumerate(args):
        if arg == "-m" and i + 1 < len(args):
            mod = args[i + 1]
            if mod in ("torch.distributed.run", "torch.distributed.launch"):
                continue
            return _clean(mod.rsplit(".", 1)[-1])
        if arg.endswith(".py"):
            return _clean(os.path.basename(arg)[:-3])
    return _clean(os.path.basename(args[0])) if args else "unknown"


def _clean(name: str) -> str:
    return _NAME_OK.sub("_", name)[:64] or "unknown"


class JobsCollector:
    name = "jobs"

    def __init__(self, patterns: Sequence[str], *, gpu_processes: Callable[[], Iterable[Any]] | None = None,
                 registered: Callable[[], dict[int, tuple[str, str, str]]] | None = None,
                 memory_detail_interval: float = 10.0, max_jobs: int = 64, discover_after: float = 0.0,
                 ps: Any = psutil, root_detail_interval: float | None = None,
                 self_pid: int | None = None, clock: Callable[[], float] = time.monotonic,
                 schedstat: Callable[[int], dict[int, int] | None] | None = None) -> None:
        self.discover_after = discover_after   # seconds a found process waits for its hook to name it
        self.configure(patterns, memory_detail_interval, max_jobs)
        self.root_detail_interval = root_detail_interval
        self._gpu_processes = gpu_processes
        self._registered = registered     # pid -> (run, rank, world_size) from connected hooks
        self._hooked: dict[int, tuple[str, str, str]] = {}
        self._ps = ps
        # thread id -> ns run + waited, per pid (read_schedstat); a fake process table has no /proc
        self._schedstat = schedstat if schedstat is not None else \
            (read_schedstat if ps is psutil else _no_schedstat)
        self._self_pid = os.getpid() if self_pid is None else self_pid
        self._clock = clock
        self._cache: dict[int, _Entry] = {}
        self._retired: dict[ProcId, _Retired] = {}
        self._capped_logged = False
        self.last: JobsSnapshot | None = None

    def configure(self, patterns: Sequence[str], memory_detail_interval: float, max_jobs: int,
                  discover_after: float | None = None) -> None:
        """Apply a reloaded config; already-cached processes are matched again at the next sample.

        Called from the main loop while the sampler thread may be filling the cache: the cache is
        only touched in the sampler thread.
        """
        self._patterns = [re.compile(p) for p in patterns]
        self.memory_detail_interval = memory_detail_interval
        self.max_jobs = max_jobs
        if discover_after is not None:
            self.discover_after = discover_after
        self._rematch = True

    def _matches(self, cmdline: list[str]) -> bool:
        text = " ".join(cmdline)
        return bool(text) and any(p.search(text) for p in self._patterns)

    # ---- process table ----

    def _refresh(self) -> None:
        if self._rematch:
            self._rematch = False
            for e in self._cache.values():
                e.matched = self._matches(e.cmdline)
        pids = set(self._ps.pids())
        for pid in list(self._cache):
            if pid not in pids:
                self._retire(self._cache.pop(pid))
        for pid in pids - self._cache.keys():
            try:
                p = self._ps.Process(pid)
                with p.oneshot():
                    ident = ProcId(pid, p.create_time())
                    ppid = p.ppid()
                    try:
                        cmd = p.cmdline()
                    except (self._ps.AccessDenied, self._ps.ZombieProcess):
                        cmd = []
            except (self._ps.NoSuchProcess, self._ps.AccessDenied, ProcessLookupError):
                continue
            self._cache[pid] = _Entry(p, ident, ppid, cmd, self._matches(cmd))

    def _retire(self, e: _Entry) -> None:
        if e.job is None:
            return
        r = self._retired.get(e.job)
        if r is None:
            return
        if e.id == e.job:   # the job itself ended
            del self._retired[e.job]
            return
        r.cpu[0] += e.cpu[0]
        r.cpu[1] += e.cpu[1]
        if e.demand_ns is not None:
            r.demand_ns += e.demand_ns
        if e.io is not None:
            r.io[0] += e.io[0]
            r.io[1] += e.io[1]

    def _env(self, e: _Entry) -> dict[str, str]:
        if e.env is None:
            try:
                full = e.proc.environ()
                e.env = {k: full[k] for k in ENV_KEYS if k in full}
            except (self._ps.AccessDenied, self._ps.NoSuchProcess, self._ps.ZombieProcess, OSError):
                e.env = {}
        return e.env

    def _ident(self, e: _Entry) -> tuple[str, str]:
        hooked = self._hooked.get(e.id.pid)
        if hooked is not None:        # the hook's own labels win over anything derived
            return hooked[0], hooked[1]
        env = self._env(e)
        run = env.get("LOOPTUNE_RUN") or env.get("TORCHELASTIC_RUN_ID", "")
        if not run or run == "none":
            run = derive_run(e.cmdline)
        return _clean(run), env.get("RANK", "0")

    def _ranked(self, e: _Entry) -> bool:
        return e.id.pid in self._hooked or "RANK" in self._env(e)

    def _key(self, e: _Entry) -> tuple[str, str | None]:
        """Run, and rank only where one is set: a process with the same key as a matched
        ancestor belongs to that ancestor's job. A launcher without RANK derives the same run
        as its rank 0 (torchrun train.py, python train.py); they must stay apart."""
        run, rank = self._ident(e)
        return run, rank if self._ranked(e) else None

    def _ancestors(self, pid: int) -> Iterable[int]:
        seen = 0
        e = self._cache.get(pid)
        while e is not None and e.ppid > 0 and seen < 128:
            yield e.ppid
            e = self._cache.get(e.ppid)
            seen += 1

    # ---- jobs ----

    def _roots(self, gpu_pids: set[int]) -> list[_Entry]:
        born_before = time.time() - self.discover_after
        found = {pid for pid, e in self._cache.items() if e.matched} | (gpu_pids & self._cache.keys())
        cands = {pid for pid in found if self._cache[pid].id.create_time <= born_before} | \
            (self._hooked.keys() & self._cache.keys())
        cands.discard(self._self_pid)
        roots = []
        for pid in cands:
            e = self._cache[pid]
            me = self._key(e)
            hooked = pid in self._hooked
            if not any(a in cands and (self._key(self._cache[a]) == me or (a in self._hooked and not hooked))
                       for a in self._ancestors(pid)):
                roots.append(e)
        root_pids = {e.id.pid for e in roots}
        # a launcher (torchrun) without RANK whose children are ranked jobs is not a job itself;
        # a job that merely starts another matched command (an eval script) stays a job
        launchers = {a for e in roots if self._ranked(e) for a in self._ancestors(e.id.pid) if a in root_pids}
        return [e for e in roots if not (e.id.pid in launchers and not self._ranked(e))]

    def _trees(self, roots: list[_Entry]) -> dict[int, list[_Entry]]:
        children: dict[int, list[int]] = {}
        for pid, e in self._cache.items():
            children.setdefault(e.ppid, []).append(pid)
        root_pids = {e.id.pid for e in roots}
        trees = {}
        for root in roots:
            members, stack = [], [root.id.pid]
            while stack:
                pid = stack.pop()
                members.append(self._cache[pid])
                stack.extend(c for c in children.get(pid, ()) if c not in root_pids)
            trees[root.id.pid] = members
        return trees

    def sample(self) -> JobsSnapshot:
        self._refresh()
        self._hooked = dict(self._registered()) if self._registered else {}
        gpu = list(self._gpu_processes() or ()) if self._gpu_processes else []
        gpu_by_pid: dict[int, list[Any]] = {}
        for gp in gpu:
            gpu_by_pid.setdefault(gp.pid, []).append(gp)
        roots = sorted(self._roots(set(gpu_by_pid)), key=lambda e: (e.id.create_time, e.id.pid))
        over = max(0, len(roots) - self.max_jobs)
        if len(roots) > self.max_jobs:
            if not self._capped_logged:
                log.warning("%d jobs found; exporting the oldest %d (jobs.max_jobs)", len(roots), self.max_jobs)
                self._capped_logged = True
            roots = roots[:self.max_jobs]
        now = self._clock()
        jobs, names = [], set()
        for root_pid, members in self._trees(roots).items():
            job = self._measure(self._cache[root_pid], members, gpu_by_pid, now)
            if job is None:
                continue
            if (job.run, job.rank) in names:   # two runs of the same script: keep labels unique
                job = _renamed(job, f"{job.run}-{job.root_pid}")
            names.add((job.run, job.rank))
            jobs.append(job)
        self.last = JobsSnapshot(jobs, over)
        return self.last

    def _measure(self, root: _Entry, members: list[_Entry], gpu_by_pid: dict[int, list[Any]],
                 now: float) -> JobSample | None:
        ps = self._ps
        live, user, system, rss = [], 0.0, 0.0, 0
        uss: int | None = 0
        pss: int | None = 0
        io_r: int | None = 0
        io_w: int | None = 0
        demand: int | None = 0
        root_every = self.root_detail_interval or self.memory_detail_interval
        for e in members:
            every = root_every if e.id == root.id else self.memory_detail_interval
            try:
                with e.proc.oneshot():
                    if not e.proc.is_running():       # pid reused since we cached it
                        raise ps.NoSuchProcess(e.id.pid)
                    t = e.proc.cpu_times()
                    e.rss = int(e.proc.memory_info().rss)
                    rss += e.rss
                    try:
                        c = e.proc.io_counters()
                        # a zombie reads zeros: keep the last real reading, the one retired
                        last = e.io or (0, 0)
                        e.io = (max(last[0], int(c.read_bytes)), max(last[1], int(c.write_bytes)))
                    except (ps.AccessDenied, AttributeError):
                        e.io = None
                    if now - e.detail_at >= every:
                        e.detail_at = now
                        try:
                            full = e.proc.memory_full_info()
                            e.uss, e.pss = int(full.uss), int(getattr(full, "pss", 0)) or None
                        except ps.AccessDenied:
                            e.uss = e.pss = None
            except (ps.NoSuchProcess, ps.ZombieProcess, ProcessLookupError):
                self._retire(self._cache.pop(e.id.pid, e))   # a reused pid is read afresh next time
                if e.id == root.id:
                    return None
                continue
            except ps.AccessDenied:
                continue
            e.cpu = (float(t.user), float(t.system))
            e.job = root.id
            live.append(e)
            d = self._demand(e)
            demand = None if demand is None or d is None else demand + d
            user += e.cpu[0]
            system += e.cpu[1]
            uss = None if uss is None or e.uss is None else uss + e.uss
            pss = None if pss is None or e.pss is None else pss + e.pss
            if e.io is None:
                io_r = io_w = None
            elif io_r is not None and io_w is not None:
                io_r += e.io[0]
                io_w += e.io[1]
        r = self._retired.setdefault(root.id, _Retired())
        cpu = (max(r.last_cpu[0], r.cpu[0] + user), max(r.last_cpu[1], r.cpu[1] + system))
        r.last_cpu = cpu
        cores = None
        if r.rate_at is not None and now > r.rate_at[0]:
            cores = (cpu[0] + cpu[1] - r.rate_at[1]) / (now - r.rate_at[0])
        r.rate_at = (now, cpu[0] + cpu[1])
        demand_s = demand_cores = None
        if demand is not None:
            demand_s = r.last_demand = max(r.last_demand, (r.demand_ns + demand) / 1e9)
            if r.demand_at is not None and now > r.demand_at[0]:
                demand_cores = (demand_s - r.demand_at[1]) / (now - r.demand_at[0])
            r.demand_at = (now, demand_s)
        else:
            r.demand_at = None      # a rate only between two complete readings
        if io_r is not None and io_w is not None:
            io = (max(r.last_io[0], r.io[0] + io_r), max(r.last_io[1], r.io[1] + io_w))
            r.last_io = io
        gpu: dict[int, tuple[int | None, float | None]] = {}
        for e in live:
            for gp in gpu_by_pid.get(e.id.pid, ()):
                mem, sm = gpu.get(gp.gpu, (None, None))
                if gp.memory_bytes is not None:
                    mem = (mem or 0) + gp.memory_bytes
                if gp.sm_ratio is not None:
                    sm = min(1.0, (sm or 0.0) + gp.sm_ratio)
                gpu[gp.gpu] = (mem, sm)
        run, rank = self._ident(root)
        world = self._hooked[root.id.pid][2] if root.id.pid in self._hooked else \
            self._env(root).get("WORLD_SIZE", "1")
        return JobSample(run=run, rank=rank, world_size=world,
                         root_pid=root.id.pid, processes=len(live), cpu_user_seconds=cpu[0],
                         cpu_system_seconds=cpu[1], rss_bytes=rss, uss_bytes=uss, pss_bytes=pss,
                         io_read_bytes=r.last_io[0] if io_r is not None else None,
                         io_write_bytes=r.last_io[1] if io_w is not None else None,
                         gpu=gpu, pids=tuple(e.id.pid for e in live), cpu_cores=cores,
                         worker_uss_bytes=_sum_or_none(e.uss for e in live if e.id != root.id),
                         root_rss_bytes=root.rss if root in live else None,
                         cpu_demand_seconds=demand_s, cpu_cores_demand=demand_cores)

    def _demand(self, e: _Entry) -> int | None:
        """The process's demand in ns (its threads' run + run-queue wait, exited threads
        included), or None without a reading this time."""
        threads = self._schedstat(e.id.pid)
        if threads is None:
            return None
        for tid, old in e.threads.items():
            new = threads.get(tid)
            if new is None or new < old:     # the thread exited (or its id now names a new one)
                e.threads_gone_ns += old
        e.threads = threads
        e.demand_ns = e.threads_gone_ns + sum(threads.values())
        return e.demand_ns

    # ---- exposition ----

    def families(self, snap: JobsSnapshot) -> Iterable[Metric]:
        yield GaugeMetricFamily("looptune_jobs_not_exported", "Jobs found on the node beyond jobs.max_jobs, "
                                "left out of /metrics to bound its series (the oldest are kept).",
                                value=snap.not_exported)
        lab = ["run", "rank"]
        cpu = CounterMetricFamily("looptune_job_cpu_seconds", "CPU time of the job's process tree "
                                  "(DataLoader workers included), seconds.", labels=lab + ["mode"])
        demand = CounterMetricFamily("looptune_job_cpu_demand_seconds", "CPU demand of the job's process "
                                     "tree: time its threads ran plus time they waited on a run queue "
                                     "(schedstat), seconds. Absent where the kernel has no schedstat.",
                                     labels=lab)
        mem = GaugeMetricFamily("looptune_job_memory_bytes", "Memory of the job's process tree, bytes: rss "
                                "(counts shared pages once per process), uss (private), pss (shared "
                                "pages split).", labels=lab + ["kind"])
        procs = GaugeMetricFamily("looptune_job_processes", "Processes in the job's tree.", labels=lab)
        io = CounterMetricFamily("looptune_job_io_bytes", "Storage bytes read and written by the job's "
                                 "process tree.", labels=lab + ["direction"])
        gmem = GaugeMetricFamily("looptune_job_gpu_memory_bytes", "GPU memory held by the job's processes, "
                                 "bytes.", labels=lab + ["gpu"])
        gsm = GaugeMetricFamily("looptune_job_gpu_utilization_ratio", "SM utilization attributed to the "
                                "job's processes, 0..1.", labels=lab + ["gpu"])
        info = GaugeMetricFamily("looptune_job_info", "A training job on this node; value 1.",
                                 labels=lab + ["world_size", "pid"])
        for j in snap.jobs:
            lv = [j.run, j.rank]
            cpu.add_metric(lv + ["user"], j.cpu_user_seconds)
            cpu.add_metric(lv + ["system"], j.cpu_system_seconds)
            if j.cpu_demand_seconds is not None:
                demand.add_metric(lv, j.cpu_demand_seconds)
            mem.add_metric(lv + ["rss"], j.rss_bytes)
            if j.uss_bytes is not None:
                mem.add_metric(lv + ["uss"], j.uss_bytes)
            if j.pss_bytes is not None:
                mem.add_metric(lv + ["pss"], j.pss_bytes)
            procs.add_metric(lv, j.processes)
            if j.io_read_bytes is not None and j.io_write_bytes is not None:
                io.add_metric(lv + ["read"], j.io_read_bytes)
                io.add_metric(lv + ["write"], j.io_write_bytes)
            for g, (m, sm) in sorted(j.gpu.items()):
                if m is not None:
                    gmem.add_metric(lv + [str(g)], m)
                if sm is not None:
                    gsm.add_metric(lv + [str(g)], sm)
            info.add_metric(lv + [j.world_size, str(j.root_pid)], 1)
        yield from (info, cpu, demand, mem, procs, io, gmem, gsm)

    def close(self) -> None:
        pass


def _sum_or_none(values: Iterable[int | None]) -> int | None:
    total = 0
    for v in values:
        if v is None:
            return None
        total += v
    return total


def _renamed(job: JobSample, run: str) -> JobSample:
    from dataclasses import replace
    return replace(job, run=run)
