"""daemon.hooks.HookRegistry on its own, with an injected monotonic clock."""
from __future__ import annotations

from typing import Any

import pytest

from looptune.daemon.hooks import HookRegistry
from looptune import protocol
from looptune.protocol import ProtocolError, STEP_BUCKETS


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def hello(run: str = "exp", rank: int = 0, pid: int = 100, world_size: int = 2, **over: Any) -> dict[str, Any]:
    return protocol.check_hello({"v": 1, "type": "hello", "run": run, "rank": rank, "world_size": world_size,
                                 "pid": pid, "tuners": ["num_workers"], **over})


def rep(samples: int = 0, steps: int = 0, wait: float = 0.0, step_s: float = 0.0, world_size: int = 2,
        knobs: dict[str, Any] | None = None) -> dict[str, Any]:
    return protocol.check_report({
        "v": 1, "type": "report", "world_size": world_size,
        "counters": {"samples": samples, "batches": steps, "steps": steps, "data_wait_seconds": wait,
                     "step_seconds": step_s},
        "step_hist": [0] * (len(STEP_BUCKETS) + 1), "knobs": knobs or {}, "memory": {"max_rss_bytes": 1 << 20}})


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def reg(clock: Clock) -> HookRegistry:
    return HookRegistry(grace_seconds=60.0, clock=clock)


def reason_of(fn: Any, *args: Any) -> str:
    with pytest.raises(ProtocolError) as info:
        fn(*args)
    return info.value.reason


def test_register(reg: HookRegistry) -> None:
    job = reg.register(1, 1000, hello(run="exp", rank=3, pid=42, world_size=8, tune=False))
    assert (job.run, job.rank, job.pid, job.uid, job.conn_id, job.world_size) == ("exp", 3, 42, 1000, 1, 8)
    assert job.tuners == ["num_workers"] and job.tune is False and job.key == ("exp", 3)
    assert reg.find("exp", 3) is job and reg.find("exp", 0) is None and len(reg) == 1
    other = reg.register(2, 1000, hello(run="exp", rank=4, pid=43))
    assert other is not job and len(reg) == 2


def test_duplicate_while_connected(reg: HookRegistry) -> None:
    job = reg.register(1, 1000, hello(pid=42))
    assert reason_of(reg.register, 2, 1000, hello(pid=43)) == "duplicate_job"
    assert reason_of(reg.register, 2, 1000, hello(pid=42)) == "duplicate_job"
    assert reg.find("exp", 0) is job and job.conn_id == 1


def test_other_uid_cannot_take_a_job(reg: HookRegistry, clock: Clock) -> None:
    job = reg.register(1, 0, hello(pid=42))
    assert reason_of(reg.register, 2, 65534, hello(pid=77)) == "job_owned"
    reg.disconnect(job)   # not even during its grace period
    clock.advance(59)
    assert reason_of(reg.register, 3, 65534, hello(pid=77)) == "job_owned"
    assert reg.find("exp", 0) is job and job.uid == 0
    clock.advance(2)      # after expiry the job is gone, but the run name is still root's
    assert reg.expire() == [job]
    assert reason_of(reg.register, 4, 65534, hello(pid=77)) == "job_owned"
    assert reg.register(5, 0, hello(pid=43)).uid == 0


def test_reconnect_after_disconnect_same_uid(reg: HookRegistry) -> None:
    job = reg.register(1, 1000, hello(pid=42))
    reg.report(job, rep(samples=10))
    reg.record_decision(job, {"id": 1, "knob": "num_workers", "value": 4})
    reg.disconnect(job)
    assert job.conn_id is None and job.disconnected_at is not None
    again = reg.register(2, 1000, hello(pid=42))      # the same process: its decision history carries over
    assert again is not job and again.conn_id == 2 and again.disconnected_at is None
    assert [d["id"] for d in again.decisions] == [1]
    reg.disconnect(again)
    fresh = reg.register(3, 1000, hello(pid=99))      # a new process under the same name starts clean
    assert list(fresh.decisions) == [] and fresh.report is None


