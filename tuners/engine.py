"""The tuner engine: windows of a job's figures in, knob decisions out, each change a trial.

Pure Python, no torch: the daemon runs it for every hooked job, and a hook without a daemon
runs the same engine in-process. Per job there is at most one trial at a time, an explicit
state machine:

    ready -> (baseline) -> apply -> settle -> measure -> keep | roll back -> cooldown -> ready

The comparison is noise-aware: the median of several windows against the median of the
baseline windows, with a minimum relative gain before "better". A window that falls below the
baseline by more than `regression_bound`, a failed apply, or a memory budget crossed rolls
back at once. Tuners are plugins (tuners.registry): observations in, a proposed change out.
"""
from __future__ import annotations

import itertools
import logging
import statistics
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from looptune.tuners.bottleneck import Window, verdict

log = logging.getLogger("looptune.engine")

STEADY_WINDOWS = 10   # windows kept at the current setting, to judge the job's jitter


@dataclass(frozen=True)
class Observation:
    """One report of a job, joined with its process-tree and host figures."""
    time: float                                  # monotonic seconds
    counters: dict[str, float]                   # cumulative, from the hook
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
    comm_share: float | None = None
    cpu_cores_demand: float | None = None        # cores run + waited on a run queue (schedstat)


@dataclass(frozen=True)
class Proposal:
    knob: str
    value: Any
    reason: str
    keep_if: str = "gain"        # gain: must improve by min_gain; no_loss: must not lose more


@dataclass
class Settings:
    window_seconds: float = 1.0
    baseline_windows: int = 3
    measure_windows: int = 3
    settle_windows: int = 1
    min_gain: float = 0.03
    regression_bound: float = 0.25
    cooldown_windows: int = 3
    apply_timeout_seconds: float = 60.0


class Tuner(Protocol):
    name: str
    knob: str

    def propose(self, ctx: "Context") -> Proposal | None:
        """A change to try now, or None."""

    def result(self, proposal: Proposal, outcome: str, gain: float | None, ctx: "Context") -> None:
        """What became of the proposal: kept, rolled_back or failed."""


@dataclass
class Context:
    """What a tuner sees: the job's latest observation, its windows and verdict."""
    run: str
    obs: Observation
    window: Window
    windows: list[Window]
    verdict: str
    settings: Settings
    remembered: Any = None        # best value stored for (run, signature), if any


@dataclass
class Trial:
    tuner: Tuner
    proposal: Proposal
    old: Any
    baseline: list[float]
    id: int
    phase: str = "apply"
    started: float = 0.0
    settle_left: int = 0
    measured: list[float] = field(default_factory=list)
    below: int = 0
    steady: list[float] = field(default_factory=list)   # every window at the old setting: its jitter
    extended: bool = False
    rollback_id: int | None = None


