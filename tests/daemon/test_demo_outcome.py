"""The demo's last line says plainly whether tuning helped (daemon.demo.outcome_line; no torch)."""
from __future__ import annotations

import pytest

from looptune.daemon.demo import NOISE, outcome_line


@pytest.mark.parametrize(("start", "end"), [(400.0, 400.0), (400.0, 380.0), (400.0, 120.0)])
def test_no_faster_did_not_help(start: float, end: float) -> None:
    line = outcome_line(start, end)
    assert line.startswith("result: tuning did not help: the run ended no faster"), line
    assert "helped" not in line.replace("did not help", "")


@pytest.mark.parametrize("ratio", [1.001, 1.05, 1.0 + NOISE])
def test_within_noise_did_not_help(ratio: float) -> None:
    line = outcome_line(400.0, 400.0 * ratio)
    assert line.startswith("result: tuning did not help: the end is within noise"), line


@pytest.mark.parametrize("ratio", [1.0 + NOISE + 0.01, 1.5, 6.0])
def test_beyond_noise_helped(ratio: float) -> None:
    line = outcome_line(400.0, 400.0 * ratio)
    assert line.startswith("result: tuning helped:"), line
    assert f"{ratio:.1f}x faster" in line and "400 -> " in line, line


def test_noise_threshold_is_a_parameter() -> None:
    assert outcome_line(100.0, 130.0, noise=0.5).startswith("result: tuning did not help")
    assert outcome_line(100.0, 130.0, noise=0.2).startswith("result: tuning helped")


@pytest.mark.parametrize(("start", "end"), [(None, 400.0), (400.0, None), (0.0, 400.0), (400.0, 0.0)])
def test_unmeasured(start: float | None, end: float | None) -> None:
    assert outcome_line(start, end).startswith("result: not measured")
