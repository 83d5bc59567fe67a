"""What holds a training job back, from one window of its figures.

Pure Python, no torch. The verdict is one of KINDS; the rules are ordered by what a person
would fix first: a loop that waits for data is input-bound unless the CPU it may use is
already saturated (then more loader workers cannot help: `cpu`); otherwise communication,
then the accelerator.
"""
from __future__ import annotations

from dataclasses import dataclass

KINDS = ("input", "cpu", "gpu", "memory_headroom", "communication", "none")

# thresholds, as shares of a window
INPUT_WAIT_SHARE = 0.10      # the loop waits this share of its time for the next batch
CPU_SATURATED = 0.90         # process-tree CPU over the cores the job may use
COMM_SHARE = 0.30            # time in collectives over step time
GPU_BUSY = 0.85              # accelerator utilization
GPU_MEMORY_HEADROOM = 0.50   # device memory used below this share: a bigger batch would fit


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
    loss: float | None = None                # the job's latest loss, when hook.step(loss=...) gives it


def verdict(w: Window) -> str:
    cpu_share = None
    if w.cpu_cores_used is not None and w.cpu_cores_allowed:
        cpu_share = w.cpu_cores_used / w.cpu_cores_allowed
    cpu_saturated = cpu_share is not None and cpu_share >= CPU_SATURATED
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
