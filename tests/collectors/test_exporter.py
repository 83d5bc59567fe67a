"""The daemon's exporter on a real CollectorRegistry: one bad collector never fails the scrape."""
from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.parser import text_string_to_metric_families

from looptune.collectors.base import Sampler
from looptune.collectors.exporter import DaemonExporter, ReloadState

WAIT = 10.0


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Const:
    """A collector exposing one gauge `looptune_test_<name>` with its snapshot as the value."""

    def __init__(self, name: str, value: float = 1.0) -> None:
        self.name = name
        self.value = value
        self.families_fail = False
        self.gate: threading.Event | None = None
        self.entered = threading.Event()

    def sample(self) -> float:
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(WAIT)
        return self.value

    def families(self, snapshot: float) -> Iterator[Any]:
        yield GaugeMetricFamily(f"looptune_test_{self.name}", "test gauge", value=snapshot)
        if self.families_fail:   # fails halfway: what it yielded before must not be served
            raise ValueError("bad label value")
        yield GaugeMetricFamily(f"looptune_test_{self.name}_second", "test gauge", value=snapshot)

    def close(self) -> None:
        pass


def scrape(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a real exposition, parsed back: (name, labels) -> value."""
    text = generate_latest(registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def value(samples: dict[Any, float], name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


@pytest.fixture
def setup() -> Iterator[tuple[CollectorRegistry, list[Sampler], ReloadState, Clock]]:
    clock = Clock()
    samplers = [Sampler(Const(n, v), interval=60, timeout=5, clock=clock)
                for n, v in (("alpha", 1.0), ("beta", 2.0), ("gamma", 3.0))]
    for s in samplers:
        s.sample_once()
    reload = ReloadState()
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DaemonExporter(lambda: samplers, "1.2.3", reload))
    yield registry, samplers, reload, clock
    for s in samplers:
        gate = s.collector.gate   # type: ignore[attr-defined]
        if gate is not None:
            gate.set()


def test_all_collectors_served(setup: Any) -> None:
    registry, samplers, reload, _ = setup
    got = scrape(registry)
    for name, v in (("alpha", 1.0), ("beta", 2.0), ("gamma", 3.0)):
        assert value(got, f"looptune_test_{name}") == v
        assert value(got, f"looptune_test_{name}_second") == v
        assert value(got, "looptune_collector_up", collector=name) == 1
        assert value(got, "looptune_collector_errors_total", collector=name) == 0
        assert value(got, "looptune_collector_last_success_timestamp_seconds", collector=name) > 0
        assert value(got, "looptune_collector_duration_seconds", collector=name) >= 0
    assert value(got, "looptune_build_info", version="1.2.3") == 1


def test_families_that_raise_mark_the_collector_down_and_the_rest_is_served(setup: Any) -> None:
    registry, samplers, _, _ = setup
    samplers[1].collector.families_fail = True
    for n in (1, 2):
        got = scrape(registry)
        assert value(got, "looptune_collector_up", collector="beta") == 0
        assert value(got, "looptune_collector_errors_total", collector="beta") == n   # once per scrape
        assert value(got, "looptune_test_beta") is None          # nothing half-served
        assert value(got, "looptune_test_beta_second") is None
        for name, v in (("alpha", 1.0), ("gamma", 3.0)):
            assert value(got, f"looptune_test_{name}") == v
            assert value(got, "looptune_collector_up", collector=name) == 1
    samplers[1].collector.families_fail = False
    got = scrape(registry)
    assert value(got, "looptune_collector_up", collector="beta") == 1
    assert value(got, "looptune_test_beta") == 2.0


def test_a_failed_sample_is_down_with_its_errors(setup: Any) -> None:
    registry, samplers, _, _ = setup

    def boom() -> float:
        raise OSError("read failed")
    samplers[0].collector.sample = boom
    samplers[0].sample_once()
    got = scrape(registry)
    assert value(got, "looptune_collector_up", collector="alpha") == 0
    assert value(got, "looptune_collector_errors_total", collector="alpha") == 1
    assert value(got, "looptune_test_alpha") is None    # a down collector's last snapshot is not served
    assert value(got, "looptune_test_beta") == 2.0


def test_a_hung_collector_is_omitted_and_down(setup: Any) -> None:
    registry, samplers, _, clock = setup
    c = samplers[2].collector
    c.gate = threading.Event()
    c.value = 30.0
    c.entered.clear()
    t = threading.Thread(target=samplers[2].sample_once, daemon=True)
    t.start()
    assert c.entered.wait(WAIT)
    clock.now += 6
    for _ in range(2):
        got = scrape(registry)
        assert value(got, "looptune_collector_up", collector="gamma") == 0
        assert value(got, "looptune_collector_errors_total", collector="gamma") == 1   # one episode
        assert value(got, "looptune_test_gamma") is None
        assert value(got, "looptune_test_alpha") == 1.0 and value(got, "looptune_test_beta") == 2.0
    c.gate.set()
    t.join(WAIT)
    got = scrape(registry)
    assert value(got, "looptune_collector_up", collector="gamma") == 1
    assert value(got, "looptune_test_gamma") == 30.0


def test_collector_never_sampled_is_down(setup: Any) -> None:
    registry, samplers, _, _ = setup
    samplers.append(Sampler(Const("delta"), interval=60, timeout=5))
    got = scrape(registry)
    assert value(got, "looptune_collector_up", collector="delta") == 0
    assert value(got, "looptune_collector_last_success_timestamp_seconds", collector="delta") == 0
    assert value(got, "looptune_test_delta") is None


def test_reload_state_is_exposed(setup: Any) -> None:
    registry, _, reload, _ = setup
    got = scrape(registry)
    assert value(got, "looptune_config_last_reload_successful") == 1
    assert value(got, "looptune_config_reloads_total") == 0
    reload.successful = False
    reload.reloads = 3
    reload.failures = 1
    reload.last_success_time = 1_700_000_000.0
    got = scrape(registry)
    assert value(got, "looptune_config_last_reload_successful") == 0
    assert value(got, "looptune_config_reloads_total") == 3
    assert value(got, "looptune_config_reload_failures_total") == 1
    assert value(got, "looptune_config_last_reload_success_timestamp_seconds") == 1_700_000_000.0
    assert value(got, "looptune_build_info", version="1.2.3") == 1


def test_extra_metrics_that_raise_do_not_fail_the_scrape() -> None:
    def extra() -> Iterator[Any]:
        yield GaugeMetricFamily("looptune_test_extra", "half of the extra metrics", value=1)
        raise RuntimeError("registry gone")

    s = Sampler(Const("alpha"), interval=60, timeout=5)
    s.sample_once()
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DaemonExporter(lambda: [s], "1.2.3", ReloadState(), extra=extra))
    got = scrape(registry)
    assert value(got, "looptune_test_alpha") == 1.0
    assert value(got, "looptune_build_info", version="1.2.3") == 1
    assert value(got, "looptune_test_extra") is None
