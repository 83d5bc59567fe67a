"""The jobs collector against real process trees (tests/collectors/fake_train.py), and a property
test over random trees built from a fake psutil module."""
from __future__ import annotations

import contextlib
import os
import re
import select
import signal
import subprocess
import sys
import time
import uuid
from collections import namedtuple
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import psutil
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from looptune.collectors.jobs import ENV_KEYS, JobSample, JobsCollector, JobsSnapshot, derive_run, read_schedstat

FAKE = str(Path(__file__).resolve().parent / "fake_train.py")
RUN = "fake_train"     # derive_run of fake_train.py's command line
BURN = 0.05            # CPU seconds each fake process burns before it reports ready


# ---- real processes ----

class FakeTrain:
    """One fake_train.py process group; driven over its stdin, every read bounded."""

    def __init__(self, tag: str, workers: int = 0, burn: float = BURN, launch: int = 0,
                 env: dict[str, str] | None = None) -> None:
        base = {k: v for k, v in os.environ.items() if k not in ENV_KEYS and k != "LOCAL_RANK"}
        base.update(env or {})
        argv = [sys.executable, FAKE, "--tag", tag, "--workers", str(workers), "--burn", str(burn)]
        if launch:
            argv += ["--launch", str(launch)]
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=base,
                                     start_new_session=True)
        self._buf = b""
        try:
            words = self.readline().split()
        except BaseException:
            self.kill()
            raise
        assert words[0] == "ready", words
        self.pid = int(words[1])
        self.children = [int(w) for w in words[2:]]   # workers, or a launcher's ranked children

    def readline(self, timeout: float = 30.0) -> str:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"fake_train {self.proc.pid}: no reply in {timeout}s")
            if select.select([fd], [], [], left)[0]:
                chunk = os.read(fd, 4096)
                if not chunk:
                    raise EOFError(f"fake_train {self.proc.pid} exited ({self.proc.poll()})")
                self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode()

    def command(self, cmd: str) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(cmd.encode() + b"\n")
        self.proc.stdin.flush()
        return self.readline()

    def stop(self) -> None:
        """Quit gracefully (workers reaped by their parent: no orphan zombies), then kill the group."""
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                assert self.proc.stdin is not None
                self.proc.stdin.close()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=10)
        self.kill()

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        for f in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(OSError):
                if f is not None:
                    f.close()


@pytest.fixture
def tag() -> str:
    return uuid.uuid4().hex[:12]


@pytest.fixture
def spawn() -> Iterator[Any]:
    started: list[FakeTrain] = []

    def start(tag: str, **kw: Any) -> FakeTrain:
        f = FakeTrain(tag, **kw)
        started.append(f)
        return f

    yield start
    for f in reversed(started):
        f.stop()


def collector(tag: str, **kw: Any) -> JobsCollector:
    kw.setdefault("memory_detail_interval", 0.0)
    return JobsCollector([rf"fake_train\.py --tag {tag}\b"], **kw)


def only(snap: JobsSnapshot, root_pid: int) -> JobSample:
    found = [j for j in snap.jobs if j.root_pid == root_pid]
    assert len(found) == 1, snap.jobs
    return found[0]


