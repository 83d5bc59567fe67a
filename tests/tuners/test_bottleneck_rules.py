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
    comm_share=st.none() | st.floats(0, 1)))
def test_any_window_gets_one_known_kind(w: Window) -> None:
    v = verdict(w)
    assert v in KINDS
    if w.data_wait_share >= b.INPUT_WAIT_SHARE:
        assert v in ("input", "cpu")          # a waiting loop is always input-side first
    if v == "cpu":
        assert w.cpu_cores_used is not None and w.cpu_cores_allowed
