"""The tuner engine: windows of a job's figures in, knob decisions out, each change a trial.

Pure Python, no torch: the daemon runs it for every hooked job, and a hook without a daemon
runs the same engine in-process. Per job there is at most one trial at a time, an explicit
state machine (Phase):

    ready -> (baseline) -> APPLY -> SETTLE -> MEASURE -> keep | ROLLBACK -> cooldown -> ready

A tuner declares what it optimises (`objective`: a Window figure, higher is better; samples/s
by default) and the guards that end a trial at once (`guards`; the engine adds its own:
regression of the objective, loss health). Settling ends when the new setting is warm: the
actuator no longer reports the knob as settling (every new loader worker delivered) and the
objective has stopped climbing. The comparison is noise-aware: the median of the measured
windows against the median of every window at the old setting, with a bar from the job's own
jitter that narrows as more windows are measured; a gain above the minimum but inside that
bar earns more measurement before it is believed or rolled back.

The jitter of a few windows at one setting says little about a job beside a noisy neighbour:
three calm windows look quiet. So the engine also keeps, per job, each settled window relative
to the median of its own stretch at one setting, across settings (the last JITTER_WINDOWS). Its
spread is a floor under the noise bar, and where it explains more than `regression_bound` the
job is noisy: the regression guard then needs windows below the old median by more than that
(3 of its sigmas), and a shortfall a burst explains earns more measurement instead of a roll back.

A knob changed by someone else (the hook itself, after an out-of-memory error) ends a trial on
that knob as `failed` and starts a new baseline. `abort()` (a config reload) rolls back every
trial in flight before the engine is replaced.
"""
from __future__ import annotations

import enum
import itertools
import logging
import math
import statistics
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

from looptune.tuners.bottleneck import Window, verdict

log = logging.getLogger("looptune.engine")

STEADY_WINDOWS = 20   # windows kept at the current setting, to judge the job's jitter
JITTER_WINDOWS = 60   # windows of a job's long-run jitter, across its settings
JITTER_MIN = 12       # fewer, and a trial judges the job's jitter by its own windows only (as before)
BURST_SIGMAS = 3.0    # how far below its median the long-run jitter lets a window fall
EQUAL_WITHIN = 0.01   # keep_if no_worse: a loss this small is the same speed


class Phase(str, enum.Enum):
    """A trial's phase; compares equal to its name as a string."""
    APPLY = "apply"          # decision sent, waiting for the hook to apply it
    SETTLE = "settle"        # applied; the new setting warms up, windows not counted
    MEASURE = "measure"      # windows at the new setting, compared with the old one
    ROLLBACK = "rollback"    # the old value sent back, waiting to see it applied

    def __str__(self) -> str:
        return self.value


class Outcome(str, enum.Enum):
    KEPT = "kept"
    ROLLED_BACK = "rolled_back"
    FAILED = "failed"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Observation:
    """One report of a job, joined with its process-tree and host figures."""
    time: float                                  # monotonic seconds
    counters: dict[str, float]                   # the report's figures (looptune.schema), counters cumulative
    knobs: dict[str, Any]
    untunable: dict[str, str] = field(default_factory=dict)   # knob -> why it cannot change
    signature: str = ""                          # the watched loader's dataset signature
    cpu_cores_used: float | None = None
    cpu_cores_allowed: float | None = None
    gpu_utilization: float | None = None
    gpu_memory_used_share: float | None = None
    worker_uss_bytes: int | None = None          # all loader workers together
    main_rss_bytes: int | None = None
    host_available_bytes: int | None = None
    settling: tuple[str, ...] = ()               # knobs whose new setting is still warming up
    cpu_cores_demand: float | None = None        # cores run + waited on a run queue (schedstat)


@dataclass(frozen=True)
class Proposal:
    knob: str
    value: Any
    reason: str
    # gain: must improve by the bar; no_loss: must not lose more than min_gain; no_worse: must not
    # lose more than EQUAL_WITHIN (a change that needs evidence it costs nothing, such as fewer workers)
    keep_if: str = "gain"


