"""Worker memory stays under the configured budget in a test whose dataset holds a large object
per worker.

Each loader worker allocates (and writes) PER_WORKER bytes in its worker_init_fn; items sleep a
few milliseconds, so the loop waits for data and the workers tuner climbs. The hook runs embedded
(nothing listens on its socket) with the real workers tuner. A control run with a budget far
above what the workers use climbs to 4 workers or more; the run with the budget keeps the
workers' total USS, sampled every 0.5 s with psutil, under the budget.
"""
from __future__ import annotations

import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import psutil
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from looptune.tuners.hook import Hook
from looptune.tuners.hook.actuators.loader import _shutdown

PER_WORKER = 60 * 2**20
BUDGET = 200 * 2**20
ITEM_SECONDS = 0.003
STEP_SECONDS = 0.002
BATCH = 8
CONTROL_DEADLINE = 30.0


class Heavy(Dataset):
    """Latency-bound items; each worker holds a large private object (see hold_memory)."""

    def __len__(self) -> int:
        return 200_000

    def __getitem__(self, i: int) -> torch.Tensor:
        time.sleep(ITEM_SECONDS)
        return torch.tensor(i)


def hold_memory(worker_id: int) -> None:
    ballast = bytearray(PER_WORKER)
    ballast[::4096] = b"\x01" * len(range(0, PER_WORKER, 4096))     # touch every page: real, private memory
    info = get_worker_info()
    assert info is not None
    info.dataset.ballast = ballast


def workers_uss() -> int:
    total = 0
    for child in psutil.Process().children():
        try:
            if child.status() != psutil.STATUS_ZOMBIE:
                total += child.memory_full_info().uss
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            pass
    return total


@pytest.fixture
def tmp() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="lt-mem-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def make_hook(tmp: Path, run: str, budget: int) -> Hook:
    config = {
        "hook": {"report_interval_seconds": 0.5},
        "tuners": {"enabled": ["workers"], "state_file": str(tmp / f"{run}.json"),
                   "baseline_windows": 2, "measure_windows": 2, "settle_windows": 1, "cooldown_windows": 1,
                   "workers": {"memory_budget_bytes": budget}},
    }
    hook = Hook(run=run, socket=str(tmp / "nobody.sock"), config=config)
    assert hook.mode == "embedded" and not hook.disabled
    return hook


def train(hook: Hook, seconds: float, stop: Callable[[], bool] = lambda: False) -> tuple[float, Any]:
    """The loop: input-bound, a short step; until `seconds` pass or `stop()`; returns the time taken."""
    loader = hook.watch(DataLoader(Heavy(), batch_size=BATCH, shuffle=True, worker_init_fn=hold_memory,
                                   generator=torch.Generator().manual_seed(3)))
    t0 = time.monotonic()
    try:
        while True:
            for _ in loader:
                time.sleep(STEP_SECONDS)
                hook.step()
                if time.monotonic() - t0 > seconds or stop():
                    return time.monotonic() - t0, loader
    finally:
        hook.close()
        _shutdown(loader.it)


def wait_no_workers(timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while workers_uss() and time.monotonic() < deadline:
        time.sleep(0.1)


def test_workers_stay_under_the_memory_budget(tmp: Path) -> None:
    # control: the same job with a budget far above what its workers use climbs past 4 workers
    control = make_hook(tmp, "memory-control", 64 * 2**30)
    took, _ = train(control, CONTROL_DEADLINE, stop=lambda: (control.knobs.get("num_workers") or 0) >= 4)
    climbed = control.knobs["num_workers"]
    wait_no_workers()
    assert climbed >= 4, (f"the control run reached {climbed} workers in {took:.0f} s: "
                          f"{[(d.new, d.outcome) for d in control.decisions]}")

    # the budget: PER_WORKER and a little more per worker; fits BUDGET // PER_WORKER at most
    hook = make_hook(tmp, "memory-budget", BUDGET)
    samples: list[int] = []
    knobs: list[int] = []
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.5):
            samples.append(workers_uss())
            knobs.append(hook.knobs.get("num_workers") or 0)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        train(hook, took + 6)      # as long as the control took to climb, and more
    finally:
        done.set()
        sampler.join(10)
    wait_no_workers()

    peak = max(samples)
    trace = f"USS MiB every 0.5 s: {[s >> 20 for s in samples]}; decisions: " \
            f"{[(d.new, d.outcome, d.step) for d in hook.decisions]}"
    assert peak > PER_WORKER, "no worker held its ballast: the loop never ran with workers; " + trace
    assert peak <= BUDGET, f"workers used {peak / 2**20:.0f} MiB, over the {BUDGET / 2**20:.0f} MiB budget; " + trace
    assert max(knobs) <= BUDGET // PER_WORKER, trace
    assert 1 <= hook.knobs["num_workers"] <= BUDGET // PER_WORKER, trace
    assert max(d.new for d in hook.decisions) <= BUDGET // PER_WORKER
    assert all(d.outcome == "applied" for d in hook.decisions), hook.decisions
    tuner = hook.engine.jobs[("self",)].tuners[0]
    assert "memory budget" in tuner.stop_reason, tuner.stop_reason