def test_disconnect_then_expire_after_grace(reg: HookRegistry, clock: Clock) -> None:
    a = reg.register(1, 1000, hello(run="a", pid=1))
    b = reg.register(2, 1000, hello(run="b", pid=2))
    reg.report(a, rep(samples=5))
    reg.disconnect(a)
    clock.advance(60)
    assert reg.expire() == [] and reg.find("a", 0) is a            # exactly the grace: still there
    assert [v.run for v in reg.views()] == ["a"] and reg.views()[0].connected is False
    clock.advance(0.5)
    assert reg.expire() == [a]
    assert reg.find("a", 0) is None and reg.find("b", 0) is b and len(reg) == 1
    clock.advance(1e6)
    assert reg.expire() == []                                        # connected jobs never expire


def test_grace_seconds_can_change(reg: HookRegistry, clock: Clock) -> None:
    a = reg.register(1, 1000, hello(pid=1))
    reg.disconnect(a)
    clock.advance(5)
    reg.grace_seconds = 4.0                                          # a reload shortened it
    assert reg.expire() == [a]


def test_counters_going_backwards_rejected(reg: HookRegistry, clock: Clock) -> None:
    job = reg.register(1, 1000, hello())
    reg.report(job, rep(samples=100, steps=10))
    clock.advance(1)
    for bad in (rep(samples=99, steps=10), rep(samples=100, steps=9)):
        assert reason_of(reg.report, job, bad) == "invalid"
    assert job.report is not None and job.report["counters"]["samples"] == 100   # the last good one stays
    reg.report(job, rep(samples=100, steps=10))                                   # equal is fine
    reg.report(job, rep(samples=200, steps=20, world_size=4))
    assert job.world_size == 4 and job.report["counters"]["samples"] == 200


def test_rates(reg: HookRegistry, clock: Clock) -> None:
    job = reg.register(1, 1000, hello())
    reg.report(job, rep(samples=0, wait=0.0, step_s=0.0))
    assert job.rate_samples is None and job.wait_share is None
    clock.advance(2.0)
    reg.report(job, rep(samples=200, wait=0.5, step_s=2.0))
    assert job.rate_samples == pytest.approx(100.0)
    assert job.wait_share == pytest.approx(0.25)
    view = reg.views()[0]
    assert view.samples_per_second == pytest.approx(100.0) and view.data_wait_share == pytest.approx(0.25)
    # reports more often than once a second are measured against the window start (t=2)
    clock.advance(0.5)
    reg.report(job, rep(samples=300, wait=1.5, step_s=3.0))
    assert job.rate_samples == pytest.approx(200.0)          # (300 - 200) / 0.5
    assert job.wait_share == pytest.approx(1.0)              # (1.5 - 0.5) / (3.0 - 2.0)
    clock.advance(0.5)
    reg.report(job, rep(samples=400, wait=1.5, step_s=4.0))
    assert job.rate_samples == pytest.approx(200.0)          # (400 - 200) / 1.0
    assert job.wait_share == pytest.approx(0.5)              # (1.5 - 0.5) / (4.0 - 2.0)


def test_wait_share_is_clamped_and_needs_step_time(reg: HookRegistry, clock: Clock) -> None:
    job = reg.register(1, 1000, hello())
    reg.report(job, rep(wait=0.0, step_s=0.0))
    clock.advance(1.0)
    reg.report(job, rep(wait=5.0, step_s=1.0))
    assert job.wait_share == 1.0                              # more wait than step time: clamped
    clock.advance(1.0)
    reg.report(job, rep(samples=10, wait=5.0, step_s=1.0))   # no step time passed: the share stays
    assert job.wait_share == 1.0 and job.rate_samples == pytest.approx(10.0)


