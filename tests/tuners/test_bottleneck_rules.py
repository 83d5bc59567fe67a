"""tuners.bottleneck.verdict: each verdict from a crafted Window, and the boundaries of its thresholds."""
from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from looptune.tuners import bottleneck as b
from looptune.tuners.bottleneck import KINDS, Window, verdict


def win(**kw: Any) -> Window:
    base: dict[str, Any] = {"seconds": 1.0, "samples_per_second": 100.0, "data_wait_share": 0.0}
    base.update(kw)
    return Window(**base)


def test_kinds_and_thresholds_come_from_looptune_verdicts() -> None:
    from looptune import verdicts
    assert b.KINDS is verdicts.KINDS
    for name in ("INPUT_WAIT_SHARE", "CPU_SATURATED", "COMM_SHARE", "GPU_BUSY", "GPU_MEMORY_HEADROOM"):
        assert getattr(b, name) == verdicts.THRESHOLDS[name] == getattr(verdicts, name)
    assert set(verdicts.DESCRIPTIONS) == set(verdicts.KINDS)


def test_thresholds_are_as_documented() -> None:
    # the boundary tests below follow the constants; this one pins the documented values
    assert (b.INPUT_WAIT_SHARE, b.CPU_SATURATED, b.COMM_SHARE, b.GPU_BUSY, b.GPU_MEMORY_HEADROOM) == \
        (0.10, 0.90, 0.30, 0.85, 0.50)


@pytest.mark.parametrize("window, expected", [
    # input: the loop waits for data, with CPU to spare (or CPU unknown)
    (win(data_wait_share=0.6), "input"),
    (win(data_wait_share=0.6, cpu_cores_used=1.0, cpu_cores_allowed=2.0), "input"),
    (win(data_wait_share=0.6, cpu_cores_used=1.99, cpu_cores_allowed=None), "input"),
    (win(data_wait_share=0.6, cpu_cores_used=1.99, cpu_cores_allowed=0.0), "input"),   # unknown quota
    (win(data_wait_share=0.6, gpu_utilization=0.99, comm_share=0.9), "input"),         # input comes first
    # cpu: waiting, but the cores it may use are saturated (more workers cannot help)
    (win(data_wait_share=0.6, cpu_cores_used=1.95, cpu_cores_allowed=2.0), "cpu"),
    (win(data_wait_share=0.6, cpu_cores_used=2.6, cpu_cores_allowed=2.0), "cpu"),      # >1: sampling jitter
    # cpu: not waiting, no GPU figures, CPU saturated (a CPU-only training step)
    (win(cpu_cores_used=7.5, cpu_cores_allowed=8.0), "cpu"),
    # communication
    (win(comm_share=0.5, cpu_cores_used=1.95, cpu_cores_allowed=2.0), "communication"),
    (win(comm_share=0.5, gpu_utilization=0.99), "communication"),
    # gpu
    (win(gpu_utilization=0.95, gpu_memory_used_share=0.2), "gpu"),
    (win(gpu_utilization=0.95, cpu_cores_used=2.0, cpu_cores_allowed=2.0), "gpu"),
    # memory headroom: the GPU is not busy and most of its memory is free (a bigger batch would fit)
    (win(gpu_utilization=0.5, gpu_memory_used_share=0.2), "memory_headroom"),
    # none
    (win(), "none"),
    (win(cpu_cores_used=0.4, cpu_cores_allowed=2.0), "none"),
    (win(gpu_utilization=0.5, gpu_memory_used_share=0.8), "none"),
    (win(gpu_utilization=0.5), "none"),                          # memory share unknown
    (win(gpu_memory_used_share=0.1), "none"),                    # utilization unknown: no GPU rule
])
def test_each_verdict(window: Window, expected: str) -> None:
    assert verdict(window) == expected


# ---- CPU demand (run + run-queue wait) ----

@pytest.mark.parametrize("window, expected", [
    # beside a neighbour that holds the other core: 1 of 2 cores used, 0.9 core-seconds/s queued.
    # Use alone says 50% and `input` (more workers); the job is CPU-starved.
    (win(data_wait_share=0.6, cpu_cores_used=1.0, cpu_cores_demand=1.9, cpu_cores_allowed=2.0), "cpu"),
    (win(cpu_cores_used=1.1, cpu_cores_demand=1.95, cpu_cores_allowed=2.0), "cpu"),
    # its own threads queue behind each other (more runnable threads than cores)
    (win(data_wait_share=0.3, cpu_cores_used=2.0, cpu_cores_demand=5.0, cpu_cores_allowed=2.0), "cpu"),
    # demand known and low: input, as with use
    (win(data_wait_share=0.6, cpu_cores_used=1.0, cpu_cores_demand=1.05, cpu_cores_allowed=2.0), "input"),
    (win(cpu_cores_used=0.4, cpu_cores_demand=0.5, cpu_cores_allowed=2.0), "none"),
    # demand unknown (no schedstat): use stands in
    (win(data_wait_share=0.6, cpu_cores_used=1.95, cpu_cores_demand=None, cpu_cores_allowed=2.0), "cpu"),
    (win(data_wait_share=0.6, cpu_cores_used=1.0, cpu_cores_demand=None, cpu_cores_allowed=2.0), "input"),
    # demand below use (two counters read a moment apart): the larger counts
    (win(data_wait_share=0.6, cpu_cores_used=1.95, cpu_cores_demand=1.7, cpu_cores_allowed=2.0), "cpu"),
    # allowed unknown: no CPU rule, whatever the demand
    (win(data_wait_share=0.6, cpu_cores_used=1.0, cpu_cores_demand=9.0, cpu_cores_allowed=None), "input"),
    # a busy GPU stays the verdict when the loop does not wait
    (win(gpu_utilization=0.95, cpu_cores_used=1.0, cpu_cores_demand=2.0, cpu_cores_allowed=2.0), "gpu"),
])
def test_verdict_from_demand(window: Window, expected: str) -> None:
    assert verdict(window) == expected


