"""Every figure a training hook reports, declared once.

One declaration drives all four ends: the hook's report (`Meter.figures()` fills the report's
`counters` object from it), the daemon's check of that report (`protocol.check_report`), the
engine's observation and windows (`Observation.counters`, `engine._window`), and the Prometheus
export (`collectors.hookjobs.hook_families`). Adding a figure is one `Figure` here plus the code
that measures it. Pure Python: the daemon and the collectors import it without torch.
"""
from __future__ import annotations

from dataclasses import dataclass

COUNTER = "counter"     # cumulative since the hook started; rates and shares come from deltas
GAUGE = "gauge"         # the latest value


@dataclass(frozen=True)
class Figure:
    name: str           # key in the report's `counters` object
    kind: str           # COUNTER or GAUGE
    unit: str           # base unit of the value: seconds, samples, ... ("" for a plain number)
    help: str           # the exported metric's help text
    integer: bool = False
    optional: bool = False      # may be absent or null: the job has no such figure (no DDP, no loss given)
    finite_only: bool = True    # a counter is bounded 0..1e18; a gauge may be any finite number
    metric: str | None = None   # exported name (a counter without `_total`); None: exported another way

    @property
    def share_of_step(self) -> bool:
        """A counter of seconds inside the step: its window share is delta / step-seconds delta."""
        return self.kind == COUNTER and self.unit == "seconds" and self.name != "step_seconds"


FIGURES: tuple[Figure, ...] = (
    Figure("samples", COUNTER, "samples", "Training samples processed (counted at hook.step() for the "
           "batches it consumed).", integer=True, metric="looptune_job_samples"),
    Figure("batches", COUNTER, "batches", "Batches delivered by the watched loaders.", integer=True,
           metric="looptune_job_batches"),
    Figure("steps", COUNTER, "steps", "hook.step() calls (optimizer steps).", integer=True,
           metric="looptune_job_optimizer_steps"),
    Figure("data_wait_seconds", COUNTER, "seconds", "Seconds the training loop waited for the next batch.",
           metric="looptune_job_data_wait_seconds"),
    # the sum of the step-time histogram (looptune_job_step_seconds), not a series of its own
    Figure("step_seconds", COUNTER, "seconds", "Wall time between consecutive optimizer steps."),
    Figure("comm_seconds", COUNTER, "seconds", "Seconds the step waited for gradient all-reduce after "
           "backward finished (DDP jobs; communication not hidden behind compute).", optional=True,
           metric="looptune_job_comm_wait_seconds"),
    Figure("comm_wire_seconds", COUNTER, "seconds", "Of comm_seconds, the part every rank waited: the smallest "
           "rank's wait, summed between rank syncs (DDP jobs the hook tunes). The rest waited on a slower rank, "
           "which compression cannot shorten.", optional=True, metric="looptune_job_comm_wire_seconds"),
    Figure("comm_bytes", COUNTER, "bytes", "Bytes this rank put on the wire for gradient all-reduce (DDP jobs, "
           "under the current grad_compression setting).", integer=True, optional=True,
           metric="looptune_job_comm_bytes"),
    Figure("loss", GAUGE, "", "The latest loss given to hook.step(loss=...), read at report time.",
           optional=True, metric="looptune_job_loss"),
    Figure("loss_nonfinite", COUNTER, "reports", "Reports whose latest loss was NaN or infinite.",
           integer=True, optional=True, metric="looptune_job_loss_nonfinite"),
    Figure("oom_recoveries", COUNTER, "errors", "Out-of-memory errors hook.accumulate recovered from in the "
           "step (the batch done again in smaller micro-batches).", integer=True, optional=True,
           metric="looptune_job_oom_recoveries"),
    Figure("device_memory_peak_bytes", GAUGE, "bytes", "Peak device memory allocated during the latest "
           "hook.accumulate step.", optional=True, metric="looptune_job_device_memory_peak_bytes"),
    Figure("gradient_noise_scale", GAUGE, "samples", "Gradient noise scale B_simple (McCandlish et al. 2018) "
           "from the micro-batch and batch gradients: the global batch up to which a larger batch still "
           "trains about proportionally faster.", optional=True, metric="looptune_job_gradient_noise_scale"),
)

BY_NAME = {f.name: f for f in FIGURES}
REQUIRED = tuple(f.name for f in FIGURES if not f.optional)