@dataclass
class Settings:
    window_seconds: float = 1.0
    baseline_windows: int = 3
    measure_windows: int = 3
    settle_windows: int = 1
    max_settle_windows: int = 10
    min_gain: float = 0.03
    regression_bound: float = 0.25
    cooldown_windows: int = 3
    apply_timeout_seconds: float = 60.0
    max_extensions: int = 3      # times a result inside the noise may be measured again (measure_windows each)


class Guard(Protocol):
    """Ends a trial at once (roll back) when `check` names a reason."""
    name: str

    def check(self, trial: Trial, obs: Observation, window: Window, settings: Settings) -> str | None: ...


class Tuner(Protocol):
    name: str
    knob: str
    objective: str                  # a Window figure to maximise, e.g. "samples_per_second"
    guards: Sequence[Guard]         # the tuner's own guards, beside the engine's

    def propose(self, ctx: Context) -> Proposal | None:
        """A change to try now, or None."""

    def result(self, proposal: Proposal, outcome: str, gain: float | None, ctx: Context) -> None:
        """What became of the proposal: kept, rolled_back or failed."""


class TunerBase:
    """Defaults for a tuner plugin: samples/s, no guards of its own, no options."""
    name = ""
    knob = ""
    objective = "samples_per_second"
    guards: Sequence[Guard] = ()
    Options: type | None = None     # a dataclass of the tuner's options: config section tuners.<name>

    def result(self, proposal: Proposal, outcome: str, gain: float | None, ctx: Context) -> None:
        pass


@dataclass
class Context:
    """What a tuner sees: the job's latest observation, its windows and verdict."""
    run: str
    obs: Observation
    window: Window
    windows: list[Window]
    verdict: str
    settings: Settings
    remembered: Any = None        # the best value stored for (run, signature, this tuner's knob), if any


@dataclass
class Trial:
    tuner: Tuner
    proposal: Proposal
    old: Any
    baseline: list[float]
    id: int
    phase: Phase = Phase.APPLY
    started: float = 0.0
    settled: int = 0                                    # windows spent settling
    measured: list[float] = field(default_factory=list)
    losses_before: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    loss_steps_before: list[float] = field(default_factory=list)   # the job's step count at each loss
    loss_steps: list[float] = field(default_factory=list)
    nonfinite_at_start: float = 0.0
    below: int = 0
    steady: list[float] = field(default_factory=list)   # every window at the old setting: its jitter
    jitter: float = 0.0             # the job's long-run relative jitter at the start; 0: history too short
    extensions: int = 0
    rollback_id: int | None = None


@dataclass
class JobState:
    run: str
    tuners: list[Tuner]
    owner: int | None = None          # uid of the job's user
    last_obs: Observation | None = None
    window_start: Observation | None = None
    windows: deque = field(default_factory=lambda: deque(maxlen=120))
    steady: list[float] = field(default_factory=list)   # objective windows at the current setting
    # settled windows relative to the median of their own stretch at one setting, across settings
    jitter: deque = field(default_factory=lambda: deque(maxlen=JITTER_WINDOWS))
    losses: list[float] = field(default_factory=list)   # loss per window at the current setting
    loss_steps: list[float] = field(default_factory=list)   # the step count at each of those losses
    trial: Trial | None = None
    cooldown: int = 0
    verdict: str = "none"
    history: list[dict[str, Any]] = field(default_factory=list)


# ---- guards ----

class RegressionGuard:
    """Two windows below the old setting's median by more than `regression_bound`, or by more than
    the job's long-run jitter explains (BURST_SIGMAS of it) where that is wider: a noisy neighbour's
    burst is not a regression."""
    name = "regression"

    def check(self, trial: Trial, obs: Observation, window: Window, settings: Settings) -> str | None:
        base = statistics.median(trial.steady or trial.baseline)
        value = objective_of(trial.tuner, window)
        bound = max(settings.regression_bound, BURST_SIGMAS * trial.jitter)
        if base > 0 and value is not None and value < base * (1 - bound):
            trial.below += 1
            if trial.below >= 2:
                return "regression"
        else:
            trial.below = 0
        return None