@dataclass
class JobState:
    run: str
    tuners: list[Tuner]
    last_obs: Observation | None = None
    window_start: Observation | None = None
    windows: deque = field(default_factory=lambda: deque(maxlen=120))
    steady: list[float] = field(default_factory=list)   # throughput windows at the current setting
    trial: Trial | None = None
    cooldown: int = 0
    verdict: str = "none"
    history: list[dict[str, Any]] = field(default_factory=list)


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

    def observe(self, key: Any, run: str, obs: Observation, tuners: list[str] | None = None) -> None:
        """Take one report of a job; `tuners` names the job's tuners (None: all enabled)."""
        job = self.jobs.get(key)
        if job is None:
            job = self.jobs[key] = JobState(run=run, tuners=self._make_tuners(tuners))
        job.last_obs = obs
        if job.window_start is None:
            job.window_start = obs
            return
        # reports come about once a window: allow their jitter instead of skipping to two windows
        if obs.time - job.window_start.time < 0.9 * self.settings.window_seconds:
            if job.trial is not None and job.trial.phase == "apply":
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
        if t is None or outcome == "applied":
            return
        if t.phase == "rollback":
            if decision_id == t.rollback_id:
                # the old value could not be restored: say so now instead of waiting out the timeout
                log.warning("run %s: roll back of %s to %r not applied (%s): %s", job.run, t.proposal.knob,
                            t.old, outcome, detail)
                job.trial = None
                job.steady = []
                job.cooldown = self.settings.cooldown_windows
            return       # the trial itself is already recorded (rolled_back)
        if t.id != decision_id:
            return
        log.warning("run %s: %s -> %r not applied (%s): %s", job.run, t.proposal.knob, t.proposal.value,
                    outcome, detail)
        self._finish(key, job, "failed", None, detail or outcome)

    def forget(self, key: Any) -> None:
        """The job left; a trial it was in has nothing left to roll back."""
        self.jobs.pop(key, None)

    def verdicts(self) -> dict[Any, str]:
        return {k: j.verdict for k, j in self.jobs.items()}

    # ---- the state machine ----

    def _advance(self, key: Any, job: JobState, obs: Observation, w: Window) -> None:
        t = job.trial
        s = self.settings
        if t is None:
            if job.cooldown > 0:      # windows right after a roll back hold a worker restart: no baseline
                job.cooldown -= 1
                return
            job.steady.append(w.samples_per_second)
            del job.steady[:-max(s.baseline_windows, s.measure_windows, STEADY_WINDOWS)]
            if len(job.steady) >= s.baseline_windows:
                self._maybe_start(key, job, obs, w)
            return
        if t.phase == "apply":
            self._check_applied(key, job, obs)
            return
        if t.phase == "rollback":
            if obs.knobs.get(t.proposal.knob) == t.old or self._clock() - t.started > s.apply_timeout_seconds:
                job.trial = None
                job.steady = []
                job.cooldown = s.cooldown_windows
            return
        if t.phase == "settle":
            t.settle_left -= 1
            if t.settle_left <= 0:
                t.phase = "measure"
            return
        # measure
        base = statistics.median(t.steady or t.baseline)   # every window at the old setting
        t.measured.append(w.samples_per_second)
        if base > 0 and w.samples_per_second < base * (1 - s.regression_bound):
            t.below += 1
            if t.below >= 2:
                self._rollback(key, job, "regression", (statistics.median(t.measured) / base) - 1)
                return
        else:
            t.below = 0
        reason = t.tuner.budget_exceeded(obs) if hasattr(t.tuner, "budget_exceeded") else None
        if reason:
            self._rollback(key, job, reason, None)
            return
        if len(t.measured) >= s.measure_windows * (2 if t.extended else 1):
            gain = statistics.median(t.measured) / base - 1 if base > 0 else float("inf")
            bar = max(s.min_gain, _noise(t.steady, t.measured))
            ok = gain >= bar if t.proposal.keep_if == "gain" else gain >= -bar
            if ok and t.proposal.keep_if == "gain" and gain < 3 * bar and not t.extended:
                t.extended = True    # a marginal gain: measure as long again before believing it
                return
            if ok:
                self._finish(key, job, "kept", gain, f"{gain:+.1%} samples/s")
                job.steady = list(t.measured)
            else:
                self._rollback(key, job, f"{gain:+.1%} samples/s is below the {bar:.0%} bar", gain)

    def _maybe_start(self, key: Any, job: JobState, obs: Observation, w: Window) -> None:
        remembered = self.memory.get(job.run, obs.signature) if self.memory is not None and obs.signature else None
        ctx = Context(job.run, obs, w, list(job.windows), job.verdict, self.settings, remembered)
        for tuner in job.tuners:
            if tuner.knob in obs.untunable:
                continue
            try:
                p = tuner.propose(ctx)
            except Exception:  # noqa: BLE001 - a broken plugin must not stop the others
                log.exception("tuner %s failed to propose", tuner.name)
                continue
            if p is None or p.value == obs.knobs.get(p.knob):
                continue
            trial = Trial(tuner, p, obs.knobs.get(p.knob), list(job.steady[-self.settings.baseline_windows:]),
                          next(self._ids), started=self._clock(), steady=list(job.steady))
            decision = {"id": trial.id, "knob": p.knob, "value": p.value, "reason": p.reason, "tuner": tuner.name}
            if not self._send(key, decision):
                return
            job.trial = trial
            for outcome in ("kept", "rolled_back", "failed"):   # series exist at 0, so increase() sees the 1st
                self.outcomes.setdefault((job.run, tuner.name, p.knob, outcome), 0)
            log.info("run %s: trial %s %s -> %r (%s)", job.run, tuner.name, p.knob, p.value, p.reason)
            return

    def _check_applied(self, key: Any, job: JobState, obs: Observation) -> None:
        t = job.trial
        assert t is not None
        if obs.knobs.get(t.proposal.knob) == t.proposal.value:
            t.phase = "settle"
            t.settle_left = self.settings.settle_windows
            job.window_start = obs          # windows start at the change
            if t.settle_left <= 0:
                t.phase = "measure"
        elif self._clock() - t.started > self.settings.apply_timeout_seconds:
            self._finish(key, job, "failed", None, "not applied in time")

    def _rollback(self, key: Any, job: JobState, why: str, gain: float | None) -> None:
        t = job.trial
        assert t is not None
        self._record(job, t, "rolled_back", gain, why)
        t.rollback_id = next(self._ids)
        decision = {"id": t.rollback_id, "knob": t.proposal.knob, "value": t.old,
                    "reason": f"roll back: {why}", "tuner": t.tuner.name}
        self._send(key, decision)
        t.phase = "rollback"
        t.started = self._clock()
        self._tell(t, "rolled_back", gain, job)

    def _finish(self, key: Any, job: JobState, outcome: str, gain: float | None, why: str) -> None:
        t = job.trial
        assert t is not None
        self._record(job, t, outcome, gain, why)
        job.trial = None
        if outcome == "failed":
            job.cooldown = self.settings.cooldown_windows
            job.steady = []
        if outcome == "kept" and self.memory is not None and job.last_obs is not None and job.last_obs.signature:
            self.memory.put(job.run, job.last_obs.signature, t.proposal.knob, t.proposal.value)
        self._tell(t, outcome, gain, job)

    def _tell(self, t: Trial, outcome: str, gain: float | None, job: JobState) -> None:
        if job.last_obs is None or not job.windows:
            return
        ctx = Context(job.run, job.last_obs, job.windows[-1], list(job.windows), job.verdict, self.settings)
        try:
            t.tuner.result(t.proposal, outcome, gain, ctx)
        except Exception:  # noqa: BLE001
            log.exception("tuner %s failed to take a result", t.tuner.name)

    def _record(self, job: JobState, t: Trial, outcome: str, gain: float | None, why: str) -> None:
        self.outcomes[(job.run, t.tuner.name, t.proposal.knob, outcome)] += 1
        entry = {"time": time.time(), "tuner": t.tuner.name, "knob": t.proposal.knob, "old": t.old,
                 "new": t.proposal.value, "outcome": outcome, "gain": gain, "reason": t.proposal.reason,
                 "detail": why}
        job.history.append(entry)
        del job.history[:-200]
        log.info("run %s: %s %s %r -> %r %s (%s)", job.run, t.tuner.name, t.proposal.knob, t.old,
                 t.proposal.value, outcome, why)


