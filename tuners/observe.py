"""Observations for the engine: a hook report joined with process-tree and host figures.

Shared by the daemon (figures from its collectors) and the embedded hook (from its own
JobsCollector over its process tree). No torch.
"""
from __future__ import annotations

import os
from typing import Any

from looptune.tuners.engine import Observation


def cores_allowed(pid: int) -> float | None:
    """CPUs the process may use: its affinity, capped by a cgroup v2 cpu.max quota."""
    try:
        cores = float(len(os.sched_getaffinity(pid)))
    except OSError:
        return None
    try:
        with open(f"/proc/{pid}/cgroup", encoding="ascii") as f:
            path = next((line.split("::", 1)[1].strip() for line in f if line.startswith("0::")), None)
        if path is not None:
            with open(f"/sys/fs/cgroup{path}/cpu.max", encoding="ascii") as f:
                quota, period = f.read().split()
            if quota != "max":
                cores = min(cores, int(quota) / int(period))
    except (OSError, ValueError, StopIteration):
        pass
    return cores


def build(time: float, report: dict[str, Any], job: Any = None, host_available_bytes: int | None = None,
          gpu_memory_total: dict[int, float] | None = None, pid: int | None = None,
          allowed: float | None = None) -> Observation:
    """`report` is a validated report message; `job` a collectors.jobs.JobSample of the same job."""
    gpu_util = gpu_mem = None
    if job is not None and job.gpu:
        sms = [sm for _, sm in job.gpu.values() if sm is not None]
        gpu_util = sum(sms) / len(sms) if sms else None
        if gpu_memory_total:
            shares = [m / gpu_memory_total[g] for g, (m, _) in job.gpu.items()
                      if m is not None and gpu_memory_total.get(g)]
            gpu_mem = max(shares) if shares else None
    return Observation(
        time=time, counters=report["counters"], knobs=report.get("knobs", {}),
        untunable=report.get("untunable", {}), signature=report.get("signature", ""),
        cpu_cores_used=job.cpu_cores if job is not None else None,
        cpu_cores_demand=job.cpu_cores_demand if job is not None else None,
        cpu_cores_allowed=allowed if allowed is not None else (cores_allowed(pid) if pid else None),
        gpu_utilization=gpu_util, gpu_memory_used_share=gpu_mem,
        worker_uss_bytes=job.worker_uss_bytes if job is not None else None,
        main_rss_bytes=job.root_rss_bytes if job is not None else None,
        host_available_bytes=host_available_bytes, settling=tuple(report.get("settling", ())))
