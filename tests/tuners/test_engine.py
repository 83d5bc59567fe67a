"""tuners.engine on its own: the trial state machine, driven by an injected clock and a fake job.

No torch, no threads, no sleeping: `FakeJob` is a training job as the engine sees it. Its
samples/s is a function of `num_workers` (plus seeded noise), it reports cumulative counters
every `dt` seconds of simulated time, and it applies a decision the engine sends through its
`send` callback at the next step boundary, so the new value shows in the next report, the way
the hook does (decision queued by the reporter thread, applied by `hook.step()`, acknowledged
before the next report). test_workers_tuner.py drives the real workers tuner with it.
"""
from __future__ import annotations

import random
from collections import Counter
from typing import Any, Callable

import pytest
from prometheus_client import CollectorRegistry

from looptune.collectors.hookjobs import BOTTLENECK_KINDS, tuner_families
from looptune.tuners.bottleneck import KINDS
from looptune.tuners.engine import Context, Engine, Observation, Proposal, Settings, TunerBase

KEY = ("host", 4242)
RUN = "exp-1"


class Clock:
    """Simulated monotonic seconds; the engine reads it, the fake job moves it."""

    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class FakeJob:
    """One job's reports for the engine.

    curve(n) -> samples/s at num_workers n; wait(n) -> share of step time waiting for data
    (default: the share below `ideal` samples/s, the rate the training step alone would reach).
    `ack` says what the hook does with a decision: "applied", "failed", "skipped", or "ignore"
    (never applies nor acknowledges it). Noise: each report's samples are multiplied by
    1 + sigma * N(0, 1) from a seeded generator.
    """

    def __init__(self, engine: Engine | None = None, curve: Callable[[int], float] = lambda n: 100.0, *,
                 clock: Clock | None = None, start: int = 0, ideal: float | None = None,
                 wait: Callable[[int], float] | None = None, sigma: float = 0.0, seed: int = 0,
                 dt: float | tuple[float, float] = 1.0, batch: int = 16,
                 cpu_used: Callable[[int], float | None] = lambda n: None, cpu_allowed: float | None = None,
                 worker_bytes: Callable[[int], int | None] = lambda n: None, main_rss: int | None = None,
                 host_available: int | None = None, signature: str = "sig-1", key: Any = KEY, run: str = RUN,
                 tuners: list[str] | None = None) -> None:
        self.clock = clock or Clock()
        self.engine = engine
        self.curve = curve
        self.ideal = ideal
        self.wait = wait
        self.sigma = sigma
        self.rng = random.Random(seed)
        self.dt = dt
        self.batch = batch
        self.cpu_used, self.cpu_allowed = cpu_used, cpu_allowed
        self.worker_bytes, self.main_rss, self.host_available = worker_bytes, main_rss, host_available
        self.signature, self.key, self.run_name, self.tuners = signature, key, run, tuners
        self.knobs: dict[str, Any] = {"num_workers": start, "prefetch_factor": 2}
        self.untunable: dict[str, str] = {}
        self.counters = {"samples": 0.0, "batches": 0.0, "steps": 0.0, "data_wait_seconds": 0.0,
                         "step_seconds": 0.0}
        self.ack = "applied"
        self.inbox: list[dict[str, Any]] = []
        self.sent: list[dict[str, Any]] = []        # every trial and roll back the engine sent, in order
        self.kept_sent: list[dict[str, Any]] = []   # the confirmations of kept trials
        self.applied_log: list[tuple[float, dict[str, Any], str]] = []
        self.reports = 0
        self.trace: list[tuple[float, str | None, Any]] = []   # (time, trial phase after the report, knob)

    # -- the engine's `send` callback --
    def send(self, key: Any, decision: dict[str, Any]) -> bool:
        assert key == self.key
        if decision["reason"].startswith("kept: "):
            self.kept_sent.append(dict(decision))      # settles a kept trial in the hook: no change
        else:
            self.sent.append(dict(decision))
        self.inbox.append(dict(decision))
        return True

    def _wait_share(self, n: int, rate: float) -> float:
        if self.wait is not None:
            return self.wait(n)
        if self.ideal:
            return min(1.0, max(0.0, 1.0 - rate / self.ideal))
        return 0.5

    def _run_for(self, seconds: float, n: int) -> None:
        rate = max(0.0, self.curve(n) * (1.0 + self.sigma * self.rng.gauss(0.0, 1.0)))
        samples = rate * seconds
        c = self.counters
        c["samples"] += samples
        c["batches"] += samples / self.batch
        c["steps"] += samples / self.batch
        c["step_seconds"] += seconds
        c["data_wait_seconds"] += self._wait_share(n, self.curve(n)) * seconds

    def observation(self) -> Observation:
        n = self.knobs["num_workers"]
        return Observation(time=self.clock.t, counters=dict(self.counters), knobs=dict(self.knobs),
                           untunable=dict(self.untunable), signature=self.signature,
                           cpu_cores_used=self.cpu_used(n), cpu_cores_allowed=self.cpu_allowed,
                           worker_uss_bytes=self.worker_bytes(n) if n > 0 else None,
                           main_rss_bytes=self.main_rss, host_available_bytes=self.host_available)

    def tick(self) -> Observation:
        """One report interval: apply what was sent at the first step boundary, run, acknowledge, report."""
        dt = self.dt if isinstance(self.dt, (int, float)) else self.rng.uniform(*self.dt)
        pending, self.inbox = self.inbox, []
        acks = []
        for d in pending:
            if self.ack == "ignore":
                continue
            if self.ack == "applied":
                self.knobs[d["knob"]] = d["value"]
            acks.append((d, self.ack))
            self.applied_log.append((self.clock.t, d, self.ack))
        self._run_for(dt, self.knobs["num_workers"])
        self.clock.t += dt
        assert self.engine is not None
        for d, outcome in acks:         # the hook acknowledges before its next report
            self.engine.applied(self.key, d["id"], outcome, "boom" if outcome == "failed" else "")
        obs = self.observation()
        self.engine.observe(self.key, self.run_name, obs, tuners=self.tuners)
        self.reports += 1
        t = self.engine.jobs[self.key].trial
        self.trace.append((self.clock.t, t.phase if t is not None else None, self.knobs["num_workers"]))
        return obs

    def run(self, seconds: float) -> None:
        end = self.clock.t + seconds
        while self.clock.t < end:
            self.tick()

    def run_until_idle(self, limit: float = 600.0) -> None:
        """Until no trial is in flight (a started trial always ends: keep, roll back or fail)."""
        end = self.clock.t + limit
        while self.clock.t < end and (not self.reports or self.engine.jobs[self.key].trial is not None):
            self.tick()
        assert self.engine.jobs[self.key].trial is None

    @property
    def phases(self) -> list[str | None]:
        return [p for _, p, _ in self.trace]