class LossGuard:
    """A non-finite loss rolls back at once; so does a loss clearly above the trend it had before
    the change (3 robust deviations of that trend and 5% of the loss, over 2 or more windows).
    A falling trend is not extrapolated: a loss curve flattens, and its straight line would soon
    lie below any loss; a falling loss is held to its last level before the change instead."""
    name = "loss"

    def check(self, trial: Trial, obs: Observation, window: Window, settings: Settings) -> str | None:
        if obs.counters.get("loss_nonfinite", 0) > trial.nonfinite_at_start:
            return "the loss became NaN or infinite"
        before, after = trial.losses_before, trial.losses
        if len(before) < 3 or len(after) < 2:
            return None
        n = len(before)
        slope, mx, my, _, spread = _fit(range(n), before)
        if slope < 0:
            level = statistics.median(before[-3:])
            excess = statistics.median(y - level for y in after)
        else:     # a rising trend continued over the trial's windows, not extrapolated past them
            excess = statistics.median(y - (my + slope * (n + i - mx)) for i, y in enumerate(after))
        if excess > max(3 * spread, 0.05 * abs(my)):
            return f"loss {statistics.median(after):.4g} is above its trend before the change ({my:.4g})"
        return None


class ProgressGuard:
    """For a knob that changes the arithmetic of training (gradient compression), not only its
    speed: the loss must keep falling per step about as it did before the change. LossGuard holds
    a falling loss only to its last level, so a change that slows learning while the loss still
    falls passes it, and the loss at an equal number of steps pays for the samples/s.

    The loss's slope per step over the last windows before (the most recent PROGRESS_WINDOWS: a
    curve flattens, its recent slope is the one to continue) and over the trial's windows; rolled
    back when the loss was clearly falling (its fall over those windows above 3 of its robust
    deviations) and the trial's slope keeps less than KEEP of it, by 3 standard errors of the two
    slopes. A trial's few windows cannot tell a slope that keeps 80% from a flattening curve, so
    the bar is half, not equal: it catches a setting that all but stops learning (PowerSGD at a
    low rank early in training), not a small cost. A flat loss is LossGuard's to watch."""
    name = "progress"
    KEEP = 0.5
    PROGRESS_WINDOWS = 6

    def check(self, trial: Trial, obs: Observation, window: Window, settings: Settings) -> str | None:
        xb = trial.loss_steps_before[-self.PROGRESS_WINDOWS:]
        yb = trial.losses_before[-self.PROGRESS_WINDOWS:]
        before, after = _line(xb, yb), _line(trial.loss_steps, trial.losses)
        if before is None or after is None:
            return None
        (b1, se1, spread), (b2, se2, _) = before, after
        if b1 >= 0 or -b1 * (xb[-1] - xb[0]) <= 3 * spread:
            return None
        shortfall = b2 - self.KEEP * b1           # > 0: the loss falls less than KEEP as fast per step
        if shortfall > 3 * math.hypot(se2, self.KEEP * se1):
            return (f"the loss falls {-b2:.3g} per step, {-b1:.3g} before the change: "
                    f"less than {self.KEEP:.0%} of its progress per step")
        return None


def _fit(x: Sequence[float], y: Sequence[float]) -> tuple[float, float, float, float, float]:
    """Least-squares line of y over x (x spread out, at least 2 points): slope, the means of x and
    y, the sum of squared deviations of x, and the residuals' robust spread (1.4826 MAD)."""
    mx, my = statistics.fmean(x), statistics.fmean(y)
    sxx = sum((v - mx) ** 2 for v in x)
    slope = sum((a - mx) * (b - my) for a, b in zip(x, y)) / sxx
    resid = [b - (my + slope * (a - mx)) for a, b in zip(x, y)]
    return slope, mx, my, sxx, 1.4826 * statistics.median(abs(r) for r in resid)


def _line(x: Sequence[float], y: Sequence[float]) -> tuple[float, float, float] | None:
    """Least-squares slope of y over x, its standard error and the residuals' robust spread
    (None for fewer than 3 points or no spread of x). The error takes the larger of the fit's
    residual spread and 1% of the mean (3 residuals of a line can agree by chance)."""
    if len(x) < 3 or len(x) != len(y) or max(x) == min(x):
        return None
    slope, _, my, sxx, spread = _fit(x, y)
    spread = max(spread, 0.01 * abs(my))
    return slope, spread / math.sqrt(sxx), spread


