"""One declaration per reported figure (looptune/schema.py) drives the hook's report, the
protocol check, the engine's windows and the exporter: each end is checked against it here."""
from __future__ import annotations

import math
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from looptune import protocol, schema
from looptune.collectors.hookjobs import HookView, hook_families
from looptune.tuners.engine import Observation, _window
from looptune.tuners.hook.meter import Meter

NB = len(protocol.STEP_BUCKETS) + 1


def report(**counters: Any) -> dict[str, Any]:
    c = {"samples": 64, "batches": 2, "steps": 2, "data_wait_seconds": 0.5, "step_seconds": 1.25, **counters}
    return {"v": 1, "type": "report", "world_size": 1, "counters": c, "step_hist": [0] * NB, "knobs": {}}


def test_every_declared_figure_has_a_source_in_the_meter() -> None:
    m = Meter(on_error=lambda exc: None)
    m.comm_seconds, m.comm_wire_seconds, m.comm_bytes = 0.25, 0.125, 4096
    m.oom_recoveries, m.device_peak_bytes, m.gradient_noise_scale = 1, 2**30, 512.0
    m.step(loss=1.5)
    assert set(m.figures()) == set(schema.BY_NAME)
    assert m.figures()["oom_recoveries"] == 1 and m.figures()["gradient_noise_scale"] == 512.0
    assert m.figures()["loss"] == 1.5 and m.figures()["comm_seconds"] == 0.25


def test_optional_figures_are_left_out_when_the_job_has_none() -> None:
    m = Meter(on_error=lambda exc: None)
    m.step()
    assert set(m.figures()) == set(schema.REQUIRED)


def test_the_loss_is_read_at_report_time_and_a_nan_is_counted_not_sent() -> None:
    torch = pytest.importorskip("torch")
    m = Meter(on_error=lambda exc: None)
    m.step(loss=torch.tensor(0.75))
    assert m.figures()["loss"] == 0.75
    m.step(loss=torch.tensor(float("nan")))
    f = m.figures()
    assert "loss" not in f and f["loss_nonfinite"] == 1
    m.step(loss=float("inf"))
    assert m.figures()["loss_nonfinite"] == 2
    errors: list[BaseException] = []
    m = Meter(on_error=errors.append)
    m.step(loss=torch.ones(3))                # not a scalar: counted once, training goes on
    assert "loss" not in m.figures() and len(errors) == 1
    assert "loss" not in m.figures() and len(errors) == 1


def test_the_protocol_checks_each_figure_as_declared() -> None:
    out = protocol.check_report(report(comm_seconds=0.1, loss=-2.5, loss_nonfinite=0))
    assert out["counters"]["comm_seconds"] == 0.1 and out["counters"]["loss"] == -2.5
    out = protocol.check_report(report(loss=None, unknown_figure=3))
    assert "loss" not in out["counters"] and "unknown_figure" not in out["counters"]
    for bad in ({"comm_seconds": -1}, {"comm_seconds": "1"}, {"loss": math.inf}, {"loss": "low"},
                {"loss_nonfinite": 0.5}, {"loss": 1e300}, {"steps": None}):
        with pytest.raises(protocol.ProtocolError) as info:
            protocol.check_report(report(**bad))
        assert info.value.reason == "invalid"
    bad = report()
    del bad["counters"]["samples"]
    with pytest.raises(protocol.ProtocolError):
        protocol.check_report(bad)


def test_settling_knobs_are_checked() -> None:
    assert protocol.check_report(dict(report(), settling=["num_workers"]))["settling"] == ["num_workers"]
    for bad in (["Bad Knob"], "num_workers", [1], ["k"] * 40):
        with pytest.raises(protocol.ProtocolError):
            protocol.check_report(dict(report(), settling=bad))


def test_the_engine_window_has_the_communication_share_and_the_loss() -> None:
    a = Observation(time=0.0, counters={"samples": 0, "batches": 0, "steps": 0, "data_wait_seconds": 0.0,
                                        "step_seconds": 0.0, "comm_seconds": 0.0}, knobs={})
    b = Observation(time=2.0, counters={"samples": 64, "batches": 4, "steps": 4, "data_wait_seconds": 0.2,
                                        "step_seconds": 2.0, "comm_seconds": 0.8, "loss": 1.25}, knobs={})
    w = _window(a, b)
    assert w is not None and w.comm_share == pytest.approx(0.4) and w.loss == 1.25
    c = Observation(time=2.0, counters={k: v for k, v in b.counters.items() if k != "comm_seconds"}, knobs={})
    assert _window(a, c).comm_share is None
    # where the ranks agreed on the wire's part, that is the share (the rest waited on a slower rank)
    wa = Observation(time=0.0, counters={**a.counters, "comm_wire_seconds": 0.0}, knobs={})
    wb = Observation(time=2.0, counters={**b.counters, "comm_wire_seconds": 0.1}, knobs={})
    assert _window(wa, wb).comm_share == pytest.approx(0.05)


def test_the_exporter_exports_every_declared_metric() -> None:
    registry = CollectorRegistry(auto_describe=False)
    full = HookView("r", "0", 1, 1, counters=report(comm_seconds=0.5, comm_wire_seconds=0.25, comm_bytes=8192, loss=0.25, loss_nonfinite=1, oom_recoveries=2,
                                                  device_memory_peak_bytes=2**30,
                                                  gradient_noise_scale=300.0)["counters"],
                    step_hist=[0] * NB)
    bare = HookView("s", "0", 1, 2, counters=report()["counters"], step_hist=[0] * NB)

    class C:
        def collect(self) -> Any:
            return hook_families([full, bare])
    registry.register(C())
    for f in schema.FIGURES:
        if f.metric is None:
            continue
        name = f.metric + ("_total" if f.kind == schema.COUNTER else "")
        assert registry.get_sample_value(name, {"run": "r", "rank": "0"}) == full.counters[f.name], name
        if f.optional:
            assert registry.get_sample_value(name, {"run": "s", "rank": "0"}) is None, name
    assert registry.get_sample_value("looptune_job_comm_wait_seconds_total", {"run": "r", "rank": "0"}) == 0.5


def test_the_wire_wait_between_rank_syncs_counts_at_the_last_syncs_share_and_never_falls() -> None:
    m = Meter(on_error=lambda exc: None)
    m.comm_seconds = 2.0
    m.comm_wire_seconds, m.wire_ratio, m.wire_mark = 0.5, 0.25, 2.0       # a sync: 0.5 s of 2 s was the wire
    assert m.figures()["comm_wire_seconds"] == pytest.approx(0.5)
    m.comm_seconds = 4.0                                                 # 2 s more waited since, no sync yet
    assert m.figures()["comm_wire_seconds"] == pytest.approx(1.0)       # counted at the last sync's share
    m.comm_wire_seconds, m.wire_ratio, m.wire_mark = 0.6, 0.05, 4.0      # the next sync found less
    assert m.figures()["comm_wire_seconds"] == pytest.approx(1.0)       # a counter: held, not lowered
    m.comm_seconds = 24.0
    assert m.figures()["comm_wire_seconds"] == pytest.approx(0.6 + 0.05 * 20.0)