class ScriptTuner(TunerBase):
    """A tuner that proposes a fixed list of values, one per call while it has any."""

    def __init__(self, values: list[Any], knob: str = "num_workers", name: str = "script",
                 keep_if: str = "gain") -> None:
        self.name, self.knob, self.values, self.keep_if = name, knob, list(values), keep_if
        self.contexts: list[Context] = []
        self.results: list[tuple[Any, str, float | None]] = []
        self.budget: Callable[[Observation], str | None] | None = None

    def propose(self, ctx: Context) -> Proposal | None:
        self.contexts.append(ctx)
        if not self.values:
            return None
        return Proposal(self.knob, self.values.pop(0), f"script {self.name}", keep_if=self.keep_if)

    def result(self, proposal: Proposal, outcome: str, gain: float | None, ctx: Context) -> None:
        self.results.append((proposal.value, outcome, gain))


class Budget:
    """A tuner's own guard: over budget at 4 workers."""
    name = "budget"

    def check(self, trial: Any, obs: Observation, window: Any, settings: Settings) -> str | None:
        return "over budget" if obs.knobs["num_workers"] == 4 else None


def make(tuners: list[Any], settings: Settings | None = None, memory: Any = None,
         **job: Any) -> tuple[Engine, FakeJob]:
    clock = job.pop("clock", None) or Clock()
    fake = FakeJob(clock=clock, **job)
    engine = Engine(lambda names: list(tuners), fake.send, settings or Settings(), memory=memory, clock=clock)
    fake.engine = engine
    return engine, fake


