"""The `compression` tuner: DDP gradient compression, switched on only where the wire is the
bottleneck, and kept only where it pays.

It proposes only on a `communication` verdict (the share of step time a rank waits on gradient
all-reduce after backward) that holds: the median share of the last `windows` windows must reach
`min_comm_share` too, so one window a host stall lengthened starts no trial. The cheap settings
first: bf16, else fp16 (a cast for the wire), then PowerSGD at the job's powersgd_rank. Each is a trial the engine measures: kept when samples/s
gains by the engine's bar with the loss healthy: a non-finite loss or one clearly above its trend
rolls back at once, and so does a loss that falls per step less than half as fast as before the
change (ProgressGuard: compression changes the gradients, so samples/s alone cannot judge it).
PowerSGD waits until the job has run `powersgd_after_steps` steps: early training is where a
low-rank gradient costs the most learning per step (torch's own PowerSGD state runs plain
all-reduce for its first 1,000 iterations for that reason). A PowerSGD trial the loss guards roll
back is tried once more at a higher rank (less compression) before the tuner stops. A setting the job cannot use (bf16 on a backend
without it) fails its trial with the reason, and the next one is tried.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass

from looptune.options import opt
from looptune.tuners.engine import Context, ProgressGuard, Proposal, TunerBase

SETTINGS = ("none", "fp16", "bf16", "powersgd")


def _check_setting(value: str) -> str | None:
    """One entry of the settings list (opt checks list entries one by one)."""
    return None if value in SETTINGS[1:] else f"is not a setting to try; allowed: {', '.join(SETTINGS[1:])}"


@dataclass
class CompressionOptions:
    """The config section tuners.compression."""
    settings: list[str] = opt(["bf16", "fp16", "powersgd"], "Settings to try, in order; a 16-bit cast once "
                                                             "kept makes the other one pointless.",
                              check=_check_setting)
    retry_rank: int = opt(4, "PowerSGD rank to retry at when the loss guard rolled PowerSGD back (0: no retry).",
                          lo=0, hi=1024)
    min_comm_share: float = opt(0.15, "Communication share of step time below which no trial starts.",
                                lo=0, hi=1)
    windows: int = opt(3, "Windows in a row whose median communication share must reach min_comm_share "
                          "before a trial (one slow window is no bottleneck).", lo=1, hi=100)
    powersgd_after_steps: int = opt(1000, "Steps the job runs before PowerSGD is tried: early training "
                                          "loses the most to a low-rank gradient.", lo=0, hi=10**9)


class CompressionTuner(TunerBase):
    """grad_compression for DDP jobs that wait on gradient all-reduce."""
    name = "compression"
    knob = "grad_compression"
    Options = CompressionOptions
    guards = (ProgressGuard(),)

    def __init__(self, options: CompressionOptions | None = None) -> None:
        o = options or CompressionOptions()
        self.order = list(o.settings)
        self.retry_rank = int(o.retry_rank)
        self.min_share = float(o.min_comm_share)
        self.windows = int(o.windows)
        self.powersgd_after = int(o.powersgd_after_steps)
        self.tried: set[str] = set()
        self.retry_pending = False       # PowerSGD failed its loss: raise the rank, then try it again
        self.retried = False

    def propose(self, ctx: Context) -> Proposal | None:
        cur = ctx.obs.knobs.get(self.knob)
        if not isinstance(cur, str) or ctx.verdict != "communication":
            return None
        recent = [w.comm_share or 0.0 for w in ctx.windows[-self.windows:]]
        if len(recent) < self.windows or min(recent[-1], statistics.median(recent)) < self.min_share:
            return None
        share = statistics.median(recent)
        why = f"communication-bound ({share:.0%} of step time waiting on gradient all-reduce)"
        if self.retry_pending:
            rank = ctx.obs.knobs.get("powersgd_rank")
            if isinstance(rank, int) and rank < self.retry_rank and "powersgd_rank" not in ctx.obs.untunable:
                self.retry_pending = False
                # the rank alone changes nothing outside PowerSGD: kept unless it costs
                return Proposal("powersgd_rank", self.retry_rank, f"{why}: PowerSGD again at a higher rank",
                                keep_if="no_worse")
            self.retry_pending = False
        for setting in self.order:
            if setting == cur or setting in self.tried:
                continue
            if cur in ("fp16", "bf16") and setting in ("fp16", "bf16"):
                continue         # one 16-bit cast kept: the other halves the same bytes
            if cur == "powersgd":
                return None
            if setting == "powersgd" and ctx.obs.counters.get("steps", 0) < self.powersgd_after:
                return None      # later: the cheaper casts were tried first, this one waits its turn
            return Proposal(self.knob, setting, f"{why}: try {setting}")
        return None

    def result(self, proposal: Proposal, outcome: str, gain: float | None, ctx: Context) -> None:
        if proposal.knob == "powersgd_rank":
            if outcome == "kept":
                self.tried.discard("powersgd")
                self.retried = True
            return
        self.tried.add(proposal.value)
        if proposal.value == "powersgd" and outcome == "rolled_back" and self.retry_rank and not self.retried:
            # faster and still rolled back: the loss guard's doing, so a less lossy rank may pass
            self.retry_pending = gain is not None and gain > 0