def from_config(config: Any, send: Callable[[Any, dict[str, Any]], bool], *, daemon: bool,
                clock: Callable[[], float] = time.monotonic) -> Engine:
    """An engine with the config's tuners and trial settings (config: daemon.config.Config)."""
    from looptune.tuners.memory import BestSettings, default_path
    from looptune.tuners.registry import make_tuners
    t = config.tuners
    settings = Settings(window_seconds=t.window_seconds, baseline_windows=t.baseline_windows,
                        measure_windows=t.measure_windows, settle_windows=t.settle_windows, min_gain=t.min_gain,
                        regression_bound=t.regression_bound, cooldown_windows=t.cooldown_windows)
    enabled = list(t.enabled)
    options = {"workers": t.workers}
    make_tuners(enabled, options)       # fail now, naming a plugin that does not load

    def tuners_for(names: list[str] | None) -> list[Tuner]:
        return make_tuners([n for n in enabled if names is None or n in names], options)

    memory = BestSettings(t.state_file or default_path(daemon))
    return Engine(tuners_for, send, settings, memory=memory, clock=clock)


def _noise(steady: list[float], measured: list[float]) -> float:
    """The job's jitter at a fixed setting, relative: 1.5 x the median absolute deviation over the
    median of each side's windows, the larger one. A gain smaller than that is not evidence on a
    shared, noisy machine; the MAD ignores a lone window that caught a worker restart."""
    out = 0.0
    for x in (steady, measured):
        if len(x) >= 3:
            m = statistics.median(x)
            if m > 0:
                out = max(out, 1.5 * statistics.median(abs(v - m) for v in x) / m)
    return out


def _window(a: Observation, b: Observation) -> Window | None:
    ca, cb = a.counters, b.counters
    dt = b.time - a.time
    dstep = cb["step_seconds"] - ca["step_seconds"]
    dsteps = cb["steps"] - ca["steps"]
    if dt <= 0 or dsteps <= 0 or dstep <= 0:
        return None
    return Window(seconds=dt, samples_per_second=(cb["samples"] - ca["samples"]) / dt,
                  data_wait_share=min(1.0, max(0.0, (cb["data_wait_seconds"] - ca["data_wait_seconds"]) / dstep)),
                  step_seconds_mean=dstep / dsteps, cpu_cores_used=b.cpu_cores_used,
                  cpu_cores_allowed=b.cpu_cores_allowed, gpu_utilization=b.gpu_utilization,
                  gpu_memory_used_share=b.gpu_memory_used_share, comm_share=b.comm_share,
                  cpu_cores_demand=b.cpu_cores_demand)
