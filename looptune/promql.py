"""PromQL over the looptune daemon's metrics, defined once for the Grafana dashboards
(dashboards/build.py) and `looptune report` (looptune/report.py).

Each function takes a label selector without braces (`run="$run", rank=~"$rank"`) and, for a
rate, its range (Grafana's `$__rate_interval` by default; the report substitutes a duration).
`by` names the labels a query keeps where the dashboards group differently. Standard library
only, no imports: build.py runs from a bare checkout.
"""
from __future__ import annotations

RATE_INTERVAL = "$__rate_interval"


def _sum_rate(metric: str, sel: str, by: str | None, rate: str) -> str:
    inner = f"rate({metric}{{{sel}}}[{rate}])"
    return f"sum by ({by}) ({inner})" if by else f"sum({inner})"


def samples_rate(sel: str, by: str | None = "instance, rank", rate: str = RATE_INTERVAL) -> str:
    """Training samples per second; `by=None` sums everything the selector holds (a whole run)."""
    return _sum_rate("looptune_job_samples_total", sel, by, rate)


def data_wait_share(sel: str, rate: str = RATE_INTERVAL) -> str:
    """Share of wall time each rank's loop waited for its next batch, 0..1 (seconds per second)."""
    return f"rate(looptune_job_data_wait_seconds_total{{{sel}}}[{rate}])"


def comm_share(sel: str, rate: str = RATE_INTERVAL) -> str:
    """Share of step time each rank waited on gradient all-reduce after backward, 0..1 (DDP jobs)."""
    return (f"rate(looptune_job_comm_wait_seconds_total{{{sel}}}[{rate}]) / ignoring(le) "
            f"rate(looptune_job_step_seconds_sum{{{sel}}}[{rate}])")


def comm_wire_share(sel: str, rate: str = RATE_INTERVAL) -> str:
    """Of that, the share every rank waited (the smallest rank's wait): the wire's part, not a wait
    on a slower rank (DDP jobs whose hook tunes; the engine's communication verdict reads this)."""
    return (f"rate(looptune_job_comm_wire_seconds_total{{{sel}}}[{rate}]) / ignoring(le) "
            f"rate(looptune_job_step_seconds_sum{{{sel}}}[{rate}])")


def comm_bytes_per_step(sel: str, rate: str = RATE_INTERVAL) -> str:
    """Bytes each rank put on the wire for gradients per optimizer step (DDP jobs)."""
    return (f"rate(looptune_job_comm_bytes_total{{{sel}}}[{rate}]) / "
            f"rate(looptune_job_optimizer_steps_total{{{sel}}}[{rate}])")


def step_seconds_quantile(q: float, sel: str, by: str = "instance, rank", rate: str = RATE_INTERVAL) -> str:
    """Quantile `q` of the time between optimizer steps, from the step-time histogram, seconds."""
    return f"histogram_quantile({q:g}, sum by ({by}, le) (rate(looptune_job_step_seconds_bucket{{{sel}}}[{rate}])))"


def knob(sel: str) -> str:
    """Value of each numeric knob, per rank."""
    return f"looptune_job_knob{{{sel}}}"


def bottleneck_ranks(sel: str) -> str:
    """How many of the selected ranks hold each verdict (kind) now."""
    return f"sum by (kind) (looptune_job_bottleneck{{{sel}}})"


def job_cpu_cores(sel: str, by: str = "instance, rank, mode", rate: str = RATE_INTERVAL) -> str:
    """CPU cores used by each rank's process tree (DataLoader workers included)."""
    return _sum_rate("looptune_job_cpu_seconds_total", sel, by, rate)


def job_processes(sel: str) -> str:
    return f"looptune_job_processes{{{sel}}}"


def job_memory(sel: str) -> str:
    """Memory of each rank's process tree by kind (rss, pss, uss), bytes."""
    return f"looptune_job_memory_bytes{{{sel}}}"


def peak_memory(sel: str, kind: str) -> str:
    """Peaks the hook reports; `kind` is a label matcher: `kind="max_rss"`, `kind=~"cuda_.*"`."""
    return f"looptune_job_peak_memory_bytes{{{sel}, {kind}}}"


def job_gpu_utilization(sel: str) -> str:
    """SM utilization NVML attributes to each rank's processes, per GPU, 0..1."""
    return f"looptune_job_gpu_utilization_ratio{{{sel}}}"


def job_gpu_memory(sel: str) -> str:
    """GPU memory each rank's processes hold, per GPU, bytes."""
    return f"looptune_job_gpu_memory_bytes{{{sel}}}"


def gpus_held(sel: str) -> str:
    """1 for each GPU a selected rank holds memory on (to join device series onto ranks)."""
    return f"(0 * {job_gpu_memory(sel)} + 1)"


def device_gpu_utilization_held(sel: str) -> str:
    """The whole device's utilization of each GPU a selected rank holds, with the rank's labels."""
    return f"looptune_gpu_utilization_ratio * on (job, instance, gpu) group_right () {gpus_held(sel)}"