def rates(table: dict[int, float]) -> Callable[[int], float]:
    return lambda n: table[n]


# ---- the state machine, step by step ----

def test_a_gain_runs_baseline_apply_settle_measure_and_is_kept() -> None:
    tuner = ScriptTuner([4])
    engine, job = make([tuner], curve=rates({0: 100.0, 4: 200.0}))
    job.tick()                                   # the first report only opens a window
    for _ in range(2):
        job.tick()
        assert job.sent == [] and engine.jobs[KEY].trial is None     # baseline: 3 windows first
    job.tick()
    assert [d["value"] for d in job.sent] == [4]
    d = job.sent[0]
    assert d["knob"] == "num_workers" and d["tuner"] == "script" and isinstance(d["id"], int)
    assert engine.jobs[KEY].trial.phase == "apply"
    assert engine.jobs[KEY].trial.baseline == [100.0, 100.0, 100.0]
    # the decision counters of this tuner and knob exist from the trial's start, at 0
    assert dict(engine.outcomes) == {(RUN, "script", "num_workers", o): 0 for o in ("kept", "rolled_back", "failed")}
    for _ in range(5):
        job.tick()
    # apply (sent) -> settle (the report showing 4) -> measure x3 -> kept on the third measure window
    assert job.phases == [None, None, None, "apply", "settle", "measure", "measure", "measure", None]
    assert job.knobs["num_workers"] == 4
    assert engine.outcomes == Counter({(RUN, "script", "num_workers", "kept"): 1})
    assert tuner.results == [(4, "kept", pytest.approx(1.0))]
    (entry,) = engine.jobs[KEY].history
    assert entry["old"] == 0 and entry["new"] == 4 and entry["outcome"] == "kept"
    assert entry["tuner"] == "script" and entry["knob"] == "num_workers"
    assert entry["gain"] == pytest.approx(1.0) and "+100.0% samples/s" in entry["detail"]
    assert len(job.sent) == 1                    # a kept change sends nothing more
    # the new setting is the next trial's baseline: its measured windows
    assert engine.jobs[KEY].steady == [200.0, 200.0, 200.0]


def test_no_gain_is_rolled_back_and_the_knob_is_back_where_it_was() -> None:
    tuner = ScriptTuner([4])
    engine, job = make([tuner], curve=rates({2: 100.0, 4: 101.0}), start=2)
    for _ in range(9):
        job.tick()
    assert job.phases[-1] == "rollback"
    rb = job.sent[-1]
    assert rb["value"] == 2 and rb["reason"].startswith("roll back:") and rb["id"] != job.sent[0]["id"]
    assert "below the 3% bar" in rb["reason"]
    job.tick()                                   # the rollback applied at the next step boundary
    assert engine.jobs[KEY].trial is None and job.knobs["num_workers"] == 2
    assert engine.outcomes == Counter({(RUN, "script", "num_workers", "rolled_back"): 1})
    assert tuner.results == [(4, "rolled_back", pytest.approx(0.01))]
    (entry,) = engine.jobs[KEY].history
    assert (entry["old"], entry["new"], entry["outcome"]) == (2, 4, "rolled_back")