def test_use_only_logic_misses_the_starved_job() -> None:
    starved = win(data_wait_share=0.6, cpu_cores_used=1.0, cpu_cores_demand=1.9, cpu_cores_allowed=2.0)
    assert verdict(starved) == "cpu"
    assert verdict(win(data_wait_share=0.6, cpu_cores_used=1.0, cpu_cores_allowed=2.0)) == "input"


@pytest.mark.parametrize("demand, expected", [(2 * b.CPU_SATURATED, "cpu"), (2 * b.CPU_SATURATED - 1e-4, "input")])
def test_cpu_demand_boundary(demand: float, expected: str) -> None:
    assert verdict(win(data_wait_share=0.5, cpu_cores_used=0.5, cpu_cores_demand=demand,
                       cpu_cores_allowed=2.0)) == expected


EPS = 1e-4


@pytest.mark.parametrize("share, expected", [(b.INPUT_WAIT_SHARE, "input"), (b.INPUT_WAIT_SHARE - EPS, "none"),
                                             (1.0, "input"), (0.0, "none")])
def test_input_wait_boundary(share: float, expected: str) -> None:
    assert verdict(win(data_wait_share=share)) == expected


@pytest.mark.parametrize("used, expected", [(2 * b.CPU_SATURATED, "cpu"), (2 * b.CPU_SATURATED - EPS, "input")])
def test_cpu_saturation_boundary_while_waiting(used: float, expected: str) -> None:
    assert verdict(win(data_wait_share=0.5, cpu_cores_used=used, cpu_cores_allowed=2.0)) == expected


@pytest.mark.parametrize("used, expected", [(b.CPU_SATURATED, "cpu"), (b.CPU_SATURATED - EPS, "none")])
def test_cpu_saturation_boundary_without_waiting(used: float, expected: str) -> None:
    assert verdict(win(cpu_cores_used=used, cpu_cores_allowed=1.0)) == expected


@pytest.mark.parametrize("comm, expected", [(b.COMM_SHARE, "communication"), (b.COMM_SHARE - EPS, "none")])
def test_communication_boundary(comm: float, expected: str) -> None:
    assert verdict(win(comm_share=comm)) == expected


@pytest.mark.parametrize("util, mem, expected", [
    (b.GPU_BUSY, 0.9, "gpu"), (b.GPU_BUSY - EPS, 0.9, "none"),
    (0.5, b.GPU_MEMORY_HEADROOM - EPS, "memory_headroom"), (0.5, b.GPU_MEMORY_HEADROOM, "none"),
    (b.GPU_BUSY, 0.1, "gpu"),                          # busy wins over headroom
])
def test_gpu_boundaries(util: float, mem: float, expected: str) -> None:
    assert verdict(win(gpu_utilization=util, gpu_memory_used_share=mem)) == expected


@settings(max_examples=300, deadline=None, database=None)
@given(st.builds(
    Window, seconds=st.floats(0.1, 60), samples_per_second=st.floats(0, 1e6),
    data_wait_share=st.floats(0, 1), step_seconds_mean=st.none() | st.floats(0, 100),
    cpu_cores_used=st.none() | st.floats(0, 256), cpu_cores_allowed=st.none() | st.floats(0, 256),
    gpu_utilization=st.none() | st.floats(0, 1), gpu_memory_used_share=st.none() | st.floats(0, 1),
    comm_share=st.none() | st.floats(0, 1), cpu_cores_demand=st.none() | st.floats(0, 256)))
def test_any_window_gets_one_known_kind(w: Window) -> None:
    v = verdict(w)
    assert v in KINDS
    if w.data_wait_share >= b.INPUT_WAIT_SHARE:
        assert v in ("input", "cpu")          # a waiting loop is always input-side first
    if v == "cpu":
        assert (w.cpu_cores_used is not None or w.cpu_cores_demand is not None) and w.cpu_cores_allowed


def test_demand_travels_from_the_job_sample_to_the_window() -> None:
    from types import SimpleNamespace

    from looptune.tuners import engine, observe
    counters = {"steps": 10, "samples": 160, "step_seconds": 1.0, "data_wait_seconds": 0.5}
    job = SimpleNamespace(gpu={}, cpu_cores=1.0, cpu_cores_demand=1.9, worker_uss_bytes=None, root_rss_bytes=None)
    a = observe.build(1.0, {"counters": counters}, job, allowed=2.0)
    b2 = observe.build(2.0, {"counters": {k: 2 * v for k, v in counters.items()}}, job, allowed=2.0)
    assert b2.cpu_cores_demand == 1.9
    w = engine._window(a, b2)
    assert w is not None and w.cpu_cores_demand == 1.9 and w.cpu_cores_used == 1.0
    assert verdict(w) == "cpu"
