"""What holds a training job back, from one window of its figures.

Pure Python, no torch. The verdict is one of KINDS; the rules are ordered by what a person
would fix first: a loop that waits for data is input-bound unless the CPU it may use is
already saturated (then more loader workers cannot help: `cpu`); otherwise communication,
then the accelerator. The kinds and thresholds are defined once, in looptune.verdicts.
"""
from __future__ import annotations

from dataclasses import dataclass

from looptune.verdicts import (COMM_SHARE, CPU_SATURATED, GPU_BUSY, GPU_MEMORY_HEADROOM, INPUT_WAIT_SHARE,
                               KINDS)

__all__ = ["KINDS", "Window", "verdict", "cpu_share", "INPUT_WAIT_SHARE", "CPU_SATURATED", "COMM_SHARE",
           "GPU_BUSY", "GPU_MEMORY_HEADROOM"]


@dataclass(frozen=True)
class Window:
    """A job's figures over one window (a few seconds); None where unknown."""
    seconds: float
    samples_per_second: float
    data_wait_share: float            # data wait / step time, 0..1
    step_seconds_mean: float | None = None
    cpu_cores_used: float | None = None      # process tree, cores
    cpu_cores_allowed: float | None = None   # affinity and cgroup quota
    gpu_utilization: float | None = None     # 0..1, mean over the job's GPUs
    gpu_memory_used_share: float | None = None
    comm_share: float | None = None          # when DDP timing is reported
    cpu_cores_demand: float | None = None    # process tree: cores run + cores waited on a run queue
    loss: float | None = None                # the job's latest loss, when hook.step(loss=...) gives it


def cpu_share(w: Window) -> float | None:
    """The CPU the job wants over the cores it may use; None when either is unknown.

    Wants = demand (run + run-queue wait): beside a neighbour that holds the cores the job's
    use falls while its threads queue, and the queueing is the shortage. A job that queues
    behind its own threads (more runnable threads than cores) is short of CPU just the same.
    Demand is never below use; the larger of the two is taken, so a demand figure read from
    other counters than the use (schedstat, psutil) cannot hide a saturated CPU. Without a
    demand figure (no schedstat in the kernel) the use stands in."""
    if not w.cpu_cores_allowed:
        return None
    wants = [x for x in (w.cpu_cores_used, w.cpu_cores_demand) if x is not None]
    return max(wants) / w.cpu_cores_allowed if wants else None


def verdict(w: Window) -> str:
    share = cpu_share(w)
    cpu_saturated = share is not None and share >= CPU_SATURATED
    if w.data_wait_share >= INPUT_WAIT_SHARE:
        return "cpu" if cpu_saturated else "input"
    if w.comm_share is not None and w.comm_share >= COMM_SHARE:
        return "communication"
    if w.gpu_utilization is not None:
        if w.gpu_utilization >= GPU_BUSY:
            return "gpu"
        if w.gpu_memory_used_share is not None and w.gpu_memory_used_share < GPU_MEMORY_HEADROOM:
            return "memory_headroom"
    if cpu_saturated:
        return "cpu"
    return "none"
