"""The Grafana dashboards against the dashboard schema's required fields and our conventions.

Grafana cannot be installed on the test machines, so this checks what Grafana's file
provisioning needs (the classic dashboard JSON model: uid, title, schemaVersion, panels with
id/type/gridPos/datasource/targets, templating, annotations), plus what makes the dashboards
portable: a `datasource` variable instead of `__inputs`, rates over `$__rate_interval`,
only metric names the daemon exports, and JSON that matches dashboards/build.py.
"""
from __future__ import annotations

import importlib.util
import json
import re
from typing import Any

import pytest
import yaml

from dashboard_queries import (DASHBOARDS, DS_REF, GRAFANA, TUNER_METRICS, UIDS, all_panels,
                               dashboard_queries, exported_names, load_dashboards, load_rules,
                               metric_names, variable_query, variables)

DASHBOARD_LIST = load_dashboards()
# core panel plugins of Grafana 10/11
PANEL_TYPES = {"row", "timeseries", "stat", "gauge", "bargauge", "table", "state-timeline",
               "status-history", "barchart", "piechart", "text", "heatmap", "histogram"}
VARIABLE_TYPES = {"query", "adhoc", "constant", "datasource", "interval", "textbox", "custom", "system"}
GRAFANA_RANGES = {"$__rate_interval", "$__range", "$__interval"}