@pytest.mark.parametrize("new_rate, outcome", [(103.0, "kept"), (102.9, "rolled_back")])
def test_min_gain_is_the_bar(new_rate: float, outcome: str) -> None:
    # noise-free: the bar is min_gain itself (a marginal gain may be measured for longer first)
    engine, job = make([ScriptTuner([1])], curve=rates({0: 100.0, 1: new_rate}))
    for _ in range(4):
        job.tick()
    job.run_until_idle()
    assert engine.outcomes == Counter({(RUN, "script", "num_workers", outcome): 1})


@pytest.mark.parametrize("new_rate, outcome", [(97.01, "kept"), (96.99, "rolled_back")])
def test_keep_if_no_loss_keeps_a_change_that_loses_at_most_min_gain(new_rate: float, outcome: str) -> None:
    engine, job = make([ScriptTuner([2], keep_if="no_loss")], curve=rates({8: 100.0, 2: new_rate}), start=8)
    for _ in range(4):
        job.tick()
    job.run_until_idle()
    assert engine.outcomes == Counter({(RUN, "script", "num_workers", outcome): 1})


@pytest.mark.parametrize("new_rate, outcome", [(100.5, "kept"), (99.5, "kept"), (98.9, "rolled_back"),
                                               (97.5, "rolled_back")])
def test_keep_if_no_worse_keeps_a_change_that_loses_at_most_one_percent(new_rate: float, outcome: str) -> None:
    engine, job = make([ScriptTuner([2], keep_if="no_worse")], curve=rates({8: 100.0, 2: new_rate}), start=8)
    for _ in range(4):
        job.tick()
    job.run_until_idle()
    assert engine.outcomes == Counter({(RUN, "script", "num_workers", outcome): 1})
    assert job.phases.count("measure") == 3        # noise-free: a loss is no doubt, no extension


def test_cooldown_after_a_rollback_then_the_next_trial() -> None:
    s = Settings(cooldown_windows=3)
    tuner = ScriptTuner([4, 4, 4])
    engine, job = make([tuner], s, curve=rates({0: 100.0, 4: 100.0}))
    for _ in range(10):
        job.tick()
    assert engine.jobs[KEY].trial is None and len(job.sent) == 2      # trial + rollback, now applied
    assert engine.jobs[KEY].cooldown == 3
    for _ in range(3):                   # the cooldown: no trial, whatever the tuner wants
        job.tick()
        assert len(job.sent) == 2
    assert engine.jobs[KEY].cooldown == 0
    # then the next trial, once it has a baseline at the restored setting
    for _ in range(s.baseline_windows + 1):
        if len(job.sent) > 2:
            break
        job.tick()
    assert [d["value"] for d in job.sent] == [4, 0, 4]
    assert engine.jobs[KEY].trial.baseline == [100.0] * s.baseline_windows


def test_one_trial_at_a_time_per_job_and_jobs_are_independent() -> None:
    made: list[list[ScriptTuner]] = []

    def tuners(names: list[str] | None) -> list[ScriptTuner]:      # one set per job, as make_tuners does
        made.append([ScriptTuner([4], name="a"), ScriptTuner([3], knob="prefetch_factor", name="b")])
        return made[-1]

    jobs: dict[Any, FakeJob] = {}
    clock = Clock()
    engine = Engine(tuners, lambda key, d: jobs[key].send(key, d), Settings(), clock=clock)
    jobs[KEY] = job1 = FakeJob(engine, rates({0: 100.0, 4: 200.0}), clock=clock)
    jobs[("host", 7)] = job2 = FakeJob(engine, rates({0: 50.0, 4: 50.0}), key=("host", 7), run="exp-2")
    both = False
    for _ in range(20):
        job1.tick()
        job2.tick()
        t1, t2 = engine.jobs[KEY].trial, engine.jobs[("host", 7)].trial
        both |= t1 is not None and t2 is not None
        if t1 is not None and t1.tuner.name == "a":
            assert [d["tuner"] for d in job1.sent] == ["a"]      # b waits for a's trial to end
    assert len(made) == 2
    assert [(d["tuner"], d["knob"], d["value"]) for d in job1.sent] == \
        [("a", "num_workers", 4), ("b", "prefetch_factor", 3), ("b", "prefetch_factor", 2)]
    assert both                                                  # the two jobs had trials at once
    assert [(d["tuner"], d["value"]) for d in job2.sent][:2] == [("a", 4), ("a", 0)]
    assert engine.outcomes[("exp-2", "a", "num_workers", "rolled_back")] == 1
    assert engine.outcomes[(RUN, "a", "num_workers", "kept")] == 1
    assert engine.outcomes[(RUN, "b", "prefetch_factor", "rolled_back")] == 1