def test_views_filter_by_owner(reg: HookRegistry) -> None:
    mine = reg.register(1, 1000, hello(run="mine", pid=1))
    theirs = reg.register(2, 2000, hello(run="theirs", pid=2))
    silent = reg.register(3, 1000, hello(run="silent", pid=3))   # no report yet: not shown
    reg.report(mine, rep(samples=1, knobs={"num_workers": 4}))
    reg.report(theirs, rep(samples=2))
    assert silent.report is None
    assert sorted(v.run for v in reg.views()) == ["mine", "theirs"]
    assert [v.run for v in reg.views(1000)] == ["mine"]
    assert [v.run for v in reg.views(2000)] == ["theirs"]
    assert reg.views(3000) == []
    v = reg.views(1000)[0]
    assert (v.rank, v.world_size, v.pid, v.knobs, v.connected, v.counters["samples"]) == \
        ("0", 2, 1, {"num_workers": 4}, True, 1)
    assert v.memory == {"max_rss_bytes": 1 << 20} and v.last_decision is None and v.last_report_time > 0


def test_decisions_and_outcomes(reg: HookRegistry) -> None:
    job = reg.register(1, 1000, hello())
    reg.report(job, rep())
    reg.record_decision(job, {"id": 5, "knob": "num_workers", "value": 8})
    assert reg.views()[0].last_decision["outcome"] == "sent"
    reg.decision_outcome(job, {"id": 5, "outcome": "applied", "detail": "ok", "step": 12})
    reg.decision_outcome(job, {"id": 999, "outcome": "failed", "detail": "", "step": None})   # unknown id: ignored
    last = reg.views()[0].last_decision
    assert (last["id"], last["outcome"], last["detail"], last["step"]) == (5, "applied", "ok", 12)
    for i in range(100):
        reg.record_decision(job, {"id": 100 + i})
    assert len(job.decisions) == 64                          # bounded history


def test_registered_pids_only_connected(reg: HookRegistry) -> None:
    a = reg.register(1, 1000, hello(run="a", rank=0, pid=11, world_size=2))
    b = reg.register(2, 1000, hello(run="a", rank=1, pid=12, world_size=2))
    reg.register(3, 2000, hello(run="c", pid=13, world_size=1))
    assert reg.registered_pids() == {11: ("a", "0", "2"), 12: ("a", "1", "2"), 13: ("c", "0", "1")}
    reg.disconnect(b)
    assert 12 not in reg.registered_pids() and set(reg.registered_pids()) == {11, 13}
    reg.disconnect(a)
    assert set(reg.registered_pids()) == {13}


def test_connected_seq_and_report_time(reg: HookRegistry, clock: Clock) -> None:
    a = reg.register(1, 1000, hello(run="a", pid=1))
    b = reg.register(2, 1000, hello(run="b", pid=2))
    assert reg.connected() == []                              # no report yet
    reg.report(a, rep(samples=1))
    clock.advance(3)
    reg.report(a, rep(samples=2))
    reg.report(b, rep(samples=1))
    assert (a.seq, b.seq) == (2, 1) and a.report_mono == clock.now
    assert {j.run for j in reg.connected()} == {"a", "b"}
    reg.disconnect(b)
    assert [j.run for j in reg.connected()] == ["a"]
    with pytest.raises(ProtocolError):
        reg.report(a, rep(samples=0))                         # a rejected report is not counted
    assert a.seq == 2


def test_on_applied_hears_each_outcome(reg: HookRegistry) -> None:
    heard = []
    reg.on_applied = lambda job, applied: heard.append((job.run, applied["id"], applied["outcome"]))
    job = reg.register(1, 1000, hello())
    reg.record_decision(job, {"id": 3, "knob": "num_workers", "value": 2})
    reg.decision_outcome(job, {"id": 3, "outcome": "failed", "detail": "boom", "step": None})
    assert heard == [("exp", 3, "failed")] and job.decisions[-1]["outcome"] == "failed"