ENGINE_GUARDS: tuple[Guard, ...] = (RegressionGuard(), LossGuard())


def objective_of(tuner: Tuner, w: Window) -> float | None:
    value = getattr(w, tuner.objective)
    return None if value is None else float(value)


class Engine:
    def __init__(self, tuners: Callable[[list[str] | None], list[Tuner]], send: Callable[[Any, dict[str, Any]], bool],
                 settings: Settings | None = None, memory: Any = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._make_tuners = tuners
        self._send = send
        self.settings = settings or Settings()
        self.memory = memory                   # tuners.memory.BestSettings or None
        self._clock = clock
        self.jobs: dict[Any, JobState] = {}
        self.outcomes: Counter[tuple[str, str, str, str]] = Counter()   # (run, tuner, knob, outcome)
        self._ids = itertools.count(1)

    # ---- inputs ----

    def observe(self, key: Any, run: str, obs: Observation, tuners: list[str] | None = None,
                owner: int | None = None) -> None:
        """Take one report of a job; `tuners` names the job's tuners (None: all enabled); `owner` is
        the uid the job belongs to (remembered settings are that user's own)."""
        job = self.jobs.get(key)
        if job is None:
            job = self.jobs[key] = JobState(run=run, tuners=self._make_tuners(tuners), owner=owner)
        prev = job.last_obs
        job.last_obs = obs
        if job.window_start is None or not job.window_start.counters.get("steps"):
            # windows begin at the first report with a step done: the time before it (imports, the model
            # and the data set up, the process group) is no step and would make a first window look slow
            job.window_start = obs
            return
        if self._changed_outside(key, job, prev, obs):
            return
        # reports come about once a window: allow their jitter instead of skipping to two windows
        if obs.time - job.window_start.time < 0.9 * self.settings.window_seconds:
            if job.trial is not None and job.trial.phase is Phase.APPLY:
                self._check_applied(key, job, obs)
            return
        w = _window(job.window_start, obs)
        if w is None:
            if obs.counters["steps"] < job.window_start.counters["steps"] or obs.time <= job.window_start.time:
                job.window_start = obs      # counters or clock restarted: begin again from here
            # else no step finished yet (a step longer than a window): the window grows until one
            # does, so samples/s counts the whole time those samples took, not one window's worth
            return
        job.window_start = obs
        job.windows.append(w)
        job.verdict = verdict(w)
        self._advance(key, job, obs, w)

    def applied(self, key: Any, decision_id: int, outcome: str, detail: str = "") -> None:
        """The hook's acknowledgement of a decision (applied, failed or skipped)."""
        job = self.jobs.get(key)
        t = job.trial if job is not None else None
        if t is None:
            return
        if outcome == "applied":
            return       # the next report shows the knob: that, not the acknowledgement, starts settling
        if t.phase is Phase.ROLLBACK:
            if decision_id == t.rollback_id:
                # the old value could not be restored: say so now instead of waiting out the timeout
                log.warning("run %s: roll back of %s to %r not applied (%s): %s", job.run, t.proposal.knob,
                            t.old, outcome, detail)
                self._rebaseline(job, cooldown=True)
            return       # the trial itself is already recorded (rolled_back)
        if t.id != decision_id:
            return
        log.warning("run %s: %s -> %r not applied (%s): %s", job.run, t.proposal.knob, t.proposal.value,
                    outcome, detail)
        self._finish(key, job, Outcome.FAILED, None, detail or outcome)

    def forget(self, key: Any) -> None:
        """The job left; a trial it was in has nothing left to roll back."""
        self.jobs.pop(key, None)

    def prune_outcomes(self, runs: set[str]) -> None:
        """Drop the decision counters of runs not in `runs` (their jobs left): /metrics stays bounded."""
        for k in [k for k in self.outcomes if k[0] not in runs]:
            del self.outcomes[k]

    def abort(self, why: str) -> int:
        """Roll back every trial in flight (a config reload replaces this engine); returns how many."""
        n = 0
        for key, job in self.jobs.items():
            t = job.trial
            if t is not None and t.phase is not Phase.ROLLBACK:
                self._rollback(key, job, why, None)
                n += 1
        return n

    def verdicts(self) -> dict[Any, str]:
        return {k: j.verdict for k, j in self.jobs.items()}

    # ---- the state machine ----

    def _changed_outside(self, key: Any, job: JobState, prev: Observation | None, obs: Observation) -> bool:
        """A knob that moved without a decision of ours: the trial on it failed, the baseline restarts."""
        t = job.trial
        if t is not None:
            knob, now = t.proposal.knob, obs.knobs.get(t.proposal.knob)
            expected = {Phase.APPLY: (t.old, t.proposal.value), Phase.SETTLE: (t.proposal.value,),
                        Phase.MEASURE: (t.proposal.value,), Phase.ROLLBACK: (t.proposal.value, t.old)}[t.phase]
            if now in expected:
                return False
            if t.phase is Phase.ROLLBACK:
                log.info("run %s: %s is %r after the roll back, not %r: the job changed it", job.run, knob, now, t.old)
                self._rebaseline(job, obs=obs)
                return True
            self._finish(key, job, Outcome.FAILED, None,
                         f"{knob} changed outside the trial: {t.proposal.value!r} expected, the job has {now!r}")
            self._rebaseline(job, obs=obs)
            return True
        if prev is not None and any(prev.knobs.get(k) != v for k, v in obs.knobs.items() if k in prev.knobs):
            self._rebaseline(job, obs=obs)      # windows at the old setting say nothing about the new one
            return True
        return False

    def _rebaseline(self, job: JobState, obs: Observation | None = None, cooldown: bool = False) -> None:
        job.trial = None
        job.jitter.extend(residuals(job.steady))
        job.steady = []
        job.losses = []
        job.loss_steps = []
        if cooldown:
            job.cooldown = self.settings.cooldown_windows
        if obs is not None:
            job.window_start = obs

    def _advance(self, key: Any, job: JobState, obs: Observation, w: Window) -> None:
        t = job.trial
        s = self.settings
        if t is None:
            if job.cooldown > 0:      # windows right after a roll back hold a worker restart: no baseline
                job.cooldown -= 1
                return
            job.steady.append(w.samples_per_second)
            if w.loss is not None:
                job.losses.append(w.loss)
                job.loss_steps.append(obs.counters.get("steps", 0))
            keep = max(s.baseline_windows, s.measure_windows, STEADY_WINDOWS)
            if len(job.steady) > keep:      # a window that leaves the stretch joins the long run
                job.jitter.extend(residuals(job.steady)[:-keep])
            del job.steady[:-keep]
            del job.losses[:-keep]
            del job.loss_steps[:-keep]
            if len(job.steady) >= s.baseline_windows:
                self._maybe_start(key, job, obs, w)
            return
        if t.phase is Phase.APPLY:
            self._check_applied(key, job, obs)
            return
        if t.phase is Phase.ROLLBACK:
            if obs.knobs.get(t.proposal.knob) == t.old or self._clock() - t.started > s.apply_timeout_seconds:
                self._rebaseline(job, cooldown=True)
            return
        if t.phase is Phase.SETTLE:
            t.settled += 1
            warming = t.proposal.knob in obs.settling and t.settled < s.max_settle_windows
            if t.settled >= s.settle_windows and not warming:
                t.phase = Phase.MEASURE
            return
        self._measure(key, job, obs, w)

    def _measure(self, key: Any, job: JobState, obs: Observation, w: Window) -> None:
        t = job.trial
        assert t is not None
        s = self.settings
        value = objective_of(t.tuner, w)
        if value is None:
            return
        t.measured.append(value)
        if w.loss is not None:
            t.losses.append(w.loss)
            t.loss_steps.append(obs.counters.get("steps", 0))
        for guard in (*ENGINE_GUARDS, *t.tuner.guards):
            reason = guard.check(t, obs, w, s)
            if reason:
                base = statistics.median(t.steady or t.baseline)
                gain = statistics.median(t.measured) / base - 1 if base > 0 else None
                self._rollback(key, job, reason, gain)
                return
        self._drop_ramp(t)
        if len(t.measured) < s.measure_windows * (1 + t.extensions):
            return
        base = statistics.median(t.steady or t.baseline)
        gain = statistics.median(t.measured) / base - 1 if base > 0 else float("inf")
        noise = noise_bar(t.steady, t.measured, floor=t.jitter)
        bar = max(s.min_gain, noise)
        # on a noisy job a burst can hold most of the measured windows, and their median with them:
        # a shortfall that deep is no evidence yet (the regression guard lets such windows pass too)
        burst = BURST_SIGMAS * t.jitter if BURST_SIGMAS * t.jitter > s.regression_bound else 0.0
        if t.proposal.keep_if == "gain":
            ok, inside_noise = gain >= bar, s.min_gain - burst <= gain < bar
        else:
            # no_loss: kept when it loses at most min_gain; no_worse: at most EQUAL_WITHIN, so a loss
            # must be measured away, not hidden in the noise. A bigger loss the noise could explain is
            # measured longer, like a gain inside the noise; when that does not clear it, the old
            # setting stays: doubt keeps the setting that is known
            allowed = EQUAL_WITHIN if t.proposal.keep_if == "no_worse" else s.min_gain
            ok, inside_noise = gain >= -allowed, -max(noise, burst) <= gain < -allowed
        if inside_noise and t.extensions < s.max_extensions:
            t.extensions += 1       # a difference the noise could explain: measure as long again
            return
        if ok:
            self._finish(key, job, Outcome.KEPT, gain, f"{gain:+.1%} samples/s")
            job.jitter.extend(residuals(job.steady))        # the stretch at the old setting ends
            job.steady = list(t.measured)
            job.losses = list(t.losses)
            job.loss_steps = list(t.loss_steps)
        elif t.proposal.keep_if == "gain":
            self._rollback(key, job, f"{gain:+.1%} samples/s is below the {bar:.0%} bar", gain)
        else:
            self._rollback(key, job, f"{gain:+.1%} samples/s loses more than {allowed:.0%}", gain)

    def _drop_ramp(self, t: Trial) -> None:
        """Leading windows still climbing to the new level are settling, not measurement."""
        while len(t.measured) >= 3 and t.settled < self.settings.max_settle_windows:
            rest = statistics.median(t.measured[1:])
            if rest <= 0 or t.measured[0] >= rest * (1 - max(self.settings.min_gain, window_noise(t.measured[1:]))):
                return
            t.measured.pop(0)
            if t.losses:
                t.losses.pop(0)
                t.loss_steps.pop(0)
            t.settled += 1

    def _maybe_start(self, key: Any, job: JobState, obs: Observation, w: Window) -> None:
        if statistics.median(job.steady) <= 0:
            return      # no samples counted (no watched loader): nothing a trial could be judged by
        for tuner in job.tuners:
            if tuner.knob in obs.untunable:
                continue
            remembered = (self.memory.get(job.run, obs.signature, tuner.knob, owner=job.owner)
                          if self.memory is not None and obs.signature else None)
            ctx = Context(job.run, obs, w, list(job.windows), job.verdict, self.settings, remembered)
            try:
                p = tuner.propose(ctx)
            except Exception:  # noqa: BLE001 - a broken plugin must not stop the others
                log.exception("tuner %s failed to propose", tuner.name)
                continue
            if p is None or p.value == obs.knobs.get(p.knob):
                continue
            history = [*job.jitter, *residuals(job.steady)][-JITTER_WINDOWS:]
            trial = Trial(tuner, p, obs.knobs.get(p.knob), list(job.steady[-self.settings.baseline_windows:]),
                          next(self._ids), started=self._clock(), steady=list(job.steady),
                          jitter=long_run_jitter(history),
                          losses_before=list(job.losses), loss_steps_before=list(job.loss_steps),
                          nonfinite_at_start=obs.counters.get("loss_nonfinite", 0))
            # trial: the hook rolls it back itself should it lose this engine before the outcome
            decision = {"id": trial.id, "knob": p.knob, "value": p.value, "reason": p.reason, "tuner": tuner.name,
                        "trial": True}
            if not self._send(key, decision):
                return
            job.trial = trial
            for outcome in Outcome:     # series exist at 0, so increase() sees the 1st
                self.outcomes.setdefault((job.run, tuner.name, p.knob, outcome.value), 0)
            log.info("run %s: trial %s %s -> %r (%s)", job.run, tuner.name, p.knob, p.value, p.reason)
            return

    def _check_applied(self, key: Any, job: JobState, obs: Observation) -> None:
        t = job.trial
        assert t is not None
        if obs.knobs.get(t.proposal.knob) == t.proposal.value:
            t.phase = Phase.SETTLE
            job.window_start = obs          # windows start at the change
            if self.settings.settle_windows <= 0 and t.proposal.knob not in obs.settling:
                t.phase = Phase.MEASURE
        elif self._clock() - t.started > self.settings.apply_timeout_seconds:
            self._finish(key, job, Outcome.FAILED, None, "not applied in time")

    def _rollback(self, key: Any, job: JobState, why: str, gain: float | None) -> None:
        t = job.trial
        assert t is not None
        job.jitter.extend(residuals(t.measured))       # the stretch at the new setting ends
        self._record(job, t, Outcome.ROLLED_BACK, gain, why)
        t.rollback_id = next(self._ids)
        decision = {"id": t.rollback_id, "knob": t.proposal.knob, "value": t.old,
                    "reason": f"roll back: {why}", "tuner": t.tuner.name}
        self._send(key, decision)
        t.phase = Phase.ROLLBACK
        t.started = self._clock()
        self._tell(t, Outcome.ROLLED_BACK, gain, job)

    def _finish(self, key: Any, job: JobState, outcome: Outcome, gain: float | None, why: str) -> None:
        t = job.trial
        assert t is not None
        self._record(job, t, outcome, gain, why)
        job.trial = None
        if outcome is Outcome.FAILED:
            job.jitter.extend(residuals(t.measured))
            self._rebaseline(job, cooldown=True)
        if outcome is Outcome.KEPT:
            # settles the trial in the hook: the value stays even if the hook loses this engine later
            self._send(key, {"id": next(self._ids), "knob": t.proposal.knob, "value": t.proposal.value,
                             "reason": f"kept: {why}", "tuner": t.tuner.name})
            if self.memory is not None and job.last_obs is not None and job.last_obs.signature:
                self.memory.put(job.run, job.last_obs.signature, t.proposal.knob, t.proposal.value, owner=job.owner)
        self._tell(t, outcome, gain, job)

    def _tell(self, t: Trial, outcome: Outcome, gain: float | None, job: JobState) -> None:
        if job.last_obs is None or not job.windows:
            return
        ctx = Context(job.run, job.last_obs, job.windows[-1], list(job.windows), job.verdict, self.settings)
        try:
            t.tuner.result(t.proposal, outcome.value, gain, ctx)
        except Exception:  # noqa: BLE001
            log.exception("tuner %s failed to take a result", t.tuner.name)

    def _record(self, job: JobState, t: Trial, outcome: Outcome, gain: float | None, why: str) -> None:
        self.outcomes[(job.run, t.tuner.name, t.proposal.knob, outcome.value)] += 1
        entry = {"time": time.time(), "tuner": t.tuner.name, "knob": t.proposal.knob, "old": t.old,
                 "new": t.proposal.value, "outcome": outcome.value, "gain": gain, "reason": t.proposal.reason,
                 "detail": why}
        job.history.append(entry)
        del job.history[:-200]
        log.info("run %s: %s %s %r -> %r %s (%s)", job.run, t.tuner.name, t.proposal.knob, t.old,
                 t.proposal.value, outcome.value, why)


def from_config(config: Any, send: Callable[[Any, dict[str, Any]], bool], *, daemon: bool,
                clock: Callable[[], float] = time.monotonic) -> Engine:
    """An engine with the config's tuners and trial settings (config: daemon.config.Config)."""
    from looptune.tuners.memory import BestSettings, default_path
    from looptune.tuners.registry import make_tuners
    t = config.tuners
    settings = Settings(window_seconds=t.window_seconds, baseline_windows=t.baseline_windows,
                        measure_windows=t.measure_windows, settle_windows=t.settle_windows,
                        max_settle_windows=max(t.settle_windows, t.max_settle_windows), min_gain=t.min_gain,
                        regression_bound=t.regression_bound, cooldown_windows=t.cooldown_windows,
                        max_extensions=t.max_extensions)
    enabled = list(t.enabled)
    options = dict(t.options)
    make_tuners(enabled, options)       # fail now, naming a plugin that does not load

    def tuners_for(names: list[str] | None) -> list[Tuner]:
        return make_tuners([n for n in enabled if names is None or n in names], options)

    memory = BestSettings(t.state_file or default_path(daemon))
    return Engine(tuners_for, send, settings, memory=memory, clock=clock)


def window_noise(x: Sequence[float]) -> float:
    """One window's relative jitter: 1.5 x the median absolute deviation over the median (0 for
    fewer than 3 windows). The MAD ignores a lone window that caught a worker restart."""
    if len(x) < 3:
        return 0.0
    m = statistics.median(x)
    return 1.5 * statistics.median(abs(v - m) for v in x) / m if m > 0 else 0.0


def noise_bar(steady: Sequence[float], measured: Sequence[float], floor: float = 0.0) -> float:
    """The smallest relative difference of two medians the job's jitter does not explain: 1.5
    standard errors of the difference, from the larger robust spread of the two sides, and at least
    `floor` (the job's long-run jitter: a few calm windows must not make a noisy job look quiet).
    It narrows as either side gets more windows, which is what measuring longer buys."""
    spread = floor
    for x in (steady, measured):
        if len(x) >= 3:
            m = statistics.median(x)
            if m > 0:
                spread = max(spread, 1.4826 * statistics.median(abs(v - m) for v in x) / m)
    if not steady or not measured:
        return spread
    # the median's standard error is ~1.25 sigma / sqrt(n)
    return 1.5 * 1.2533 * spread * math.sqrt(1 / len(steady) + 1 / len(measured))


def residuals(x: Sequence[float]) -> list[float]:
    """Each window relative to the median of its stretch at one setting (none for fewer than 3),
    scaled by sqrt(n / (n - 1)): the median is taken from the windows themselves, so a short
    stretch shows less of the jitter than there is."""
    if len(x) < 3:
        return []
    m = statistics.median(x)
    if m <= 0:
        return []
    k = math.sqrt(len(x) / (len(x) - 1))
    return [k * (v / m - 1) for v in x]


def long_run_jitter(r: Sequence[float]) -> float:
    """A job's relative jitter (one sigma) from its window residuals; 0 for fewer than JITTER_MIN.

    Not the median absolute deviation: a noisy neighbour's bursts hold a minority of the windows,
    which that ignores (most residuals are 0 around the median of their own stretch). The root mean
    square, with each residual capped at the 90th percentile of their sizes so that a few lone
    windows (a worker restart) do not count, and divided by 0.912 to read sigma for normal jitter."""
    if len(r) < JITTER_MIN:
        return 0.0
    sizes = sorted(abs(v) for v in r)
    cap = sizes[int(0.9 * (len(sizes) - 1))]
    return math.sqrt(statistics.fmean(min(v, cap) ** 2 for v in sizes)) / 0.912


def _window(a: Observation, b: Observation) -> Window | None:
    ca, cb = a.counters, b.counters
    dt = b.time - a.time
    dstep = cb["step_seconds"] - ca["step_seconds"]
    dsteps = cb["steps"] - ca["steps"]
    if dt <= 0 or dsteps <= 0 or dstep <= 0:
        return None
    comm = None
    # the wire's part where the ranks measured it (a wait on a slower rank is no communication)
    wire = cb.get("comm_wire_seconds") is not None and ca.get("comm_wire_seconds") is not None
    key = "comm_wire_seconds" if wire else "comm_seconds"
    if cb.get(key) is not None and ca.get(key) is not None:
        comm = min(1.0, max(0.0, (cb[key] - ca[key]) / dstep))
    return Window(seconds=dt, samples_per_second=(cb["samples"] - ca["samples"]) / dt,
                  data_wait_share=min(1.0, max(0.0, (cb["data_wait_seconds"] - ca["data_wait_seconds"]) / dstep)),
                  step_seconds_mean=dstep / dsteps, cpu_cores_used=b.cpu_cores_used,
                  cpu_cores_allowed=b.cpu_cores_allowed, gpu_utilization=b.gpu_utilization,
                  gpu_memory_used_share=b.gpu_memory_used_share, comm_share=comm, loss=cb.get("loss"),
                  cpu_cores_demand=b.cpu_cores_demand)