# ---- rolling back at once ----

def test_two_windows_below_the_regression_bound_roll_back_before_the_measure_windows_are_done() -> None:
    s = Settings(measure_windows=6, regression_bound=0.25)
    tuner = ScriptTuner([8])
    engine, job = make([tuner], s, curve=rates({4: 100.0, 8: 74.0}), start=4)
    for _ in range(7):
        job.tick()
    assert job.phases[-2:] == ["measure", "measure"]       # one window below: not yet
    job.tick()
    assert job.phases[-1] == "rollback"                    # the second: at once, 2 of 6 measure windows
    assert len(engine.jobs[KEY].trial.measured) == 2
    (entry,) = engine.jobs[KEY].history
    assert entry["outcome"] == "rolled_back" and entry["detail"] == "regression"
    assert entry["gain"] == pytest.approx(-0.26)
    job.tick()
    assert job.knobs["num_workers"] == 4 and engine.jobs[KEY].trial is None


def test_a_window_just_inside_the_bound_or_an_isolated_dip_does_not_roll_back_early() -> None:
    s = Settings(measure_windows=6, regression_bound=0.25)
    engine, job = make([ScriptTuner([8])], s, curve=rates({4: 100.0, 8: 75.0}), start=4)
    for _ in range(10):
        job.tick()
    assert job.phases[-1] == "measure"          # 75 is not *more than* 25% below 100
    # dips that alternate with good windows: `below` resets, no early rollback
    engine, job = make([ScriptTuner([8])], s, curve=rates({4: 100.0, 8: 130.0}), start=4)
    for _ in range(6):
        job.tick()
    assert job.phases[-1] == "measure"
    for i in range(5):
        job.curve = rates({4: 100.0, 8: 60.0 if i % 2 == 1 else 130.0})
        job.tick()
        assert job.phases[-1] == "measure"
    assert engine.jobs[KEY].trial.below == 0 and len(engine.jobs[KEY].trial.measured) == 5


def test_budget_exceeded_rolls_back_at_once() -> None:
    tuner = ScriptTuner([4])
    tuner.guards = (Budget(),)
    engine, job = make([tuner], curve=rates({0: 100.0, 4: 300.0}))
    for _ in range(7):
        job.tick()
    assert job.phases[-1] == "rollback"      # first measure window, despite the gain
    assert engine.jobs[KEY].history[-1]["detail"] == "over budget"
    job.tick()
    assert job.knobs["num_workers"] == 0


# ---- failures ----

@pytest.mark.parametrize("ack", ["failed", "skipped"])
def test_a_failed_or_skipped_acknowledgement_ends_the_trial_as_failed(ack: str) -> None:
    s = Settings(cooldown_windows=2)
    tuner = ScriptTuner([4, 2])
    engine, job = make([tuner], s, curve=rates({0: 100.0, 4: 200.0, 2: 150.0}))
    job.ack = ack
    for _ in range(4):
        job.tick()
    assert engine.jobs[KEY].trial is not None
    job.tick()            # the hook answered "failed"/"skipped" before its next report
    assert engine.jobs[KEY].trial is None
    assert engine.outcomes == Counter({(RUN, "script", "num_workers", "failed"): 1})
    entry = engine.jobs[KEY].history[-1]
    assert entry["outcome"] == "failed" and entry["detail"] == ("boom" if ack == "failed" else ack)
    assert tuner.results == [(4, "failed", None)]
    assert len(job.sent) == 1 and job.knobs["num_workers"] == 0      # nothing to roll back
    # a cooldown (the failure's own window may count) and a fresh baseline, then the next trial
    job.tick()
    assert len(job.sent) == 1
    for _ in range(s.cooldown_windows + s.baseline_windows):
        if len(job.sent) > 1:
            break
        job.tick()
    assert [d["value"] for d in job.sent] == [4, 2]


