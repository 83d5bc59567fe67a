"""The `workers` tuner: DataLoader num_workers for input-bound jobs.

Policy: while the job is input-bound, climb (0 -> 1 -> 2 -> 4 -> 8 ...) as long as each step
gains; when a step does not, refine between the last kept value and the rejected one, and
stop at the knee (the gap under a quarter of the current value). Bounds: `max_workers`; the
CPU the job may use (a window with the process tree's CPU saturated is a `cpu` verdict, not
`input`: climbing stops, and a setting above the job's cores is brought back down if that
measures no slower, within 1%); and a memory budget for all workers, measured from their USS.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from looptune.options import opt
from looptune.tuners.bottleneck import Window
from looptune.tuners.engine import Context, Observation, Proposal, Settings, Trial, TunerBase


START_WAIT_SHARE = 0.20   # from 0 workers, climb only when the loop waits at least this share
RETRY_WAIT_SHARE = 0.30   # after stopping, explore again only while it still waits this much


@dataclass
class WorkersOptions:
    """The config section tuners.workers."""
    max_workers: int = opt(32, "Most DataLoader workers the tuner will set.", lo=0, hi=1024)
    memory_budget_bytes: int = opt(0, "Memory all loader workers of a job may use together (their USS), "
                                      "bytes. 0: memory_budget_share of the host's available memory.", lo=0)
    memory_budget_share: float = opt(0.25, "Share of the host's available memory for a job's workers when "
                                           "memory_budget_bytes is 0.", lo=0.01, hi=0.9)


class MemoryBudget:
    """Guard: the trial's workers use more memory than the budget allows."""
    name = "memory_budget"

    def __init__(self, tuner: WorkersTuner) -> None:
        self.tuner = tuner

    def check(self, trial: Trial, obs: Observation, window: Window, settings: Settings) -> str | None:
        return self.tuner.budget_exceeded(obs)


