"""The control hook against a real daemon subprocess (tests/daemon/daemon_proc.py).

Each daemon gets a temporary socket and a free loopback port; training jobs run either in this
process or as their own process (train_hooked.py next to this file). Every wait is bounded,
and every daemon and training process is stopped at teardown.
"""
from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from daemon_proc import ROOT, DaemonPool, DaemonProc, Metrics, free_port
from looptune.tuners.hook import Hook

SCRIPT = Path(__file__).resolve().parent / "train_hooked.py"

# fast sampling and reports, so a test waits tenths of a second, not seconds
DAEMON_CONFIG = {
    "collectors": {"interval_seconds": 0.2, "gpu": {"enabled": False}, "host": {"enabled": False}},
    "hook": {"report_interval_seconds": 0.2},
}

# what the test runner's environment must not hand to a training job
_SCRUB = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
          "TORCHELASTIC_RUN_ID", "LOOPTUNE_SOCKET", "LOOPTUNE_CONFIG", "LOOPTUNE_RUN")


@pytest.fixture(scope="module")
def daemon() -> Iterator[DaemonProc]:
    """One daemon for the tests that do not stop it."""
    workdir = Path(tempfile.mkdtemp(prefix="lt-", dir="/tmp"))
    pool = DaemonPool(workdir)
    try:
        yield pool.start(DAEMON_CONFIG).wait_ready()
    finally:
        pool.close()
        shutil.rmtree(workdir, ignore_errors=True)


class TrainProc:
    """train_hooked.py as a subprocess; its stdout events are read by a thread."""

    def __init__(self, workdir: Path, args: list[str], tag: str) -> None:
        env = {k: v for k, v in os.environ.items() if k not in _SCRUB}
        env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
        self.stderr_path = workdir / f"train-{tag}.stderr"
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env,
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                                         text=True, start_new_session=True)
        self.events: queue.Queue[dict[str, Any] | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                self.events.put(json.loads(line))
            except ValueError:
                pass
        self.events.put(None)

    def _describe(self) -> str:
        return f"exit status {self.proc.poll()}; stderr:\n{self.stderr_path.read_text(errors='replace')[-3000:]}"

    def expect(self, event: str, timeout: float = 30.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                msg = self.events.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no {event!r} from the training job within {timeout}s; "
                                     f"{self._describe()}") from None
            if msg is None:
                self.proc.wait(5)
                raise AssertionError(f"training job ended before {event!r}; {self._describe()}")
            if msg.get("event") == event:
                return msg

    def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def wait(self, timeout: float = 30.0) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"training job still running after {timeout}s; {self._describe()}") from None

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                if f is not None:
                    f.close()
            except OSError:
                pass


@pytest.fixture
def trainers(short_tmp: Path) -> Iterator[Callable[..., TrainProc]]:
    started: list[TrainProc] = []

    def start(*args: str, tag: str = "") -> TrainProc:
        t = TrainProc(short_tmp, list(args), tag or str(len(started)))
        started.append(t)
        return t

    yield start
    for t in started:
        t.close()


@pytest.fixture
def hooks() -> Iterator[Callable[..., Hook]]:
    made: list[Hook] = []

    def make(*args: Any, **kwargs: Any) -> Hook:
        kwargs.setdefault("config", {})
        h = Hook(*args, **kwargs)
        made.append(h)
        return h

    yield make
    for h in made:
        h.close()


class Slow(Dataset):
    def __init__(self, n: int, delay: float) -> None:
        self.n, self.delay = n, delay

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        time.sleep(self.delay)
        return torch.tensor([i])


def samples(m: Metrics, run: str, rank: str = "0") -> float | None:
    return m.get("looptune_job_samples_total", run=run, rank=rank)


# ---- one job, end to end ----