def test_acknowledgements_of_other_decisions_are_ignored() -> None:
    engine, job = make([ScriptTuner([4])], curve=rates({0: 100.0, 4: 200.0}))
    job.ack = "ignore"
    for _ in range(4):
        job.tick()
    t = engine.jobs[KEY].trial
    engine.applied(KEY, t.id + 100, "failed", "someone else's")
    engine.applied(KEY, t.id, "applied")
    engine.applied(("nobody", 1), t.id, "failed")
    assert engine.jobs[KEY].trial is t and not +engine.outcomes       # nothing ended (series at 0)


def test_a_decision_never_applied_fails_after_the_apply_timeout() -> None:
    s = Settings(apply_timeout_seconds=10.0)
    engine, job = make([ScriptTuner([4])], s, curve=rates({0: 100.0, 4: 200.0}))
    job.ack = "ignore"
    for _ in range(4):
        job.tick()
    t0 = engine.jobs[KEY].trial.started
    while job.clock.t - t0 <= 10.0:
        assert engine.jobs[KEY].trial is not None and engine.jobs[KEY].trial.phase == "apply"
        job.tick()
    assert engine.jobs[KEY].trial is None
    assert engine.outcomes == Counter({(RUN, "script", "num_workers", "failed"): 1})
    assert engine.jobs[KEY].history[-1]["detail"] == "not applied in time"


def test_a_rollback_that_fails_ends_the_trial_and_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    s = Settings(cooldown_windows=1)
    engine, job = make([ScriptTuner([4])], s, curve=rates({0: 100.0, 4: 100.0}))
    for _ in range(9):
        job.tick()
    assert job.phases[-1] == "rollback"
    job.ack = "failed"
    with caplog.at_level("WARNING", logger="looptune.engine"):
        job.tick()
    # the hook could not restore the old value: the trial ends now (not after the apply timeout)
    assert engine.jobs[KEY].trial is None
    assert any("roll back" in r.getMessage() and "boom" in r.getMessage() for r in caplog.records)
    assert engine.outcomes == Counter({(RUN, "script", "num_workers", "rolled_back"): 1})


def test_a_tuner_that_raises_does_not_stop_the_others(caplog: pytest.LogCaptureFixture) -> None:
    class Broken(ScriptTuner):
        def propose(self, ctx: Context) -> Proposal | None:
            raise RuntimeError("bad plugin")

    good = ScriptTuner([4], name="good")
    engine, job = make([Broken([], name="broken"), good], curve=rates({0: 100.0, 4: 200.0}))
    for _ in range(4):
        job.tick()
    assert [d["tuner"] for d in job.sent] == ["good"]
    assert "tuner broken failed to propose" in caplog.text


def test_untunable_knobs_and_proposals_of_the_current_value_send_nothing() -> None:
    engine, job = make([ScriptTuner([0, 0, 0])], curve=rates({0: 100.0}))
    job.run(10)
    assert job.sent == []
    engine, job = make([ScriptTuner([4])], curve=rates({0: 100.0, 4: 200.0}))
    job.untunable = {"num_workers": "IterableDataset"}
    job.run(10)
    assert job.sent == []


def test_a_send_that_fails_starts_no_trial() -> None:
    engine, job = make([ScriptTuner([4, 4])], curve=rates({0: 100.0, 4: 200.0}))
    engine._send = lambda key, d: False
    for _ in range(4):
        job.tick()
    assert engine.jobs[KEY].trial is None