class WorkersTuner(TunerBase):
    """DataLoader num_workers for input-bound jobs."""
    name = "workers"
    knob = "num_workers"
    Options = WorkersOptions

    def __init__(self, options: WorkersOptions | None = None) -> None:
        o = options or WorkersOptions()
        self.max_workers = int(o.max_workers)
        self.budget_bytes = int(o.memory_budget_bytes)
        self.budget_share = float(o.memory_budget_share)
        self.guards = (MemoryBudget(self),)
        self.rejected_above: int | None = None
        self.tried: set[int] = set()
        self.done = False
        self.used_memory = False
        self.shrunk = False
        self.per_worker_bytes: int | None = None
        self.stop_reason = ""
        self.proposed_from: int | None = None
        self.failed = False
        self.input_windows = 0      # clearly input-bound windows since tuning stopped, less the others
        self.retry_after = 30       # net such windows before exploring again (doubles, up to 960)
        self.skip_one = False

    # ---- memory ----

    def budget(self, obs: Observation) -> float | None:
        if self.budget_bytes > 0:
            return float(self.budget_bytes)
        if obs.host_available_bytes:
            return self.budget_share * obs.host_available_bytes
        return None

    def _per_worker(self, obs: Observation, cur: int) -> int | None:
        if cur > 0 and obs.worker_uss_bytes is not None:
            self.per_worker_bytes = max(self.per_worker_bytes or 0, obs.worker_uss_bytes // cur)
        if self.per_worker_bytes:
            return self.per_worker_bytes
        if obs.main_rss_bytes:          # no worker measured yet: assume a tenth of the main process
            return obs.main_rss_bytes // 10
        return None

    def _fit_memory(self, obs: Observation, cur: int, want: int) -> int:
        budget = self.budget(obs)
        per = self._per_worker(obs, cur)
        if budget is None or not per:
            return want
        fits = int(budget // per)
        if fits < want:
            self.stop_reason = f"memory budget {budget / 2**20:.0f} MiB fits {fits} workers of ~{per / 2**20:.0f} MiB"
        return min(want, fits)

    def budget_exceeded(self, obs: Observation) -> str | None:
        cur = obs.knobs.get(self.knob)
        if isinstance(cur, int) and not isinstance(cur, bool):
            self._per_worker(obs, cur)      # learn from the trial's own workers before they go
        budget = self.budget(obs)
        if budget is not None and obs.worker_uss_bytes is not None and obs.worker_uss_bytes > budget:
            return f"workers use {obs.worker_uss_bytes / 2**20:.0f} MiB, over the {budget / 2**20:.0f} MiB budget"
        return None

    # ---- policy ----

    def propose(self, ctx: Context) -> Proposal | None:
        cur = ctx.obs.knobs.get(self.knob)
        if not isinstance(cur, int) or isinstance(cur, bool):
            return None
        if ctx.remembered is not None and not self.used_memory:
            self.used_memory = True
            if isinstance(ctx.remembered, int) and ctx.remembered != cur:
                want = self._fit_memory(ctx.obs, cur, min(ctx.remembered, self.max_workers))
                if want != cur:
                    self.proposed_from = cur
                    return Proposal(self.knob, want, "the best setting remembered for this run and dataset",
                                    keep_if="no_loss")
        allowed = ctx.obs.cpu_cores_allowed
        if ctx.verdict == "cpu" and allowed and cur > math.ceil(allowed) and not self.shrunk:
            self.shrunk = True
            self.proposed_from = cur
            # fewer workers for the same speed frees cores and memory; a loss, even one smaller than
            # min_gain, is not the same speed: the shrink has to measure no worse
            return Proposal(self.knob, max(1, math.ceil(allowed)),
                            f"CPU saturated with {cur} workers on {allowed:g} cores", keep_if="no_worse")
        # a saturated CPU with the loop still waiting on data: more workers than cores can still
        # pay (workers idle on IPC between items) or not; a trial measures it like any climb
        waiting = ctx.verdict == "input" or (ctx.verdict == "cpu" and ctx.window.data_wait_share >= RETRY_WAIT_SHARE)
        if not waiting:
            # one window of a noisy neighbour's burst must not restart the count: it takes one off
            self.input_windows = max(0, self.input_windows - 1)
            return None
        if self.done and self.failed:
            return None          # the knob cannot change in this job: no point trying again
        if self.done:
            # one noisy trial must not end tuning for good: after a stretch of clearly input-bound
            # windows (longer each time), explore upwards again from where the job is; a saturated
            # CPU is no reason to look again
            if ctx.window.data_wait_share < RETRY_WAIT_SHARE or ctx.verdict != "input":
                self.input_windows = max(0, self.input_windows - 1)
                return None
            self.input_windows += 1
            if self.input_windows < self.retry_after:
                return None
            self.retry_after = min(self.retry_after * 2, 960)
            self.input_windows = 0
            self.done, self.rejected_above, self.tried = False, None, set()
        if cur == 0 and ctx.window.data_wait_share < START_WAIT_SHARE:
            return None          # a worker's IPC costs more than so short a wait could give back
        if self.rejected_above is None:
            want = (2 if self.skip_one else 1) if cur == 0 else cur * 2
            why = f"input-bound ({ctx.window.data_wait_share:.0%} of step time waiting for data): climb"
        else:
            gap = self.rejected_above - cur
            if gap <= max(1, cur // 4):
                self.done, self.stop_reason = True, f"knee between {cur} and {self.rejected_above}"
                return None
            want = cur + gap // 2
            why = f"refine between {cur} (kept) and {self.rejected_above} (no gain)"
        want = min(want, self.max_workers)
        want = self._fit_memory(ctx.obs, cur, want)
        if want <= cur or want in self.tried:
            self.done = True
            self.stop_reason = self.stop_reason or (
                f"knee between {cur} and {self.rejected_above}" if self.rejected_above is not None
                else f"bounded at {cur} (max_workers {self.max_workers})")
            return None
        self.proposed_from = cur
        return Proposal(self.knob, want, why)

    def result(self, proposal: Proposal, outcome: str, gain: float | None, ctx: Context) -> None:
        value = proposal.value
        self.tried.add(value)
        if outcome == "kept":
            if isinstance(self.proposed_from, int) and value < self.proposed_from:
                # fewer workers measured as fast: more would not pay either, until the retry count says so
                self.done, self.rejected_above = True, self.proposed_from
                self.stop_reason = f"{value} workers as fast as {self.proposed_from}"
            return
        cur = self.proposed_from
        if outcome == "rolled_back" and cur == 0 and value == 1 and not self.skip_one and self.max_workers >= 2:
            # one worker loads as serially as the main process did (it only overlaps loading with the
            # step), so 0 -> 1 can gain nothing where 2 would double the rate: probe 2 before stopping
            self.skip_one = True
            return
        if isinstance(cur, int) and value > cur:
            self.rejected_above = value if self.rejected_above is None else min(self.rejected_above, value)
        if outcome == "failed":
            self.done, self.failed, self.stop_reason = True, True, "the change failed"
