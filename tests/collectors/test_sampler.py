"""The sampler thread: failures counted and marked down, hangs detected once per episode, the
rest of the daemon unaffected. Waits are on events with a bound, never on sleeps."""
from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from looptune.collectors.base import CollectorUnavailable, Sampler

WAIT = 10.0   # the bound on every wait; reached only when the code under test is wrong


def wait_until(cond: Callable[[], bool]) -> None:
    deadline = time.monotonic() + WAIT
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.005)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Scripted:
    """A collector whose samples return, raise or block as the test says."""

    name = "scripted"

    def __init__(self) -> None:
        self.calls = 0
        self.fail: BaseException | None = None
        self.gate: threading.Event | None = None     # set: sample() waits on it
        self.entered = threading.Event()
        self.sampled = threading.Condition()
        self.closed = False

    def sample(self) -> Any:
        self.calls += 1
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(WAIT)
        with self.sampled:
            self.sampled.notify_all()
        if self.fail is not None:
            raise self.fail
        return {"n": self.calls}

    def families(self, snapshot: Any) -> list[Any]:
        return []

    def close(self) -> None:
        self.closed = True

    def wait_calls(self, n: int) -> None:
        with self.sampled:
            assert self.sampled.wait_for(lambda: self.calls >= n, WAIT), f"{self.calls} samples, wanted {n}"


@pytest.fixture
def samplers() -> Iterator[list[Sampler]]:
    started: list[Sampler] = []
    yield started
    for s in started:
        c = s.collector
        if isinstance(c, Scripted) and c.gate is not None:
            c.gate.set()
        s.stop(join_timeout=WAIT)


def test_failures_are_counted_and_the_collector_recovers() -> None:
    c = Scripted()
    s = Sampler(c, interval=60, timeout=5, clock=Clock())
    st = s.status()
    assert (st.up, st.snapshot, st.errors, st.last_success) == (False, None, 0, 0)
    s.sample_once()
    assert s.status().up and s.status().snapshot == {"n": 1}
    c.fail = RuntimeError("device lost")
    s.sample_once()
    s.sample_once()
    st = s.status()
    assert not st.up and st.errors == 2
    assert st.snapshot == {"n": 1}                # the last good snapshot is kept
    c.fail = None
    s.sample_once()
    st = s.status()
    assert st.up and st.errors == 2 and st.snapshot == {"n": 4} and st.last_success > 0


def test_unavailable_is_counted_once_per_outage() -> None:
    c = Scripted()
    s = Sampler(c, interval=60, timeout=5, clock=Clock())
    c.fail = CollectorUnavailable("no driver")
    for _ in range(5):
        s.sample_once()
    assert s.status().errors == 1 and not s.status().up
    c.fail = None
    s.sample_once()
    assert s.status().up
    c.fail = CollectorUnavailable("no driver")
    for _ in range(3):
        s.sample_once()
    assert s.status().errors == 2
    c.fail = RuntimeError("other")                # an ordinary failure still counts each time
    s.sample_once()
    s.sample_once()
    assert s.status().errors == 4


def test_a_hung_sample_is_one_error_and_the_others_keep_sampling(samplers: list[Sampler]) -> None:
    clock = Clock()
    hung = Scripted()
    s = Sampler(hung, interval=0.01, timeout=5, clock=clock)
    busy = Scripted()
    other = Sampler(busy, interval=0.01, timeout=5)
    samplers += [s, other]

    s.sample_once()
    assert s.status().up
    hung.gate = threading.Event()
    hung.entered.clear()
    s.start()
    other.start()
    assert hung.entered.wait(WAIT)
    assert not s.status().hung and s.status().up      # still within the timeout
    clock.now += 5.5
    for _ in range(3):                                  # however often it is asked
        st = s.status()
        assert st.hung and not st.up and st.errors == 1
    assert st.snapshot == {"n": 1}
    seen = busy.calls
    busy.wait_calls(seen + 3)                           # the other sampler is not held up
    assert other.status().up

    hung.gate.set()                                     # the sample returns after all
    wait_until(lambda: s.status().up)
    st = s.status()
    assert st.up and not st.hung and st.errors == 1


def test_a_hang_that_ends_in_an_error_is_one_error_and_the_next_hang_counts() -> None:
    clock = Clock()
    c = Scripted()
    s = Sampler(c, interval=60, timeout=5, clock=clock)

    def hang_once(fail: BaseException | None) -> None:
        c.gate, c.fail = threading.Event(), fail
        c.entered.clear()
        t = threading.Thread(target=s.sample_once)
        t.start()
        assert c.entered.wait(WAIT)
        clock.now += 6
        assert s.status().hung and s.status().hung
        c.gate.set()
        t.join(WAIT)
        assert not t.is_alive()

    hang_once(RuntimeError("timed out in the driver"))
    st = s.status()
    assert not st.hung and not st.up and st.errors == 1
    hang_once(RuntimeError("timed out in the driver"))
    assert s.status().errors == 2
    hang_once(None)
    assert s.status().errors == 3 and s.status().up


def test_set_interval_takes_effect_without_waiting_out_the_old_one(samplers: list[Sampler]) -> None:
    c = Scripted()
    s = Sampler(c, interval=3600, timeout=5)
    samplers.append(s)
    s.start()
    c.wait_calls(1)
    s.set_interval(0.01, 5)
    assert (s.interval, s.timeout) == (0.01, 5)
    c.wait_calls(5)                 # an hour-long wait would have held the second sample


def test_stop_returns_promptly_and_closes(samplers: list[Sampler]) -> None:
    c = Scripted()
    s = Sampler(c, interval=3600, timeout=5)
    s.start()
    c.wait_calls(1)
    s.stop(join_timeout=WAIT)       # the thread sleeps for an hour unless stop wakes it
    assert s._thread is not None and not s._thread.is_alive()
    assert c.closed and c.calls == 1


def test_stop_leaves_a_hung_collector_open(samplers: list[Sampler]) -> None:
    c = Scripted()
    c.gate = threading.Event()
    s = Sampler(c, interval=3600, timeout=5)
    samplers.append(s)
    s.start()
    assert c.entered.wait(WAIT)
    s.stop(join_timeout=0.05)
    assert s._thread is not None and s._thread.is_alive()
    assert not c.closed             # closing under a thread stuck in the driver is unsafe
    c.gate.set()
    s._thread.join(WAIT)
    assert not s._thread.is_alive() and c.calls == 1   # it stops after the sample, no further one