def test_reports_closer_than_a_window_are_joined_and_steps_are_required() -> None:
    engine, job = make([ScriptTuner([])], curve=rates({0: 100.0}), dt=0.5)
    for _ in range(9):
        job.tick()
    assert len(engine.jobs[KEY].windows) == 4           # 0.5 s reports: one window per two
    assert all(w.seconds == pytest.approx(1.0) for w in engine.jobs[KEY].windows)
    # a long step: no step finished in the window, nothing to judge
    job.curve = rates({0: 0.0})
    job.tick()
    job.tick()
    assert len(engine.jobs[KEY].windows) == 4


class LongSteps:
    """A job whose steps take longer than a window: its counters move a whole step at a time."""

    def __init__(self, step_seconds: Callable[[int], float], batch: int = 64) -> None:
        self.step_seconds, self.batch = step_seconds, batch
        self.clock = Clock(0.0)
        self.knobs = {"num_workers": 0}
        self.steps, self.inbox = 0, []
        self.next_step = step_seconds(0)
        self.engine = Engine(lambda names: [ScriptTuner([4])], self.send, Settings(), clock=self.clock)

    def send(self, key: Any, d: dict[str, Any]) -> bool:
        self.inbox.append(d)
        return True

    def tick(self) -> None:
        self.clock.t += 1.0
        while self.next_step <= self.clock.t:            # steps that ended in this second
            self.steps += 1
            for d in self.inbox:                         # applied at the step boundary
                self.knobs[d["knob"]] = d["value"]
            self.inbox = []
            self.next_step += self.step_seconds(self.knobs["num_workers"])
        done_at = self.next_step - self.step_seconds(self.knobs["num_workers"])
        c = {"samples": self.batch * self.steps, "batches": self.steps, "steps": self.steps,
             "data_wait_seconds": 0.5 * self.steps, "step_seconds": max(0.0, done_at)}
        self.engine.observe(KEY, RUN, Observation(time=self.clock.t, counters=c, knobs=dict(self.knobs)))


def test_steps_longer_than_a_window_are_measured_over_their_whole_time() -> None:
    # 2.5 s steps (25.6 samples/s) at 0 workers, 1.5 s (42.7 samples/s) at 4; a report every second.
    # A window that holds one finished step must not count a whole step's samples in one second
    job = LongSteps(lambda n: 2.5 if n == 0 else 1.5)
    for _ in range(12):
        job.tick()
    before = [w.samples_per_second for w in job.engine.jobs[KEY].windows]
    # windows begin at the first report with a step done (t=3: the time before it is set-up, no
    # step); from there no time is dropped
    state = job.engine.jobs[KEY]
    assert sum(w.seconds for w in state.windows) == pytest.approx(state.window_start.time - 3.0)
    assert sum(before) / len(before) == pytest.approx(25.6, rel=0.2)
    for _ in range(60):
        job.tick()
    (entry,) = job.engine.jobs[KEY].history
    assert entry["outcome"] == "kept" and entry["gain"] > 0.3     # a 67% gain, quantized by whole steps


def test_the_remembered_best_is_offered_and_a_kept_value_is_remembered() -> None:
    class Memory:
        def __init__(self) -> None:
            self.data = {(RUN, "sig-1"): 6}
            self.puts: list[tuple[str, str, str, Any]] = []

        def get(self, run: str, sig: str, knob: str = "num_workers", owner: Any = None) -> Any:
            return self.data.get((run, sig))

        def put(self, run: str, sig: str, knob: str, value: Any, owner: Any = None) -> None:
            self.puts.append((run, sig, knob, value))

    mem = Memory()
    tuner = ScriptTuner([4])
    engine, job = make([tuner], memory=mem, curve=rates({0: 100.0, 4: 200.0}))
    for _ in range(9):
        job.tick()
    assert tuner.contexts[0].remembered == 6
    assert mem.puts == [(RUN, "sig-1", "num_workers", 4)]


# ---- verdicts and what is exported ----

