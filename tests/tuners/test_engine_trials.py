"""The engine's trial paths beyond keep / roll back (test_engine.py has those): a knob the job
changed itself, a reload with a trial in flight, the loss guard, a gain inside the noise that
earns more measurement, a noisy neighbour's bursts judged from the job's long-run jitter,
settling until the new setting is warm, and remembered values keyed by knob. Each test here fails on an engine without the path it names."""
from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path
from typing import Any, Callable

import pytest

from test_engine import KEY, RUN, Clock, FakeJob, ScriptTuner, rates
from looptune.tuners.engine import (JITTER_MIN, Engine, Observation, Phase, ProgressGuard, Settings, long_run_jitter,
                                    noise_bar, residuals)
from looptune.tuners.memory import BestSettings


class Job(FakeJob):
    """FakeJob with a loss, a settling flag after a change and a deterministic noise cycle."""

    def __init__(self, *a: Any, loss: Callable[[int, int], float | None] | None = None,
                 settling_windows: int = 0, ramp: float | None = None,
                 cycle: tuple[float, ...] = (1.0,), **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.loss = loss                      # (report number, num_workers) -> loss, None: NaN
        self.nonfinite = 0
        self.settling_windows = settling_windows
        self.ramp = ramp                      # samples/s while the new setting warms up
        self.cycle = cycle
        self.warm_left = 0
        self.last_n = self.knobs["num_workers"]

    def _run_for(self, seconds: float, n: int) -> None:
        if n != self.last_n:
            self.last_n, self.warm_left = n, self.settling_windows
        curve = self.curve
        factor = self.cycle[self.reports % len(self.cycle)]
        rate = self.ramp if self.warm_left > 0 and self.ramp is not None else curve(n)
        self.curve = lambda _n: rate * factor
        try:
            super()._run_for(seconds, n)
        finally:
            self.curve = curve

    def observation(self) -> Observation:
        obs = super().observation()
        counters = dict(obs.counters)
        if self.loss is not None:
            value = self.loss(self.reports, self.knobs["num_workers"])
            if value is None:
                self.nonfinite += 1
            else:
                counters["loss"] = value
            counters["loss_nonfinite"] = self.nonfinite
        settling = ("num_workers",) if self.warm_left > 0 else ()
        if self.warm_left > 0:
            self.warm_left -= 1
        return dataclasses.replace(obs, counters=counters, settling=settling)


def make_job(tuners: list[Any], settings: Settings | None = None, memory: Any = None, **kw: Any) -> tuple[Engine, Job]:
    clock = Clock()
    job = Job(clock=clock, **kw)
    engine = Engine(lambda names: list(tuners), job.send, settings or Settings(), memory=memory, clock=clock)
    job.engine = engine
    return engine, job


def run_trial(job: Job, limit: int = 200) -> None:
    """Until a trial has started and ended."""
    for _ in range(limit):
        job.tick()
        if job.engine.jobs[KEY].trial is not None:
            break
    job.run_until_idle()


def run_to(job: Job, phase: Phase, limit: int = 60) -> None:
    for _ in range(limit):
        job.tick()
        t = job.engine.jobs[KEY].trial
        if t is not None and t.phase is phase:
            return
    raise AssertionError(f"never reached {phase}: {job.phases}")


# ---- a knob changed by the job itself ----

def test_a_knob_the_job_changes_itself_fails_the_trial_and_restarts_the_baseline() -> None:
    tuner = ScriptTuner([4])
    engine, job = make_job([tuner], curve=rates({0: 100.0, 4: 200.0, 2: 150.0}))
    run_to(job, Phase.MEASURE)
    job.knobs["num_workers"] = 2          # the hook lowered it (an out-of-memory error, say)
    job.tick()
    state = engine.jobs[KEY]
    assert state.trial is None
    last = state.history[-1]
    assert last["outcome"] == "failed" and "changed outside the trial" in last["detail"] and "2" in last["detail"]
    assert tuner.results == [(4, "failed", None)]
    assert [d["value"] for d in job.sent] == [4]        # nothing sent back: the job's own value stands
    assert state.steady == []                            # windows at 0 or 4 say nothing about 2
    job.run(10)
    assert state.steady and all(v == pytest.approx(150.0) for v in state.steady)


def test_a_knob_changed_between_trials_restarts_the_baseline() -> None:
    engine, job = make_job([ScriptTuner([])], curve=rates({0: 100.0, 3: 300.0}))
    job.run(6)            # the first report opens the first window
    assert engine.jobs[KEY].steady == [100.0] * 5
    job.knobs["num_workers"] = 3
    job.tick()
    assert engine.jobs[KEY].steady == []
    job.run(3)            # the report that showed the change opens the first window at 3
    assert engine.jobs[KEY].steady == [300.0] * 3


# ---- reload ----

def test_abort_rolls_back_a_trial_in_flight() -> None:
    engine, job = make_job([ScriptTuner([4])], curve=rates({0: 100.0, 4: 200.0}))
    run_to(job, Phase.MEASURE)
    assert engine.abort("config reloaded") == 1
    assert job.sent[-1]["value"] == 0 and job.sent[-1]["reason"] == "roll back: config reloaded"
    assert engine.outcomes[(RUN, "script", "num_workers", "rolled_back")] == 1
    assert engine.abort("again") == 0            # a roll back in flight is not rolled back twice
    job.run(3)
    assert job.knobs["num_workers"] == 0 and engine.jobs[KEY].trial is None


# ---- the loss ----

def test_a_nan_loss_rolls_back_at_once() -> None:
    nan_from = 6

    def loss(report: int, n: int) -> float | None:
        return None if n == 4 and report >= nan_from else 2.0 - 0.01 * report

    engine, job = make_job([ScriptTuner([4])], settings=Settings(measure_windows=6), loss=loss,
                           curve=rates({0: 100.0, 4: 200.0}))
    run_to(job, Phase.MEASURE)
    while engine.jobs[KEY].trial.phase is Phase.MEASURE:
        job.tick()
    last = engine.jobs[KEY].history[-1]
    assert last["outcome"] == "rolled_back" and "NaN" in last["detail"]
    assert len(engine.jobs[KEY].trial.measured) < 6        # before the measurement was done


@pytest.mark.parametrize("jump, outcome", [(1.0, "rolled_back"), (0.0, "kept")])
def test_a_loss_above_its_trend_rolls_back(jump: float, outcome: str) -> None:
    def loss(report: int, n: int) -> float:           # falling steadily; a jump at the new setting
        return 3.0 - 0.02 * report + (jump if n == 4 else 0.0)

    engine, job = make_job([ScriptTuner([4])], settings=Settings(baseline_windows=5), loss=loss,
                           curve=rates({0: 100.0, 4: 200.0}))
    run_trial(job)
    last = engine.jobs[KEY].history[-1]
    assert last["outcome"] == outcome, last
    if outcome == "rolled_back":
        assert "loss" in last["detail"] and "trend" in last["detail"]


def test_a_loss_that_stops_falling_does_not_roll_back_a_good_trial() -> None:
    # a loss that reaches its plateau as the trial starts: its straight line before the change
    # lies below the plateau (the Lightning example once lost 2 workers to "loss 1.074 is above
    # its trend before the change (1.159)"); a falling loss is held to its last level instead
    def loss(report: int, n: int) -> float:
        return 3.0 - 0.3 * min(report, 5)

    engine, job = make_job([ScriptTuner([4])], settings=Settings(baseline_windows=5), loss=loss,
                           curve=rates({0: 100.0, 4: 200.0}))
    run_trial(job)
    assert engine.jobs[KEY].history[-1]["outcome"] == "kept", engine.jobs[KEY].history[-1]


@pytest.mark.parametrize("keeps, guarded, outcome", [(0.1, True, "rolled_back"), (0.8, True, "kept"),
                                                     (0.1, False, "kept")])
def test_a_change_that_slows_the_loss_per_step_rolls_back_where_the_tuner_asks(keeps: float, guarded: bool,
                                                                                outcome: str) -> None:
    # the loss falls per step; at 4 workers it falls only `keeps` as fast per step, while still
    # below its last level (what LossGuard watches): gradient compression that slows learning
    state = {"loss": 3.0, "steps": 0.0}

    def loss(report: int, n: int) -> float:
        steps = job.counters["steps"]
        state["loss"] -= 0.03 * (steps - state["steps"]) * (keeps if n == 4 else 1.0)
        state["steps"] = steps
        return state["loss"]

    tuner = ScriptTuner([4])
    if guarded:
        tuner.guards = (ProgressGuard(),)
    engine, job = make_job([tuner], settings=Settings(baseline_windows=6), loss=loss,
                           curve=rates({0: 100.0, 4: 200.0}))
    run_trial(job)
    last = engine.jobs[KEY].history[-1]
    assert last["outcome"] == outcome, last
    if outcome == "rolled_back":
        assert "per step" in last["detail"], last
    else:
        assert last["gain"] == pytest.approx(1.0)


def test_the_progress_guard_leaves_a_flat_loss_to_the_loss_guard() -> None:
    tuner = ScriptTuner([4])
    tuner.guards = (ProgressGuard(),)
    engine, job = make_job([tuner], settings=Settings(baseline_windows=6), loss=lambda r, n: 1.0 + 0.001 * (r % 3),
                           curve=rates({0: 100.0, 4: 200.0}))
    run_trial(job)
    assert engine.jobs[KEY].history[-1]["outcome"] == "kept"


# ---- noise ----

CYCLE = (0.9, 1.0, 1.1)       # a deterministic jitter: median 1, median absolute deviation 0.1


def test_a_gain_inside_the_noise_is_measured_longer_and_kept() -> None:
    s = Settings(baseline_windows=10, measure_windows=3, max_extensions=3)
    engine, job = make_job([ScriptTuner([4])], settings=s, cycle=CYCLE, curve=rates({0: 100.0, 4: 113.0}))
    run_trial(job)
    last = engine.jobs[KEY].history[-1]
    assert last["outcome"] == "kept" and last["gain"] == pytest.approx(0.13)
    measured = job.phases.count("measure")
    assert measured > 3                     # more than one round of measure windows
    # the bar that the first 3 windows faced was above the gain: that alone would have rolled it back
    assert noise_bar([90.0, 100.0, 110.0] * 3 + [90.0], [101.7, 113.0, 124.3]) > 0.13


def test_without_extensions_the_same_gain_is_rolled_back() -> None:
    s = Settings(baseline_windows=10, measure_windows=3, max_extensions=0)
    engine, job = make_job([ScriptTuner([4])], settings=s, cycle=CYCLE, curve=rates({0: 100.0, 4: 113.0}))
    run_trial(job)
    assert engine.jobs[KEY].history[-1]["outcome"] == "rolled_back"


@pytest.mark.parametrize("new_rate, outcome", [(99.0, "kept"), (91.0, "rolled_back")])
def test_keep_if_no_loss_in_noise_keeps_at_most_a_min_gain_loss(new_rate: float, outcome: str) -> None:
    # the job's jitter puts a 9% loss inside the noise bar: it is measured longer, and then the
    # old setting stays, instead of the bar's width being taken as a loss the job may afford
    s = Settings(baseline_windows=10, measure_windows=3, max_extensions=3)
    engine, job = make_job([ScriptTuner([2], keep_if="no_loss")], settings=s, cycle=CYCLE, start=8,
                           curve=rates({8: 100.0, 2: new_rate}))
    run_trial(job)
    last = engine.jobs[KEY].history[-1]
    assert last["outcome"] == outcome
    if outcome == "rolled_back":
        assert job.phases.count("measure") > 3          # measured longer before the roll back
        assert noise_bar([90.0, 100.0, 110.0] * 3 + [90.0], [81.9, 91.0, 100.1]) > 0.09


@pytest.mark.parametrize("new_rate, outcome", [(100.0, "kept"), (97.5, "rolled_back")])
def test_keep_if_no_worse_in_noise_measures_a_small_loss_longer_and_keeps_the_old_setting(
        new_rate: float, outcome: str) -> None:
    # a 2.5% loss inside the noise bar: no_loss keeps it; no_worse measures it longer, and it stays a loss
    s = Settings(baseline_windows=10, measure_windows=3, max_extensions=3)
    engine, job = make_job([ScriptTuner([2], keep_if="no_worse")], settings=s, cycle=CYCLE, start=8,
                           curve=rates({8: 100.0, 2: new_rate}))
    run_trial(job)
    last = engine.jobs[KEY].history[-1]
    assert last["outcome"] == outcome and last["gain"] == pytest.approx(new_rate / 100 - 1)
    assert job.phases.count("measure") == (3 if outcome == "kept" else 12)


def test_the_noise_bar_narrows_with_more_windows() -> None:
    steady = [90.0, 100.0, 110.0] * 4
    bars = [noise_bar(steady, [90.0, 100.0, 110.0] * k) for k in (1, 2, 4)]
    assert bars[0] > bars[1] > bars[2] > 0
    assert noise_bar([100.0] * 5, [120.0] * 5) == 0.0


# ---- a noisy neighbour: the job's long-run jitter ----

def bursts(depth: float, windows: int) -> list[float]:
    """A neighbour that takes a core in bursts: calm stretches of 2-4 windows, then 2-3 windows
    `depth` of the calm rate (a 1-3% wobble on both), for `windows` windows."""
    calm, dip = (1.0, 1.01, 0.99, 1.02), (depth, depth - 0.03, depth + 0.02)
    out: list[float] = []
    for c, b in itertools.cycle(((3, 2), (2, 3), (4, 2), (2, 2), (3, 3), (4, 3))):
        out += [calm[i % 4] for i in range(c)] + [dip[i % 3] for i in range(b)]
        if len(out) >= windows:
            return out[:windows]
    raise AssertionError


def trial_after(history: list[float], during: list[float], gain: float,
                settings: Settings | None = None) -> tuple[Engine, Job]:
    """A job at 2 workers with `history` (factors of its rate, one a window), then a trial of 4
    workers (`gain` better) proposed on the first window of `during`: that window and the next
    apply and settle the change, the third is the first one measured."""
    tuner = ScriptTuner([])
    cycle = tuple(history) + tuple(during) + (1.0, 1.01, 0.99) * 10
    engine, job = make_job([tuner], settings=settings, cycle=cycle, start=2,
                           curve=rates({2: 100.0, 4: 100.0 * (1 + gain)}))
    job.run(len(history))
    assert engine.jobs[KEY].trial is None and job.reports == len(history)
    tuner.values.append(4)
    job.tick()
    assert engine.jobs[KEY].trial is not None
    job.run_until_idle()
    return engine, job


CALM = [1.0, 1.0, 1.0, 1.0]       # the trial starts after calm windows: its baseline is the calm rate


@pytest.mark.parametrize("depth", [0.5, 0.7])
def test_a_burst_during_a_trial_on_a_noisy_job_earns_more_measurement_not_a_roll_back(depth: float) -> None:
    # 4 workers gain 40%; the neighbour's burst takes 3 windows from the second one measured on.
    # 50% dips: two windows 30% below the calm baseline, past the 25% regression bound. 30% dips:
    # the 3 windows measured first have a median 2% below the baseline. Either rolled a +40%
    # setting back, judged from the windows of this trial alone
    engine, job = trial_after(bursts(depth, 60), CALM + [depth, depth - 0.02, depth + 0.01], gain=0.4)
    state = engine.jobs[KEY]
    assert [h["outcome"] for h in state.history] == ["kept"]
    assert state.history[0]["gain"] == pytest.approx(0.4, abs=0.03)
    assert job.knobs["num_workers"] == 4
    assert job.phases.count("measure") > 3                 # measured longer than the first look


def test_a_quiet_job_is_still_rolled_back_by_the_regression_guard_within_two_windows() -> None:
    engine, job = trial_after([1.0, 1.01, 0.99, 1.02] * 15, CALM, gain=-0.4,
                              settings=Settings(measure_windows=6))
    (entry,) = engine.jobs[KEY].history
    assert entry["outcome"] == "rolled_back" and entry["detail"] == "regression"
    assert job.phases.count("measure") == 2
    assert job.knobs["num_workers"] == 2


def test_a_job_with_a_short_history_is_judged_as_before() -> None:
    # the first trial after 3 baseline windows: too few windows to tell a burst from a regression,
    # so the guard's own bound holds, as it did before there was a history
    engine, job = trial_after(bursts(0.5, 3), CALM + [0.5, 0.48, 0.51], gain=0.4)
    (entry,) = engine.jobs[KEY].history
    assert entry["outcome"] == "rolled_back" and entry["detail"] == "regression"


def test_the_long_run_jitter_survives_setting_changes() -> None:
    # a kept trial, then one rolled back: each stretch at one setting joins the history once,
    # relative to its own median, when the job leaves it
    engine, job = make_job([ScriptTuner([4, 8])], settings=Settings(baseline_windows=5), cycle=CYCLE,
                           curve=rates({0: 100.0, 4: 200.0, 8: 200.0}))
    run_trial(job)
    state = engine.jobs[KEY]
    assert state.history[-1]["outcome"] == "kept"
    assert len(state.jitter) == 5                   # the 5 baseline windows at 0
    assert sorted(state.steady) == [180.0, 200.0, 220.0]          # the new stretch: the measured windows
    run_trial(job)
    assert state.history[-1]["outcome"] == "rolled_back"
    # then the 3 windows measured at 8, and the stretch at 4 (the kept trial's 3 windows and the
    # 2 windows after them) when the roll back is seen
    assert len(state.jitter) == 5 + 3 + 5
    assert state.steady == []
    # CYCLE's jitter, from windows at three settings (its 10% deviations read as ~0.1-0.15 sigma)
    assert 0.08 < long_run_jitter(list(state.jitter)) < 0.16


def test_the_long_run_jitter_sees_bursts_and_ignores_lone_windows() -> None:
    # 30% dips in ~45% of the windows, in stretches of 3 (a trial's measurement): the median
    # absolute deviation sees the wobble, not the dips; the long-run jitter sees them
    stretches = [[100.0 * f for f in bursts(0.7, 60)[i:i + 3]] for i in range(0, 60, 3)]
    r = [x for s in stretches for x in residuals(s)]
    assert 1.4826 * sorted(abs(x) for x in r)[len(r) // 2] < 0.05
    assert long_run_jitter(r) > 0.2
    quiet = [100.0 + (i % 3) for i in range(60)]
    quiet[10] = 40.0                                    # a worker restart
    assert long_run_jitter(residuals(quiet)) < 0.02
    assert long_run_jitter(residuals(quiet[:JITTER_MIN - 1])) == 0.0      # too short to say
    assert noise_bar([100.0] * 3, [100.0] * 3, floor=0.2) > noise_bar([100.0] * 3, [100.0] * 3) == 0.0


# ---- settling ----

def test_measurement_starts_when_the_new_setting_is_warm() -> None:
    # 8 new workers: 4 windows before each has delivered, at a fraction of the old rate
    engine, job = make_job([ScriptTuner([8])], curve=rates({0: 100.0, 8: 300.0}), settling_windows=4, ramp=20.0)
    run_trial(job)
    last = engine.jobs[KEY].history[-1]
    assert last["outcome"] == "kept" and last["gain"] == pytest.approx(2.0)
    assert job.phases.count("settle") >= 4


def test_settling_is_bounded() -> None:
    s = Settings(max_settle_windows=3)
    engine, job = make_job([ScriptTuner([8])], settings=s, curve=rates({0: 100.0, 8: 300.0}), settling_windows=50)
    job.run(40)
    assert engine.jobs[KEY].history and engine.jobs[KEY].history[0]["outcome"] == "kept"
    assert job.phases.count("settle") == 3


def test_leading_windows_still_climbing_are_not_measured() -> None:
    # no settling flag (an actuator without one), but the rate climbs for two windows
    engine, job = make_job([ScriptTuner([4])], settings=Settings(settle_windows=0, measure_windows=4),
                           curve=rates({0: 100.0, 4: 200.0}), settling_windows=2, ramp=60.0)
    job.settling_windows = 2
    job.observation_settling = False
    orig = job.observation

    def no_flag() -> Observation:
        return dataclasses.replace(orig(), settling=())
    job.observation = no_flag                  # type: ignore[method-assign]
    run_trial(job)
    last = engine.jobs[KEY].history[-1]
    assert last["outcome"] == "kept" and last["gain"] == pytest.approx(1.0)


# ---- remembered values, per knob ----

def test_each_tuner_is_offered_the_value_remembered_for_its_own_knob(tmp_path: Path) -> None:
    mem = BestSettings(str(tmp_path / "best.json"))
    mem.put(RUN, "sig-1", "num_workers", 6)
    workers, batch = ScriptTuner([], knob="num_workers", name="w"), ScriptTuner([], knob="micro_batch_size", name="b")
    engine, job = make_job([workers, batch], memory=mem)
    job.run(5)
    assert workers.contexts and all(c.remembered == 6 for c in workers.contexts)
    assert batch.contexts and all(c.remembered is None for c in batch.contexts)


def test_remembered_values_are_the_owners_own(tmp_path: Path) -> None:
    """Another user's trial under the same run name and data never becomes this user's best."""
    path = str(tmp_path / "best.json")
    engine, job = make_job([ScriptTuner([32])], memory=BestSettings(path), curve=rates({0: 100.0, 32: 300.0}))
    job.engine.jobs.clear()
    job.engine.observe(KEY, RUN, job.observation(), owner=65534)      # the job belongs to uid 65534
    run_trial(job)
    assert engine.jobs[KEY].history[-1]["outcome"] == "kept"
    assert BestSettings(path).get(RUN, "sig-1", "num_workers", owner=65534) == 32
    root, other = ScriptTuner([], name="root"), ScriptTuner([], name="other")
    for tuner, owner in ((root, 0), (other, 65534)):
        engine, job = make_job([tuner], memory=BestSettings(path))
        job.engine.observe(KEY, RUN, job.observation(), owner=owner)
        job.run(5)
    assert root.contexts and all(c.remembered is None for c in root.contexts)
    assert other.contexts and all(c.remembered == 32 for c in other.contexts)
