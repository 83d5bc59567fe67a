"""The bottleneck verdicts: their kinds and thresholds, defined once.

The engine's rules (looptune.tuners.bottleneck), the exporter's `looptune_job_bottleneck{kind}`
series, `looptune report`, the Grafana dashboards (dashboards/build.py) and the alert rules
(dashboards/rules/, checked by tests/dashboards/test_verdicts_agree.py) all read this module.
Pure Python: no torch, no daemon, nothing to import.

Thresholds are shares (0..1) of a window of a few seconds.
"""
from __future__ import annotations

KINDS = ("input", "cpu", "gpu", "memory_headroom", "communication", "none")

DESCRIPTIONS = {
    "input": "the loop waits for its next batch and the CPU has room: more DataLoader workers or prefetch help",
    "cpu": "the CPU the job may use is saturated (what it ran plus what it waited to run): "
           "more workers cannot help",
    "gpu": "the accelerator is busy: the job runs as fast as its device allows",
    "memory_headroom": "the accelerator is not busy and most of its memory is free: a bigger batch would fit",
    "communication": "collectives take a large share of the step: gradient compression may help",
    "none": "nothing stands out: no knob is expected to help",
}

# data wait / step time at or above which the loop is input-bound. Low on purpose: a GPU that
# idles a tenth of every step is a tenth of the job's GPU-hours, and a loader fix is cheap.
INPUT_WAIT_SHARE = 0.10

# CPU demand (time the job's threads ran + time they waited on a run queue) over the cores the
# job may use (affinity, cgroup quota), at or above which the CPU is saturated. Demand, not use:
# beside a busy neighbour the job's use falls although it wants the CPU. Below 1 because demand
# is sampled over short windows and a loop that waits for data never keeps every core busy.
CPU_SATURATED = 0.90

# time in collectives / step time at or above which the job is communication-bound: a third of
# the step is what gradient compression can win back at a measurable cost in accuracy risk.
COMM_SHARE = 0.30

# accelerator utilization (NVML: share of time a kernel ran) at or above which the GPU is the
# limit; NVML's sampling reads a busy device in the high 80s to 100%.
GPU_BUSY = 0.85

# device memory used below this share, with the GPU not busy: twice the batch would still fit.
GPU_MEMORY_HEADROOM = 0.50

# data-wait share that pages a person (LooptuneJobInputBound in dashboards/rules/looptune-alerts.yml)
# and marks the dashboards red: more than half the GPU time lost, sustained. The verdict says
# `input` from INPUT_WAIT_SHARE up; the alert waits for the tuners and fires only when this bad.
ALERT_INPUT_WAIT_SHARE = 0.50

THRESHOLDS = {
    "INPUT_WAIT_SHARE": INPUT_WAIT_SHARE,
    "CPU_SATURATED": CPU_SATURATED,
    "COMM_SHARE": COMM_SHARE,
    "GPU_BUSY": GPU_BUSY,
    "GPU_MEMORY_HEADROOM": GPU_MEMORY_HEADROOM,
    "ALERT_INPUT_WAIT_SHARE": ALERT_INPUT_WAIT_SHARE,
}