def test_job_counts_and_process_tree_carry_the_hook_labels(daemon: DaemonProc,
                                                          trainers: Callable[..., TrainProc]) -> None:
    n, batch, workers = 40, 4, 2
    job = trainers("--socket", str(daemon.socket_path), "--run", "exp-1", "--n", str(n), "--batch", str(batch),
                   "--workers", str(workers), "--delay", "0.01", "--pause-at", "3")
    ready = job.expect("ready")
    assert ready["mode"] == "daemon"
    pid = str(ready["pid"])
    paused = job.expect("paused")
    assert paused["mode"] == "daemon"
    # tuning is on (the default): the daemon may change num_workers at a step, never during the pause
    knobs = paused["knobs"]
    assert knobs["batch_size"] == batch and knobs["num_workers"] >= 1

    # while it runs (paused mid-epoch, workers alive): the process tree is labelled like the hook
    def tree_labelled(m: Metrics) -> bool:
        procs = m.get("looptune_job_processes", run="exp-1", rank="0")
        return procs is not None and procs >= 1 + knobs["num_workers"] and \
            m.get("looptune_job_info", run="exp-1", rank="0", world_size="1", pid=pid) == 1 and \
            m.get("looptune_job_knob", run="exp-1", rank="0", knob="num_workers") == knobs["num_workers"]
    m = daemon.wait_until(tree_labelled, "the job's process tree and knobs under run=exp-1", timeout=10)
    assert m.get("looptune_job_cpu_seconds_total", run="exp-1", rank="0", mode="user") is not None
    assert samples(m, "exp-1") is not None
    assert m.get("looptune_job_knob", run="exp-1", rank="0", knob="batch_size") == batch
    # the name the jobs collector would derive from the command line is not used once the hook
    # registered (a sample taken before its hello may still show it, for one interval)
    # (other train_hooked.py processes, e.g. a previous test's still exiting, may be jobs of their own)
    daemon.wait_until(lambda m: not [lv for lv, _ in m.samples.get("looptune_job_info", [])
                                     if lv["pid"] == pid and lv["run"] != "exp-1"],
                      "our process under no other name", timeout=5)

    # `looptune status` shows it too
    out = subprocess.run([sys.executable, "-m", "looptune", "status", "--socket", str(daemon.socket_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    rows = [line.split() for line in out.stdout.splitlines() if line.startswith("exp-1")]
    assert len(rows) == 1, out.stdout
    assert rows[0][1:3] == ["0", pid]
    assert f"num_workers={knobs['num_workers']}" in rows[0] and f"batch_size={batch}" in rows[0], out.stdout

    job.go()
    done = job.expect("done")
    assert job.wait() == 0
    assert done["seen"] == n and done["counters"]["samples"] == n and done["errors"] == 0

    nbatches = n // batch
    m = daemon.wait_until(lambda m: samples(m, "exp-1") == n and
                          m.get("looptune_job_hook_connected", run="exp-1", rank="0") == 0,
                          "all samples of exp-1 after close", timeout=5)
    assert m.get("looptune_job_batches_total", run="exp-1", rank="0") == nbatches
    assert m.get("looptune_job_optimizer_steps_total", run="exp-1", rank="0") == nbatches
    assert m.get("looptune_job_step_seconds_count", run="exp-1", rank="0") == nbatches
    assert m.get("looptune_job_data_wait_seconds_total", run="exp-1", rank="0") > 0
    assert m.get("looptune_job_knob", run="exp-1", rank="0", knob="num_workers") == done["knobs"]["num_workers"]
    assert m.get("looptune_job_hook_errors_total", run="exp-1", rank="0") == 0


def test_two_ranks_under_torch_distributed(daemon: DaemonProc, trainers: Callable[..., TrainProc]) -> None:
    n, batch = 40, 4
    init = f"tcp://127.0.0.1:{free_port()}"
    jobs = []
    for rank in (0, 1):
        extra = ["--hook-before-init"] if rank == 1 else []   # rank 1 says hello before the group exists
        jobs.append(trainers("--socket", str(daemon.socket_path), "--run", "ddp-run", "--n", str(n),
                             "--batch", str(batch), "--workers", "0", "--pause-at", "2", "--rank", str(rank),
                             "--world", "2", "--init-method", init, *extra, tag=f"rank{rank}"))
    for j in jobs:
        j.expect("paused", timeout=60)

    def both_ranks(m: Metrics) -> bool:
        return all(m.get("looptune_job_info", run="ddp-run", rank=r, world_size="2") == 1 and
                   samples(m, "ddp-run", r) is not None for r in ("0", "1"))
    m = daemon.wait_until(both_ranks, "ranks 0 and 1 of ddp-run with world_size 2", timeout=10)
    assert not m.find("looptune_job_info", run="ddp-run", world_size="1")

    for j in jobs:
        j.go()
    done = [j.expect("done") for j in jobs]
    assert [j.wait() for j in jobs] == [0, 0]
    assert [(d["rank"], d["world"]) for d in done] == [(0, 2), (1, 2)]
    assert [d["counters"]["samples"] for d in done] == [n // 2, n // 2]
    m = daemon.wait_until(lambda m: samples(m, "ddp-run", "0") == n // 2 and samples(m, "ddp-run", "1") == n // 2,
                          "each rank's half of the samples", timeout=5)
    assert sum(m.find("looptune_job_samples_total", run="ddp-run")) == n


# ---- the daemon goes away and comes back ----

def test_training_survives_a_killed_daemon_and_rejoins_its_successor(daemons: DaemonPool, short_tmp: Path,
                                                                     hooks: Callable[..., Hook]) -> None:
    sock = short_tmp / "restart.sock"
    first = daemons.start(DAEMON_CONFIG, socket_path=sock).wait_ready()
    # tune=False: a knob change may fork workers inside step(); here step() must only count
    hook = hooks(run="survivor", socket=str(sock), tune=False)
    assert hook.mode == "daemon"
    n = 20
    loader = hook.watch(DataLoader(Slow(n, 0.005), batch_size=1))
    longest = 0.0
    epochs = 0
    deadline = time.monotonic() + 60

    def train_until(cond: Callable[[], bool], what: str) -> None:
        """Train whole epochs until `cond()` holds at an epoch's end; bounded."""
        nonlocal longest, epochs
        while True:
            for _ in loader:
                t0 = time.perf_counter()
                hook.step()
                longest = max(longest, time.perf_counter() - t0)
            epochs += 1
            if cond():
                return
            assert time.monotonic() < deadline, f"training went on for a minute without {what}"

    train_until(lambda: (samples(first.metrics(), "survivor") or 0) > 0, "a report reaching the first daemon")
    first.send(signal.SIGKILL)
    first.wait_exit(5)
    mode_lost_at = time.monotonic()
    train_until(lambda: hook.mode == "embedded", "the hook noticing the daemon is gone")
    assert time.monotonic() - mode_lost_at < 10
    before = hook.counters
    train_until(lambda: True, "")           # one more epoch with no daemon at all

    second = daemons.start(DAEMON_CONFIG, socket_path=sock).wait_ready()
    back_at = time.monotonic()
    seen: list[float] = []

    def rejoined() -> bool:
        s = samples(second.metrics(), "survivor")
        if s is not None:
            seen.append(s)
        return s is not None
    train_until(rejoined, "the job in the new daemon's /metrics")
    assert time.monotonic() - back_at <= 5
    assert hook.mode == "daemon"
    assert seen[0] >= before["samples"]     # the counters continue, not restart from zero
    hook.close()
    total = epochs * n
    assert hook.counters["samples"] == total
    m = second.wait_until(lambda m: samples(m, "survivor") == total, "every sample in the new daemon", timeout=5)
    assert m.get("looptune_job_optimizer_steps_total", run="survivor", rank="0") == total
    assert longest <= 0.05, f"a step() call took {longest:.3f}s"
    assert hook.errors == 0 and not hook.disabled


# ---- long steps, forked workers ----

def test_reports_continue_during_a_long_step(daemon: DaemonProc, hooks: Callable[..., Hook]) -> None:
    hook = hooks(run="long-step", socket=str(daemon.socket_path), tune=False)
    assert hook.mode == "daemon"
    stamps: list[float] = []
    stop = threading.Event()
    errors: list[BaseException] = []

    def watch() -> None:
        while not stop.is_set():
            try:
                v = daemon.metrics().get("looptune_job_last_report_timestamp_seconds", run="long-step", rank="0")
                if v is not None and (not stamps or v != stamps[-1]):
                    stamps.append(v)
            except BaseException as exc:  # noqa: BLE001 - handed to the test thread
                errors.append(exc)
                return
            stop.wait(0.1)

    for i, _ in enumerate(hook.watch(DataLoader(Slow(4, 0.0), batch_size=1))):
        if i == 1:
            daemon.wait_until(lambda m: samples(m, "long-step") is not None, "the first report", timeout=5)
            poller = threading.Thread(target=watch, daemon=True)
            poller.start()
            started = time.time()
            time.sleep(3)                 # one step of three seconds
            stop.set()
            poller.join(10)
        hook.step()
    assert not errors, errors
    assert len(stamps) >= 4, f"last report timestamps during a 3 s step: {stamps}"
    assert stamps == sorted(stamps)
    # reports went on into the step's last third, not only just after it began
    assert stamps[-1] >= started + 2.0, f"last report {stamps[-1] - started:.2f}s into a 3 s step"
    hook.close()
    m = daemon.wait_until(lambda m: m.get("looptune_job_optimizer_steps_total", run="long-step", rank="0") == 4,
                          "the last report", timeout=5)
    # the long step is in the histogram: one step above 2.5 s
    assert m.get("looptune_job_step_seconds_count", run="long-step", rank="0") == 4
    assert m.get("looptune_job_step_seconds_bucket", run="long-step", rank="0", le="2.5") == 3


class StrayHook(Dataset):
    """Runs in fork-context DataLoader workers and pokes the inherited hook."""

    def __init__(self, hook: Hook) -> None:
        self.hook = hook

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> int:
        self.hook.step()
        self.hook._channel._tick()        # what the reporter thread would send, were it there
        self.hook.close()
        return i


def test_forked_workers_never_speak_on_the_parents_connection(daemon: DaemonProc,
                                                              hooks: Callable[..., Hook]) -> None:
    hook = hooks(run="forked", socket=str(daemon.socket_path), tune=False)
    assert hook.mode == "daemon"
    base = daemon.metrics()
    rejected_before = sum(v for _, v in base.samples.get("looptune_messages_rejected_total", []))
    loader = DataLoader(StrayHook(hook), batch_size=2, num_workers=2, multiprocessing_context="fork")
    got = []
    for epoch in range(2):
        for b in hook.watch(loader):
            got += b.tolist()
            hook.step()
    assert sorted(got) == sorted(list(range(8)) * 2)
    m = daemon.wait_until(lambda m: samples(m, "forked") == 16, "all samples of the parent", timeout=5)
    assert m.get("looptune_hook_connections") == 1
    assert sum(v for _, v in m.samples.get("looptune_messages_rejected_total", [])) == rejected_before
    assert m.get("looptune_job_hook_connected", run="forked", rank="0") == 1
    assert hook.mode == "daemon" and hook._channel is not None and hook._channel.reconnects == 0