def _build_module() -> Any:
    spec = importlib.util.spec_from_file_location("looptune_dashboards_build", DASHBOARDS / "build.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_three_dashboards_with_stable_uids() -> None:
    assert set(DASHBOARD_LIST) == UIDS
    assert sorted(p.name for p in GRAFANA.glob("*.json")) == \
        ["looptune-fleet.json", "looptune-job.json", "looptune-node.json"]
    for uid, d in DASHBOARD_LIST.items():
        assert (GRAFANA / f"{uid}.json").exists(), uid


def test_json_matches_build_script() -> None:
    build = _build_module()
    for name, make in build.DASHBOARDS.items():
        assert (GRAFANA / name).read_text(encoding="utf-8") == build.render(make), \
            f"{name} is out of date: run python dashboards/build.py"


@pytest.mark.parametrize("uid", sorted(UIDS))
def test_dashboard_top_level_fields(uid: str) -> None:
    d = DASHBOARD_LIST[uid]
    assert re.fullmatch(r"[A-Za-z0-9_-]{1,40}", d["uid"])
    assert isinstance(d["title"], str) and d["title"].startswith("looptune / ")
    assert isinstance(d["schemaVersion"], int) and d["schemaVersion"] >= 36
    assert d.get("id") is None, "a provisioned dashboard must not carry a database id"
    assert d["editable"] in (True, False)
    assert d["graphTooltip"] in (0, 1, 2)
    assert isinstance(d["tags"], list) and "looptune" in d["tags"]
    assert set(d["time"]) == {"from", "to"} and all(isinstance(v, str) for v in d["time"].values())
    assert isinstance(d["templating"]["list"], list)
    assert isinstance(d["annotations"]["list"], list)
    assert isinstance(d["panels"], list) and d["panels"]
    text = json.dumps(d)
    assert "__inputs" not in d and "${DS_" not in text, "use the datasource variable, not __inputs"


@pytest.mark.parametrize("uid", sorted(UIDS))
def test_datasource_variable_and_query_variables(uid: str) -> None:
    vs = variables(DASHBOARD_LIST[uid])
    names = [v["name"] for v in vs]
    assert len(names) == len(set(names)), names
    ds = vs[0]
    assert ds["name"] == "datasource" and ds["type"] == "datasource" and ds["query"] == "prometheus"
    for v in vs:
        assert v["type"] in VARIABLE_TYPES, v
        assert v["hide"] in (0, 1, 2)
        if v["type"] == "query":
            assert v["datasource"] == DS_REF, v["name"]
            q = variable_query(v)
            assert q.startswith("label_values("), q
            assert v.get("definition") == q
            if v.get("includeAll"):
                assert v.get("allValue"), f"{v['name']}: All must expand to a regex, not a list of values"
    # every variable a query uses is defined (or one of Grafana's own)
    defined = set(names) | {"__rate_interval", "__range", "__range_s", "__interval", "__interval_ms"}
    for q in dashboard_queries(DASHBOARD_LIST[uid]):
        for used in re.findall(r"\$\{?(\w+)", q.expr):
            assert used in defined, f"{q.key}: ${used} is not a variable"


@pytest.mark.parametrize("uid", sorted(UIDS))
def test_panels_have_the_required_fields(uid: str) -> None:
    panels = list(all_panels(DASHBOARD_LIST[uid]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)) and all(isinstance(i, int) and i > 0 for i in ids)
    titles = [p["title"] for p in panels if p["type"] != "row"]
    assert len(titles) == len(set(titles)), "panel titles are how the tests and the report find panels"
    for p in panels:
        assert p["type"] in PANEL_TYPES, p["type"]
        g = p["gridPos"]
        assert set(g) >= {"h", "w", "x", "y"}
        assert g["h"] > 0 and 1 <= g["w"] <= 24 and 0 <= g["x"] < 24 and g["y"] >= 0
        assert g["x"] + g["w"] <= 24, p["title"]
        if p["type"] == "row":
            assert isinstance(p.get("panels", []), list) and g["w"] == 24 and g["h"] == 1
            continue
        assert p["title"] and p.get("description"), f"panel {p['id']} needs a title and a description"
        assert p["datasource"] == DS_REF, p["title"]
        assert set(p["fieldConfig"]) == {"defaults", "overrides"} and isinstance(p["options"], dict)
        targets = p["targets"]
        assert targets, p["title"]
        refs = [t["refId"] for t in targets]
        assert len(refs) == len(set(refs)), p["title"]
        for t in targets:
            assert t["datasource"] == DS_REF and t["expr"].strip(), (p["title"], t)
            assert isinstance(t.get("legendFormat", ""), str)
        if p["type"] == "table":
            assert all(t.get("format") == "table" and t.get("instant") for t in targets), p["title"]


@pytest.mark.parametrize("uid", sorted(UIDS))
def test_panels_do_not_overlap(uid: str) -> None:
    cells: dict[tuple[int, int], str] = {}
    for p in DASHBOARD_LIST[uid]["panels"]:
        g = p["gridPos"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = p["title"]


@pytest.mark.parametrize("uid", sorted(UIDS))
def test_annotations(uid: str) -> None:
    for a in DASHBOARD_LIST[uid]["annotations"]["list"]:
        assert {"name", "datasource", "enable", "iconColor"} <= set(a), a
        if not a.get("builtIn"):
            assert a["datasource"] == DS_REF and a["expr"] and a["titleFormat"]


@pytest.mark.parametrize("uid", sorted(UIDS))
def test_queries_use_grafana_windows_and_known_metrics(uid: str) -> None:
    """Rates over $__rate_interval (whole-range figures over $__range), never a fixed window;
    and every metric name is one the daemon exports, a recording rule, or a tuner metric."""
    known = exported_names() | {r.name for r in load_rules() if r.kind == "record"} | TUNER_METRICS
    for q in dashboard_queries(DASHBOARD_LIST[uid]):
        for window in re.findall(r"\[([^\]]*)\]", q.expr):
            assert window in GRAFANA_RANGES, f"{q.key}: fixed window [{window}] in {q.expr}"
        for fn in re.findall(r"\b(rate|irate|increase)\(", q.expr):
            assert "[" in q.expr, q.key
        unknown = metric_names(q.expr) - known
        assert not unknown, f"{q.key}: unknown metrics {unknown}"
        assert metric_names(q.expr), f"{q.key}: reads no looptune metric"


def test_queries_never_assume_one_node() -> None:
    """A bare aggregation without `by` folds every node into one number; allowed only for the
    whole-fleet or whole-run figures listed here."""
    whole = {
        ("looptune-job", "Samples/s now", "A"), ("looptune-job", "Samples/s", "B"),
        ("looptune-job", "Data-wait share now", "A"),
        ("looptune-job", "Ranks / nodes", "A"), ("looptune-job", "Ranks / nodes", "B"),
        ("looptune-job", "Hooks", "A"), ("looptune-job", "Hooks", "B"),
        ("looptune-node", "GPUs", "A"), ("looptune-node", "CPUs", "A"), ("looptune-node", "Memory", "A"),
        ("looptune-node", "Training jobs", "A"), ("looptune-node", "Collectors down", "A"),
        ("looptune-node", "Config reloads", "A"), ("looptune-node", "Config reloads", "B"),
        ("looptune-node", "Config reloads", "C"),
        ("looptune-fleet", "Runs now", "A"), ("looptune-fleet", "Ranks", "A"), ("looptune-fleet", "Nodes", "A"),
        ("looptune-fleet", "GPUs held by jobs", "A"), ("looptune-fleet", "Samples/s", "A"),
    }
    seen = set()
    for d in DASHBOARD_LIST.values():
        for q in dashboard_queries(d):
            if re.match(r"\s*(sum|avg|count|min|max)\s*\(", q.expr):
                seen.add(q.key)
                assert q.key in whole, f"{q.key}: {q.expr} aggregates every node into one figure"
    assert seen == whole


def test_provisioning_files() -> None:
    ds = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "looptune.yml").read_text())
    assert ds["apiVersion"] == 1
    (source,) = ds["datasources"]
    assert source["type"] == "prometheus" and source["access"] == "proxy" and source["url"].startswith("http")
    prom = yaml.safe_load((DASHBOARDS / "prometheus.yml").read_text())
    assert source["jsonData"]["timeInterval"] == prom["global"]["scrape_interval"], \
        "Grafana's $__rate_interval needs the scrape interval"
    prov = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "looptune.yml").read_text())
    assert prov["apiVersion"] == 1
    (provider,) = prov["providers"]
    assert provider["type"] == "file" and provider["options"]["path"].startswith("/")
    example = json.loads((DASHBOARDS / "looptune-targets.example.json").read_text())
    assert example and all(isinstance(t["targets"], list) for t in example)


def test_scrape_config_loads_the_rules() -> None:
    prom = yaml.safe_load((DASHBOARDS / "prometheus.yml").read_text())
    patterns = prom["rule_files"]
    matched = sorted({p.name for pat in patterns for p in DASHBOARDS.glob(pat)})
    assert matched == ["looptune-alerts.yml", "looptune-recording.yml"]