def tree_cpu(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        t = psutil.Process(pid).cpu_times()
        total += t.user + t.system
    return total


def exposed(c: JobsCollector, snap: JobsSnapshot) -> CollectorRegistry:
    class One:
        def collect(self) -> Any:
            return c.families(snap)
    reg = CollectorRegistry(auto_describe=False)
    reg.register(One())
    return reg


def test_job_tree_with_workers(spawn: Any, tag: str) -> None:
    n = 3
    f = spawn(tag, workers=n, env={"RANK": "2", "WORLD_SIZE": "4"})
    c = collector(tag)
    tree = [f.pid, *f.children]
    assert all(tree_cpu([w]) > 0 for w in f.children)     # each worker burned some CPU
    before = tree_cpu(tree)
    snap = c.sample()
    after = tree_cpu(tree)
    assert len(snap.jobs) == 1
    job = only(snap, f.pid)
    assert job.processes == 1 + n
    assert sorted(job.pids) == sorted(tree)
    assert (job.run, job.rank, job.world_size) == (RUN, "2", "4")
    # the CPU of the whole tree, workers included, read between two readings of it
    assert before - 1e-6 <= job.cpu_user_seconds + job.cpu_system_seconds <= after + 1e-6
    assert job.rss_bytes > 0 and job.uss_bytes and job.pss_bytes
    assert 0 < job.uss_bytes <= job.pss_bytes <= job.rss_bytes * 1.05
    assert job.io_read_bytes is not None and job.io_write_bytes is not None

    reg = exposed(c, snap)
    lab = {"run": RUN, "rank": "2"}
    assert reg.get_sample_value("looptune_job_processes", lab) == 1 + n
    assert reg.get_sample_value("looptune_job_info", {**lab, "world_size": "4", "pid": str(f.pid)}) == 1
    assert reg.get_sample_value("looptune_job_cpu_seconds_total", {**lab, "mode": "user"}) == job.cpu_user_seconds
    for kind in ("rss", "uss", "pss"):
        assert reg.get_sample_value("looptune_job_memory_bytes", {**lab, "kind": kind}) > 0
    for direction in ("read", "write"):
        assert reg.get_sample_value("looptune_job_io_bytes_total", {**lab, "direction": direction}) >= 0


def test_cpu_stays_monotonic_when_a_worker_exits(spawn: Any, tag: str) -> None:
    # the worker that leaves burned far more than the main process burns afterwards: without the
    # retired totals the job's counter would stall at its old value instead of growing
    f = spawn(tag, workers=2, burn=0.3)
    c = collector(tag)
    first = only(c.sample(), f.pid)
    before = first.cpu_user_seconds + first.cpu_system_seconds
    assert before > 0

    leaving = int(f.command("exit").split()[1])
    assert leaving in f.children and not psutil.pid_exists(leaving)
    main_before = tree_cpu([f.pid])
    assert f.command("burn 0.15") == "burned"
    main_gain = tree_cpu([f.pid]) - main_before
    assert main_gain >= 0.1

    second = only(c.sample(), f.pid)
    assert second.processes == 2
    assert leaving not in second.pids
    assert second.cpu_user_seconds >= first.cpu_user_seconds
    assert second.cpu_system_seconds >= first.cpu_system_seconds
    after = second.cpu_user_seconds + second.cpu_system_seconds
    assert after - before >= main_gain - 0.02   # the main process's new CPU on top of everything before


def test_run_and_rank_labels_from_the_environment(spawn: Any, tag: str) -> None:
    plain = spawn(tag)
    elastic = spawn(tag, env={"TORCHELASTIC_RUN_ID": "elastic-7", "RANK": "1", "WORLD_SIZE": "2"})
    named = spawn(tag, env={"LOOPTUNE_RUN": "my run", "TORCHELASTIC_RUN_ID": "elastic-7", "RANK": "0"})
    unset = spawn(tag, env={"TORCHELASTIC_RUN_ID": "none", "RANK": "3"})   # torchrun's default id
    snap = collector(tag).sample()
    assert len(snap.jobs) == 4
    got = {j.root_pid: (j.run, j.rank, j.world_size) for j in snap.jobs}
    assert got[plain.pid] == (RUN, "0", "1")
    assert got[elastic.pid] == ("elastic-7", "1", "2")
    assert got[named.pid] == ("my_run", "0", "1")       # LOOPTUNE_RUN wins, cleaned to a label value
    assert got[unset.pid] == (RUN, "3", "1")


def test_two_runs_of_one_script_get_distinct_labels(spawn: Any, tag: str) -> None:
    a = spawn(tag, workers=1)
    b = spawn(tag, workers=1)
    c = collector(tag)
    snap = c.sample()
    assert {j.root_pid for j in snap.jobs} == {a.pid, b.pid}
    assert only(snap, a.pid).run == RUN                   # the older keeps the plain name
    assert only(snap, b.pid).run == f"{RUN}-{b.pid}"
    assert all(j.processes == 2 for j in snap.jobs)
    reg = exposed(c, snap)
    assert reg.get_sample_value("looptune_job_processes", {"run": RUN, "rank": "0"}) == 2
    assert reg.get_sample_value("looptune_job_processes", {"run": f"{RUN}-{b.pid}", "rank": "0"}) == 2


def test_launcher_is_not_a_job_its_ranks_are(spawn: Any, tag: str) -> None:
    # launcher and ranks run the same script, so they derive the same run name (as torchrun does)
    launcher = spawn(tag, launch=2, workers=1)
    assert len(launcher.children) == 2
    snap = collector(tag).sample()
    assert launcher.pid not in {j.root_pid for j in snap.jobs}
    assert all(launcher.pid not in j.pids for j in snap.jobs)
    ranks = {j.rank: j for j in snap.jobs}
    assert sorted(ranks) == ["0", "1"]
    assert {j.root_pid for j in snap.jobs} == set(launcher.children)
    for j in snap.jobs:
        assert j.run == RUN and j.world_size == "2"
        assert j.processes == 2                           # the rank and its worker


def test_max_jobs_keeps_the_oldest(spawn: Any, tag: str) -> None:
    fs = [spawn(tag) for _ in range(3)]                   # each is ready before the next starts
    c = collector(tag, max_jobs=2)
    snap = c.sample()
    assert [j.root_pid for j in snap.jobs] == [fs[0].pid, fs[1].pid]
    assert snap.not_exported == 1                        # counted, so the cap shows on a dashboard
    fams = {f.name: f for f in c.families(snap)}
    assert fams["looptune_jobs_not_exported"].samples[0].value == 1
    snap = collector(tag, max_jobs=3).sample()
    assert len(snap.jobs) == 3 and snap.not_exported == 0


def test_own_pid_is_never_a_job(spawn: Any, tag: str) -> None:
    f = spawn(tag)
    assert [j.root_pid for j in collector(tag).sample().jobs] == [f.pid]
    assert collector(tag, self_pid=f.pid).sample().jobs == []
    # by default the daemon's pid is its own, even where a pattern matches its command line
    me = re.escape(" ".join(psutil.Process().cmdline()))
    assert all(j.root_pid != os.getpid() for j in JobsCollector([me]).sample().jobs)


def test_a_found_process_waits_for_its_hook_before_it_is_a_job(spawn: Any, tag: str) -> None:
    f = spawn(tag)
    assert collector(tag, discover_after=3600).sample().jobs == []          # too young to be named yet
    assert [j.root_pid for j in collector(tag, discover_after=0).sample().jobs] == [f.pid]
    # a hook that registered names it at once, whatever its age
    hooked = collector(tag, discover_after=3600, registered=lambda: {f.pid: ("exp-9", "0", "1")})
    assert [(j.run, j.rank) for j in hooked.sample().jobs] == [("exp-9", "0")]


def test_dead_process_leaves_the_next_snapshot(spawn: Any, tag: str) -> None:
    keep = spawn(tag)
    gone = spawn(tag)
    c = collector(tag)
    assert {j.root_pid for j in c.sample().jobs} == {keep.pid, gone.pid}
    gone.kill()
    assert [j.root_pid for j in c.sample().jobs] == [keep.pid]


class GpuProc(NamedTuple):
    pid: int
    gpu: int
    memory_bytes: int | None
    sm_ratio: float | None


def test_gpu_use_is_summed_over_the_tree(spawn: Any, tag: str) -> None:
    f = spawn(tag, workers=2, env={"RANK": "0"})
    other = spawn(uuid.uuid4().hex[:12])                 # not matched: its GPU use is its own
    w0, w1 = f.children
    procs = [GpuProc(f.pid, 0, 1_000_000, 0.5), GpuProc(w0, 0, 250_000, 0.25),
             GpuProc(w1, 1, 300_000, None), GpuProc(other.pid, 0, 7_000_000, 0.125)]
    c = collector(tag, gpu_processes=lambda: procs)
    snap = c.sample()
    job = only(snap, f.pid)
    assert job.gpu == {0: (1_250_000, 0.75), 1: (300_000, None)}
    reg = exposed(c, snap)
    lab = {"run": RUN, "rank": "0"}
    assert reg.get_sample_value("looptune_job_gpu_memory_bytes", {**lab, "gpu": "0"}) == 1_250_000
    assert reg.get_sample_value("looptune_job_gpu_memory_bytes", {**lab, "gpu": "1"}) == 300_000
    assert reg.get_sample_value("looptune_job_gpu_utilization_ratio", {**lab, "gpu": "0"}) == 0.75
    assert reg.get_sample_value("looptune_job_gpu_utilization_ratio", {**lab, "gpu": "1"}) is None


def test_unmatched_process_with_a_gpu_context_is_a_job(spawn: Any, tag: str) -> None:
    f = spawn(uuid.uuid4().hex[:12], workers=1)          # its command line matches no pattern
    assert collector(tag).sample().jobs == []
    snap = collector(tag, gpu_processes=lambda: [GpuProc(f.pid, 3, 4096, 0.5)]).sample()
    job = only(snap, f.pid)
    assert job.run == RUN and job.processes == 2
    assert job.gpu == {3: (4096, 0.5)}


def test_reconfigure_matches_cached_processes_again(spawn: Any, tag: str) -> None:
    f = spawn(tag)
    c = JobsCollector([r"no-such-command-\d{9}"], memory_detail_interval=0.0)
    assert c.sample().jobs == []
    c.configure([rf"fake_train\.py --tag {tag}\b"], 0.0, 8)
    assert [j.root_pid for j in c.sample().jobs] == [f.pid]


@pytest.mark.parametrize(("cmdline", "run"), [
    (["python", "train.py"], "train"),
    (["python", "-m", "pkg.mod"], "mod"),
    (["python3", "-u", "-m", "trainer", "--lr", "0.1"], "trainer"),
    (["torchrun", "--nproc", "2", "train.py"], "train"),
    (["python", "-m", "torch.distributed.run", "--nproc-per-node", "2", "train.py"], "train"),
    (["python", "-m", "torch.distributed.launch", "-m", "pkg.fit"], "fit"),
    (["/usr/bin/python3", "/path/to/my-train.py"], "my-train"),
    (["python", "/data/my job (v2).py"], "my_job_v2_"),
    (["/opt/bin/trainer"], "trainer"),
    ([], "unknown"),
])
def test_derive_run(cmdline: list[str], run: str) -> None:
    assert derive_run(cmdline) == run


# ---- property test over a fake psutil ----

pcputimes = namedtuple("pcputimes", "user system children_user children_system iowait")
pmem = namedtuple("pmem", "rss vms shared text lib data dirty")
pio = namedtuple("pio", "read_count write_count read_bytes write_bytes read_chars write_chars")
pfullmem = namedtuple("pfullmem", "rss vms shared text lib data dirty uss pss swap")


@dataclass
class FProc:
    pid: int
    ppid: int                 # as at creation: the collector reads it once per process
    create_time: float
    cmdline: list[str]
    env: dict[str, str]
    foreign: bool = False     # another user's: environ, io and memory maps are denied
    zombie: bool = False
    user: float = 0.0
    system: float = 0.0
    io: list[int] = field(default_factory=lambda: [0, 0])
    rss: int = 1 << 20


class FakePs:
    """What JobsCollector uses of psutil, with psutil's signatures and Linux behaviour for zombies
    (cmdline and environ raise ZombieProcess; cpu times stay; memory and I/O read as zeros)."""

    class Error(Exception):
        pass

    class NoSuchProcess(Error):
        def __init__(self, pid: int, name: str | None = None, msg: str | None = None) -> None:
            super().__init__(msg or f"process no longer exists (pid={pid})")
            self.pid, self.name = pid, name

    class ZombieProcess(NoSuchProcess):
        def __init__(self, pid: int, name: str | None = None, ppid: int | None = None,
                     msg: str | None = None) -> None:
            super().__init__(pid, name, msg or f"PID still exists but it's a zombie (pid={pid})")
            self.ppid = ppid

    class AccessDenied(Error):
        def __init__(self, pid: int | None = None, name: str | None = None, msg: str | None = None) -> None:
            super().__init__(msg or f"(pid={pid})")
            self.pid, self.name = pid, name

    def __init__(self) -> None:
        self.procs: dict[int, FProc] = {}
        self.next_pid = 1
        self.now = 1000.0
        ps = self

        class Process:
            def __init__(self, pid: int) -> None:
                if pid not in ps.procs:
                    raise ps.NoSuchProcess(pid)
                self.pid = pid
                self._ct = ps.procs[pid].create_time

            def _p(self) -> FProc:
                p = ps.procs.get(self.pid)
                if p is None:
                    raise ps.NoSuchProcess(self.pid)
                return p

            @contextlib.contextmanager
            def oneshot(self) -> Iterator[None]:
                yield

            def create_time(self) -> float:
                return self._p().create_time

            def ppid(self) -> int:
                return self._p().ppid

            def is_running(self) -> bool:
                p = ps.procs.get(self.pid)
                return p is not None and p.create_time == self._ct

            def cmdline(self) -> list[str]:
                p = self._p()
                if p.zombie:
                    raise ps.ZombieProcess(self.pid)
                return list(p.cmdline)

            def environ(self) -> dict[str, str]:
                p = self._p()
                if p.zombie:
                    raise ps.ZombieProcess(self.pid)
                if p.foreign:
                    raise ps.AccessDenied(self.pid)
                return dict(p.env)

            def cpu_times(self) -> Any:
                p = self._p()
                return pcputimes(p.user, p.system, 0.0, 0.0, 0.0)

            def memory_info(self) -> Any:
                p = self._p()
                rss = 0 if p.zombie else p.rss
                return pmem(rss, rss * 2, 0, 0, 0, 0, 0)

            def io_counters(self) -> Any:
                p = self._p()
                if p.foreign:
                    raise ps.AccessDenied(self.pid)
                r, w = (0, 0) if p.zombie else p.io
                return pio(1, 1, r, w, r, w)

            def memory_full_info(self) -> Any:
                p = self._p()
                if p.foreign:
                    raise ps.AccessDenied(self.pid)
                rss = 0 if p.zombie else p.rss
                return pfullmem(rss, rss * 2, 0, 0, 0, 0, 0, rss // 2, rss * 3 // 4, 0)

        self.Process = Process

    def pids(self) -> list[int]:
        return sorted(self.procs)

    # ---- the world changing between samples ----

    def spawn(self, ppid: int, cmdline: list[str], env: dict[str, str], foreign: bool = False,
              cpu: float = 0.0) -> FProc:
        self.now += 0.5
        p = FProc(self.next_pid, ppid, self.now, cmdline, env, foreign, user=cpu, system=cpu / 4)
        self.procs[p.pid] = p
        self.next_pid += 1
        return p

    def exit(self, pid: int) -> None:
        """The process ends; a parent other than init leaves it a zombie until it reaps it."""
        p = self.procs[pid]
        for c in list(self.procs.values()):
            if c.ppid == pid and c.zombie:       # reparented to init, which reaps at once
                del self.procs[c.pid]
        parent = self.procs.get(p.ppid)
        if p.ppid <= 1 or parent is None or parent.zombie:
            del self.procs[pid]
        else:
            p.zombie = True


def test_a_reused_pid_is_a_new_process() -> None:
    ps = FakePs()
    ps.spawn(0, ["/sbin/init"], {})
    old = ps.spawn(1, ["python", "train.py"], {"RANK": "0"}, cpu=5.0)
    c = JobsCollector([r"\.py"], ps=ps, self_pid=0, memory_detail_interval=0.0)
    assert [(j.run, j.cpu_user_seconds) for j in c.sample().jobs] == [("train", 5.0)]
    # between two samples the job ends and its pid goes to a new job
    del ps.procs[old.pid]
    ps.now += 60
    ps.procs[old.pid] = FProc(old.pid, 1, ps.now, ["python", "eval.py"], {"RANK": "0"}, user=1.0)
    runs = [[(j.run, j.cpu_user_seconds) for j in c.sample().jobs] for _ in range(2)]
    assert ("train", 5.0) not in runs[0]
    assert runs[1] == [("eval", 1.0)]


def test_the_training_process_own_uss_is_read_less_often_than_its_workers() -> None:
    ps = FakePs()
    ps.spawn(0, ["/sbin/init"], {})
    train = ps.spawn(1, ["python", "train.py"], {"RANK": "0"})
    worker = ps.spawn(train.pid, ["python", "train.py"], {"RANK": "0"})
    now = [0.0]
    c = JobsCollector([r"\.py"], ps=ps, self_pid=0, memory_detail_interval=2.0, root_detail_interval=10.0,
                      clock=lambda: now[0])
    seen = []
    for t in range(0, 13):          # a sample a second; memory grows 1 MiB a second in both
        now[0] = float(t)
        train.rss = worker.rss = (t + 1) << 20
        (job,) = c.sample().jobs
        seen.append(job.uss_bytes)
    # USS is half of RSS in the fake: the worker's is read at 0, 2, 4, ..., the training process's at 0 and 10
    half = 1 << 19
    assert seen[0] == 2 * half and seen[1] == seen[0]
    assert seen[2] == half + 3 * half            # the worker read again at 2 s, the root still its 0 s value
    assert seen[10] == 11 * half + 11 * half     # both read at 10 s
    assert seen[12] == 11 * half + 13 * half


MATCH = [r"train\.py", r"eval\.py", r"^torchrun "]
SELF = 2
COMMANDS = [
    ["python", "train.py"],
    ["python", "eval.py", "--fast"],
    ["torchrun", "--nproc", "2", "train.py"],
    ["bash", "-c", "sleep 1000"],
    ["python", "-c", "from multiprocessing.spawn import spawn_main"],
]
ENVS = [None, {"RANK": "0"}, {"RANK": "1"}, {"LOOPTUNE_RUN": "exp"}, {"TORCHELASTIC_RUN_ID": "e1", "RANK": "0"}]

step = st.one_of(
    # a child of a live process (a fork copies the parent's command line and environment)
    st.tuples(st.just("spawn"), st.integers(0, 1000), st.integers(-3, len(COMMANDS) - 1),
              st.integers(0, len(ENVS) - 1), st.integers(0, 7).map(lambda i: i == 0), st.floats(0, 5)),
    # CPU and I/O used by one live process, or by every one
    st.tuples(st.just("run"), st.integers(-1, 1000), st.floats(0, 3), st.floats(0, 1),
              st.integers(0, 10_000), st.integers(0, 10_000)),
    st.tuples(st.just("exit"), st.integers(0, 1000), st.integers(0, 3).map(bool)),
    st.tuples(st.just("reap"), st.integers(0, 1000)),
)


def expected_jobs(ps: FakePs) -> dict[int, int]:
    """pid -> root pid of its job, from the documented rules, on the true process table."""
    procs = ps.procs

    def env(p: FProc) -> dict[str, str]:
        return {} if p.foreign else p.env

    def key(p: FProc) -> tuple[str, str | None]:
        e = env(p)
        run = e.get("LOOPTUNE_RUN") or e.get("TORCHELASTIC_RUN_ID", "")
        return (run if run and run != "none" else derive_run(p.cmdline)), e.get("RANK")

    def ancestors(pid: int) -> list[int]:
        out, p = [], procs[pid]
        while p.ppid in procs:
            out.append(p.ppid)
            p = procs[p.ppid]
        return out

    cands = {pid for pid, p in procs.items() if any(re.search(m, " ".join(p.cmdline)) for m in MATCH)}
    cands.discard(SELF)
    roots = {pid for pid in cands
             if not any(a in cands and key(procs[a]) == key(procs[pid]) for a in ancestors(pid))}
    ranked = {pid for pid in roots if "RANK" in env(procs[pid])}
    launchers = {a for pid in ranked for a in ancestors(pid) if a in roots and "RANK" not in env(procs[a])}
    jobs = roots - launchers
    out = {}
    for pid in procs:
        for a in [pid, *ancestors(pid)]:
            if a in jobs:
                out[pid] = a
                break
    return out


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=st.lists(step, min_size=10, max_size=60))
# a worker's I/O read while it is a zombie (zeros) must not replace its last real reading
@example(steps=[("spawn", 0, 0, 0, False, 1.0), ("spawn", 1, -1, 0, False, 0.5),
                ("run", 2, 1.0, 0.5, 1000, 2000), ("exit", 1, False), ("reap", 0), ("run", 1, 0.5, 0.0, 10, 10)])
# a launcher and its rank 0 derive the same run; a job that starts an eval script stays a job
@example(steps=[("spawn", 0, 2, 0, False, 1.0), ("spawn", 1, 0, 1, False, 0.5),
                ("spawn", 1, 0, 2, False, 0.5), ("spawn", 0, 0, 0, False, 1.0), ("spawn", 4, 1, 0, False, 1.0)])
def test_every_tree_member_counted_once_and_counters_monotonic(steps: list[tuple[Any, ...]]) -> None:
    ps = FakePs()
    init = ps.spawn(0, ["/sbin/init"], {}, foreign=True)                # pid 1
    daemon = ps.spawn(1, ["python", "train.py", "--daemon"], {})        # pid 2: the daemon itself
    c = JobsCollector(MATCH, ps=ps, self_pid=SELF, max_jobs=1000, memory_detail_interval=0.0)
    last: dict[tuple[int, float], tuple[float, float, int | None, int | None]] = {}
    ever: dict[tuple[int, float], set[int]] = {}     # pids ever seen in the job
    final = {init.pid: init, daemon.pid: daemon}      # every process's last state, dead ones too
    lost: set[tuple[int, float]] = set()             # jobs a live member left: no exact totals
    no_io: set[tuple[int, float]] = set()            # jobs that had a member whose I/O is denied
    prev: dict[tuple[int, float], set[int]] = {}

    for s in steps:
        live = [p for p in ps.procs.values() if not p.zombie and p.pid != SELF]
        if s[0] == "spawn":
            parent = live[s[1] % len(live)]
            if s[2] < 0:                                           # fork: a DataLoader worker
                cmd, env = parent.cmdline, dict(parent.env)
            else:
                cmd, env = COMMANDS[s[2]], dict(parent.env, **(ENVS[s[3]] or {}))
            child = ps.spawn(parent.pid, cmd, env, foreign=s[4] and s[2] >= 0, cpu=s[5])
            final[child.pid] = child
        elif s[0] == "run":
            for p in live if s[1] < 0 else [live[s[1] % len(live)]]:
                p.user += s[2]
                p.system += s[3]
                p.io[0] += s[4]
                p.io[1] += s[5]
        elif s[0] == "exit":
            cands = [p for p in live if p.pid > 1]
            if s[2]:                                               # a leaf: nothing orphaned
                parents = {p.ppid for p in ps.procs.values()}
                cands = [p for p in cands if p.pid not in parents]
            if cands:
                ps.exit(cands[s[1] % len(cands)].pid)
        elif s[0] == "reap":
            zombies = [p for p in ps.procs.values() if p.zombie]
            if zombies:
                del ps.procs[zombies[s[1] % len(zombies)].pid]

        snap = c.sample()
        by_pid: dict[int, int] = {}
        for j in snap.jobs:
            assert j.processes == len(j.pids) == len(set(j.pids))
            for pid in j.pids:
                assert pid not in by_pid, f"pid {pid} counted in two jobs"
                by_pid[pid] = j.root_pid
        assert by_pid == expected_jobs(ps)
        assert len({(j.run, j.rank) for j in snap.jobs}) == len(snap.jobs)

        cur: dict[tuple[int, float], set[int]] = {}
        for j in snap.jobs:
            k = (j.root_pid, ps.procs[j.root_pid].create_time)
            cur[k] = set(j.pids)
            was = last.get(k)
            if was is not None:
                assert j.cpu_user_seconds >= was[0] and j.cpu_system_seconds >= was[1]
                if j.io_read_bytes is not None and was[2] is not None:
                    assert j.io_read_bytes >= was[2] and j.io_write_bytes >= was[3]
            last[k] = (j.cpu_user_seconds, j.cpu_system_seconds, j.io_read_bytes, j.io_write_bytes)
            live_user = sum(ps.procs[pid].user for pid in j.pids)
            assert j.cpu_user_seconds >= live_user - 1e-6
        for k, pids in prev.items():
            if any(pid in ps.procs for pid in pids - cur.get(k, set())):
                lost.add(k)                    # left the job alive (orphaned, or its root a launcher)
        for k, pids in cur.items():
            ever.setdefault(k, set()).update(pids)
            if any(final[pid].foreign for pid in pids):
                no_io.add(k)
        prev = cur
        # exact totals: everything a job's processes ever used, the exited ones included
        for j in snap.jobs:
            k = (j.root_pid, ps.procs[j.root_pid].create_time)
            if k in lost:
                continue
            members = [final[pid] for pid in ever[k]]
            assert j.cpu_user_seconds == pytest.approx(sum(p.user for p in members), abs=1e-6)
            assert j.cpu_system_seconds == pytest.approx(sum(p.system for p in members), abs=1e-6)
            if k not in no_io and j.io_read_bytes is not None:
                assert j.io_read_bytes == sum(p.io[0] for p in members)
                assert j.io_write_bytes == sum(p.io[1] for p in members)


# ---- CPU demand (schedstat), from a fake process table and a fake schedstat reader ----

class FakeSched:
    """pid -> {tid: ns run + waited}; a pid missing reads as no schedstat (None)."""

    def __init__(self) -> None:
        self.threads: dict[int, dict[int, int]] = {}

    def __call__(self, pid: int) -> dict[int, int] | None:
        t = self.threads.get(pid)
        return None if t is None else dict(t)


def demand_setup() -> tuple[FakePs, FakeSched, JobsCollector, list[float], FProc, FProc]:
    ps, sched, now = FakePs(), FakeSched(), [100.0]
    ps.spawn(0, ["/sbin/init"], {})
    main = ps.spawn(1, ["python", "train.py"], {"RANK": "0"})
    worker = ps.spawn(main.pid, ["python", "train.py"], {"RANK": "0"})
    c = JobsCollector([r"train\.py"], ps=ps, self_pid=0, memory_detail_interval=0.0, schedstat=sched,
                      clock=lambda: now[0])
    return ps, sched, c, now, main, worker


def test_demand_is_a_rate_over_the_sample_interval() -> None:
    ps, sched, c, now, main, worker = demand_setup()
    sched.threads = {main.pid: {main.pid: 1_000_000_000, 50: 0}, worker.pid: {worker.pid: 500_000_000}}
    first = c.sample().jobs[0]
    assert first.cpu_demand_seconds == pytest.approx(1.5) and first.cpu_cores_demand is None
    # over 2 s: the main thread ran 1 s and waited 1 s, a second thread 1 s, the worker 1 s
    sched.threads = {main.pid: {main.pid: 3_000_000_000, 50: 1_000_000_000}, worker.pid: {worker.pid: 1_500_000_000}}
    now[0] += 2.0
    second = c.sample().jobs[0]
    assert second.cpu_demand_seconds == pytest.approx(5.5)
    assert second.cpu_cores_demand == pytest.approx(2.0)
    reg = exposed(c, c.last)
    assert reg.get_sample_value("looptune_job_cpu_demand_seconds_total", {"run": "train", "rank": "0"}) == \
        pytest.approx(5.5)


def test_demand_stays_monotonic_when_threads_and_workers_exit() -> None:
    ps, sched, c, now, main, worker = demand_setup()
    sched.threads = {main.pid: {main.pid: 10**9, 50: 4 * 10**9}, worker.pid: {worker.pid: 3 * 10**9}}
    assert c.sample().jobs[0].cpu_demand_seconds == pytest.approx(8.0)
    # thread 50 exits; the worker exits (a zombie keeps its reading); the main thread runs 1 s more
    sched.threads = {main.pid: {main.pid: 2 * 10**9}, worker.pid: {worker.pid: 3 * 10**9}}
    ps.exit(worker.pid)
    now[0] += 1.0
    job = c.sample().jobs[0]
    assert job.cpu_demand_seconds == pytest.approx(9.0)
    assert job.cpu_cores_demand == pytest.approx(1.0)
    del ps.procs[worker.pid]         # reaped: its last reading stays in the job's total
    del sched.threads[worker.pid]
    # a new thread takes a reused tid: a smaller reading is a new thread, not a step back
    sched.threads = {main.pid: {main.pid: 2 * 10**9, 50: 10**9}}
    now[0] += 1.0
    job = c.sample().jobs[0]
    assert job.cpu_demand_seconds == pytest.approx(10.0)
    assert job.cpu_cores_demand == pytest.approx(1.0)


def test_no_schedstat_is_none_not_an_error() -> None:
    ps, sched, c, now, main, worker = demand_setup()
    for _ in range(2):
        job = c.sample().jobs[0]
        now[0] += 1.0
        assert job.cpu_demand_seconds is None and job.cpu_cores_demand is None
        assert job.processes == 2
    assert exposed(c, c.last).get_sample_value("looptune_job_cpu_demand_seconds_total",
                                               {"run": "train", "rank": "0"}) is None
    # one member without a reading: the job's demand is unknown, not a partial sum; the rate
    # starts again from the next two complete readings
    sched.threads = {main.pid: {main.pid: 10**9}, worker.pid: {worker.pid: 10**9}}
    assert c.sample().jobs[0].cpu_demand_seconds == pytest.approx(2.0)
    del sched.threads[worker.pid]
    now[0] += 1.0
    assert c.sample().jobs[0].cpu_cores_demand is None
    sched.threads = {main.pid: {main.pid: 2 * 10**9}, worker.pid: {worker.pid: 2 * 10**9}}
    now[0] += 1.0
    job = c.sample().jobs[0]
    assert job.cpu_demand_seconds == pytest.approx(4.0) and job.cpu_cores_demand is None
    now[0] += 1.0
    sched.threads = {main.pid: {main.pid: 3 * 10**9}, worker.pid: {worker.pid: 2 * 10**9}}
    assert c.sample().jobs[0].cpu_cores_demand == pytest.approx(1.0)


def test_a_real_job_has_a_demand(spawn: Any, tag: str) -> None:
    if read_schedstat(os.getpid()) is None:
        pytest.skip("no schedstat in this kernel")
    f = spawn(tag, workers=1)
    c = collector(tag)
    first = only(c.sample(), f.pid)
    assert first.cpu_demand_seconds is not None and first.cpu_demand_seconds > 0
    assert f.command("burn 0.1") == "burned"
    second = only(c.sample(), f.pid)
    assert second.cpu_demand_seconds >= first.cpu_demand_seconds + 0.09
    assert second.cpu_cores_demand is not None and second.cpu_cores_demand > 0
