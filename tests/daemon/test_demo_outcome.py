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


def test_the_decisions_table_joins_each_trial_with_its_result() -> None:
    """A kept trial is settled by a confirmation decision: it must not take the next trial's result."""
    from looptune.daemon.demo import _decisions_table
    from looptune.tuners.hook import Decision

    def dec(new: int, reason: str, trial: bool, at: float) -> Decision:
        return Decision("num_workers", 0, new, reason, "applied", at, trial=trial)
    decisions = [dec(1, "climb", True, 3), dec(1, "kept: +12.0% samples/s", False, 8),
                 dec(2, "climb", True, 9), dec(1, "roll back: -5% samples/s is below the 3% bar", False, 15),
                 dec(4, "climb", True, 20)]
    history = [{"outcome": "kept", "gain": 0.12}, {"outcome": "rolled_back", "gain": -0.05}]
    rows = _decisions_table(decisions, history, 0.0).splitlines()[3:]
    results = [r.split(" | ")[5] for r in rows]
    assert results == ["kept (+12%)", "", "rolled_back (-5%)", "", "in trial when the demo ended"]