def test_verdicts_per_job() -> None:
    engine, slow = make([], curve=rates({0: 100.0}), wait=lambda n: 0.6)
    fast = FakeJob(engine, rates({0: 100.0}), key=("host", 2), wait=lambda n: 0.0,
                   cpu_used=lambda n: 1.95, cpu_allowed=2.0)
    idle = FakeJob(engine, rates({0: 100.0}), key=("host", 3), wait=lambda n: 0.02,
                   cpu_used=lambda n: 0.3, cpu_allowed=2.0)
    for _ in range(3):
        for j in (slow, fast, idle):
            j.tick()
    assert engine.verdicts() == {KEY: "input", ("host", 2): "cpu", ("host", 3): "none"}
    assert set(engine.verdicts().values()) <= set(KINDS)
    engine.forget(("host", 2))
    assert set(engine.verdicts()) == {KEY, ("host", 3)}


def test_tuner_families_with_a_real_registry() -> None:
    engine, job = make([ScriptTuner([4, 8])], curve=rates({0: 100.0, 4: 200.0, 8: 200.0}), wait=lambda n: 0.5)
    job.run(30)
    outcomes = dict(engine.outcomes)
    # every outcome's series exists from the first trial on, at 0 until it happens (PromQL increase())
    assert outcomes == {(RUN, "script", "num_workers", "kept"): 1,
                        (RUN, "script", "num_workers", "rolled_back"): 1,
                        (RUN, "script", "num_workers", "failed"): 0}
    verdicts = {(RUN, "0"): v for v in engine.verdicts().values()}
    outcomes[("exp-2", "workers", "num_workers", "failed")] = 3

    class Own:
        def collect(self) -> Any:
            return list(tuner_families(outcomes, verdicts))

    reg = CollectorRegistry(auto_describe=False)
    reg.register(Own())
    get = reg.get_sample_value
    labels = {"run": RUN, "tuner": "script", "knob": "num_workers"}
    assert get("looptune_tuner_decisions_total", {**labels, "outcome": "kept"}) == 1.0
    assert get("looptune_tuner_decisions_total", {**labels, "outcome": "rolled_back"}) == 1.0
    assert get("looptune_tuner_decisions_total", {**labels, "outcome": "failed"}) == 0.0
    assert get("looptune_tuner_decisions_total", {**labels, "outcome": "nope"}) is None
    assert get("looptune_tuner_decisions_total", {"run": "exp-2", "tuner": "workers", "knob": "num_workers",
                                                  "outcome": "failed"}) == 3.0
    assert BOTTLENECK_KINDS == KINDS
    for kind in KINDS:
        assert get("looptune_job_bottleneck", {"run": RUN, "rank": "0", "kind": kind}) == \
            (1.0 if kind == "input" else 0.0)


# ---- noise ----

def test_a_noisy_job_keeps_a_real_gain_and_rolls_back_no_gain() -> None:
    kept = rolled = 0
    for seed in range(20):
        engine, job = make([ScriptTuner([4])], curve=rates({0: 100.0, 4: 125.0}), sigma=0.05, seed=seed,
                           dt=(0.5, 1.0))
        job.run(20)
        job.run_until_idle()
        kept += engine.outcomes[(RUN, "script", "num_workers", "kept")]
        engine, job = make([ScriptTuner([4])], curve=rates({0: 100.0, 4: 100.0}), sigma=0.05, seed=seed,
                           dt=(0.5, 1.0))
        job.run(20)
        job.run_until_idle()
        rolled += engine.outcomes[(RUN, "script", "num_workers", "rolled_back")]
        assert job.knobs["num_workers"] == 0 or engine.outcomes[(RUN, "script", "num_workers", "kept")]
    # 25% gain against 5% per-report noise: always kept. Zero gain: rolled back unless the medians
    # of 3 windows happen to differ by 3% (about 1 in 4 with this noise: why min_gain is not lower)
    assert kept == 20
    assert rolled >= 12
