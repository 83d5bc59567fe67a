"""The recording and alert rules, the dashboards and the report against looptune/verdicts.py,
the one definition of the verdict kinds and thresholds: a threshold or a kind that drifts in
one of them fails here."""
from __future__ import annotations

import json
import re

from dashboard_queries import GRAFANA, dashboard_queries, load_dashboards, load_rules

from looptune import verdicts

DATA_WAIT = re.compile(r"(looptune_job_data_wait[\w:]*)(?:\{[^}]*\})?\)?\s*(>=|>|<=|<)\s*([0-9.]+)")
KIND = re.compile(r"looptune_job_bottleneck\{([^}]*)\}")


def kinds_in(selector: str) -> list[str]:
    return re.findall(r'kind\s*=~?\s*"([^"]*)"', selector)


def test_the_input_alert_uses_the_alert_threshold() -> None:
    rule = next(r for r in load_rules() if r.name == "LooptuneJobInputBound")
    found = DATA_WAIT.findall(rule.expr)
    assert found, rule.expr
    for _, op, value in found:
        assert op in (">", ">=") and float(value) == verdicts.ALERT_INPUT_WAIT_SHARE, rule.expr


def test_every_data_wait_threshold_in_the_rules_is_a_verdict_threshold() -> None:
    known = {verdicts.INPUT_WAIT_SHARE, verdicts.ALERT_INPUT_WAIT_SHARE}
    for rule in load_rules():
        for metric, _, value in DATA_WAIT.findall(rule.expr):
            assert float(value) in known, f"{rule.name}: {metric} against {value}, not in looptune/verdicts.py"


def test_verdict_kinds_named_in_rules_and_dashboards_exist() -> None:
    exprs = [r.expr for r in load_rules()]
    for d in load_dashboards().values():
        exprs += [q.expr for q in dashboard_queries(d)]
    for expr in exprs:
        for selector in KIND.findall(expr):
            for kind in kinds_in(selector):
                for k in kind.split("|"):
                    assert k in verdicts.KINDS, f"verdict kind {k!r} in {expr!r} is not in looptune/verdicts.py"


def test_the_job_dashboard_colors_the_data_wait_by_the_verdict_thresholds() -> None:
    job = json.loads((GRAFANA / "looptune-job.json").read_text(encoding="utf-8"))
    panel = next(p for p in job["panels"] if p["title"] == "Data-wait share now")
    steps = [s["value"] for s in panel["fieldConfig"]["defaults"]["thresholds"]["steps"]]
    assert steps == [None, verdicts.INPUT_WAIT_SHARE, verdicts.ALERT_INPUT_WAIT_SHARE]
    assert f"{verdicts.INPUT_WAIT_SHARE:.0%}" in panel["description"]


def test_the_engine_the_exporter_and_the_report_share_the_kinds() -> None:
    from looptune import report
    from looptune.collectors.hookjobs import BOTTLENECK_KINDS
    from looptune.tuners.bottleneck import KINDS
    assert KINDS == BOTTLENECK_KINDS == tuple(report.VERDICT_COLORS) == verdicts.KINDS


def test_every_threshold_is_a_share() -> None:
    for name, value in verdicts.THRESHOLDS.items():
        assert getattr(verdicts, name) == value and 0 < value < 1, name
