"""The Prometheus rules in dashboards/rules/: `promtool check rules`, `promtool test rules`, and
that the unit tests cover every alert both firing and not firing."""
from __future__ import annotations

import re
import subprocess

import pytest
import yaml

from conftest import require_binary
from dashboard_queries import DASHBOARDS, RULE_FILES, RULE_TESTS, TUNER_METRICS, exported_names, load_rules, \
    metric_names

RULES = load_rules()
ALERTS = [r for r in RULES if r.kind == "alert"]
# what the issue asks to alert on
EXPECTED_ALERTS = {"LooptuneJobInputBound", "LooptuneGPUIdleWhileHeld", "LooptuneGPUThrottled",
                   "LooptuneGPUMemoryNearFull", "LooptuneCollectorDown", "LooptuneDaemonDown",
                   "LooptuneConfigReloadFailed", "LooptuneHookDisabled"}


def _seconds(duration: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    return sum(int(n) * units[u] for n, u in re.findall(r"(\d+)([smhd])", duration))


def test_promtool_check_rules() -> None:
    promtool = require_binary("promtool")
    r = subprocess.run([promtool, "check", "rules", *map(str, RULE_FILES)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("SUCCESS") == len(RULE_FILES), r.stdout


def test_promtool_test_rules() -> None:
    promtool = require_binary("promtool")
    assert RULE_TESTS
    r = subprocess.run([promtool, "test", "rules", *map(str, RULE_TESTS)], capture_output=True, text=True,
                       timeout=120, cwd=RULE_TESTS[0].parent)
    assert r.returncode == 0, r.stdout + r.stderr


def test_shipped_scrape_config_with_rules_is_valid() -> None:
    promtool = require_binary("promtool")
    r = subprocess.run([promtool, "check", "config", str(DASHBOARDS / "prometheus.yml")], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"SUCCESS: {len(RULE_FILES)} rule files found" in r.stdout, r.stdout


def test_every_alert_has_for_severity_and_runbook() -> None:
    assert {a.name for a in ALERTS} == EXPECTED_ALERTS
    for a in ALERTS:
        assert _seconds(a.spec.get("for", "0s")) >= 60, f"{a.name}: a blip must not page; give it a for:"
        assert a.spec["labels"]["severity"] in ("info", "warning", "critical"), a.name
        ann = a.spec["annotations"]
        assert {"summary", "description", "runbook"} <= set(ann), a.name
        assert len(ann["runbook"]) > 150, f"{a.name}: the runbook says what to do, not just what happened"


def test_rule_names_and_metrics() -> None:
    records = [r.name for r in RULES if r.kind == "record"]
    assert len(records) == len(set(records))
    for name in records:
        assert re.fullmatch(r"[a-z_]+:looptune_[a-z_]+:[a-z0-9_]+", name), f"{name}: level:metric:operations"
    known = exported_names() | set(records) | TUNER_METRICS
    for r in RULES:
        unknown = metric_names(r.expr) - known
        assert not unknown, f"{r.name}: unknown metrics {unknown}"


def test_unit_tests_cover_every_alert_firing_and_not_firing() -> None:
    fires: set[str] = set()
    quiet: set[str] = set()
    records_tested: set[str] = set()
    for path in RULE_TESTS:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
        assert sorted((path.parent / f).resolve() for f in spec["rule_files"]) == sorted(RULE_FILES)
        for t in spec["tests"]:
            for case in t.get("alert_rule_test", []):
                (fires if case["exp_alerts"] else quiet).add(case["alertname"])
                for alert in case["exp_alerts"]:
                    assert "exp_annotations" in alert, "promtool compares the annotations too"
            for case in t.get("promql_expr_test", []):
                records_tested |= metric_names(case["expr"])
    assert fires == EXPECTED_ALERTS, f"alerts never tested firing: {EXPECTED_ALERTS - fires}"
    assert quiet == EXPECTED_ALERTS, f"alerts never tested quiet: {EXPECTED_ALERTS - quiet}"
    records = {r.name for r in RULES if r.kind == "record"}
    assert records <= records_tested, f"recording rules without a unit test: {records - records_tested}"


@pytest.mark.parametrize("alert", sorted(EXPECTED_ALERTS))
def test_not_firing_cases_hold_series_that_almost_fire(alert: str) -> None:
    """A quiet case with no input at all proves nothing: each alert's test group feeds series
    of more than one kind (the firing one, and near misses beside it)."""
    for path in RULE_TESTS:
        for t in yaml.safe_load(path.read_text(encoding="utf-8"))["tests"]:
            names = [c["alertname"] for c in t.get("alert_rule_test", [])]
            if alert in names:
                assert len(t["input_series"]) >= 2, alert
                return
    pytest.fail(f"no test group for {alert}")
