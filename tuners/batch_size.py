"""The `batch_size` tuner: the micro-batch size hook.accumulate splits each batch into.

The fit itself runs in the training process (tuners/hook/actuators/microbatch.py): it needs the
first steps, not one-second windows. This tuner works after it: the hook's largest fitting
micro-batch stays unless a measured trial shows a smaller one at least as fast (a smaller one
leaves device memory to others and can run faster where a kernel prefers a smaller size). It
halves while halving keeps up, and stops at the first that does not.
"""
from __future__ import annotations

from dataclasses import dataclass

from looptune.options import opt
from looptune.tuners.engine import Context, Proposal, TunerBase


@dataclass
class BatchSizeOptions:
    """The config section tuners.batch_size."""
    try_smaller: bool = opt(True, "After the hook's fit, try half the micro-batch size; kept only when it is "
                                  "at least as fast.")
    min_micro_batch: int = opt(1, "Smallest micro-batch size a trial may set.", lo=1, hi=1 << 20)


class BatchSizeTuner(TunerBase):
    """Micro-batch size for jobs that call hook.accumulate."""
    name = "batch_size"
    knob = "micro_batch_size"
    Options = BatchSizeOptions

    def __init__(self, options: BatchSizeOptions | None = None) -> None:
        o = options or BatchSizeOptions()
        self.try_smaller = bool(o.try_smaller)
        self.min_micro_batch = int(o.min_micro_batch)
        self.done = False
        self.tried_from: int | None = None

    def propose(self, ctx: Context) -> Proposal | None:
        cur = ctx.obs.knobs.get(self.knob)
        if not isinstance(cur, int) or isinstance(cur, bool) or self.knob in ctx.obs.settling:
            return None          # no micro-batches yet, or the hook's fit still runs
        want = cur // 2
        if self.done or not self.try_smaller or want < self.min_micro_batch or self.tried_from == cur:
            return None
        self.tried_from = cur
        return Proposal(self.knob, want, f"half the largest micro-batch that fits ({cur}): kept only if at least "
                                         f"as fast", keep_if="no_worse")

    def result(self, proposal: Proposal, outcome: str, gain: float | None, ctx: Context) -> None:
        if outcome != "kept":
            self.done = True     # the larger one stays; the hook lowers it by itself after an OOM
