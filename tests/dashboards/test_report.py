"""`looptune report` (looptune/report.py) without a real Prometheus: its queries against the
Training job dashboard, the decision table and summary from synthetic series, the errors a
user meets, and a whole page rendered from a stub of Prometheus' HTTP API. The same report
against live data is in test_dashboards_live.py."""
from __future__ import annotations

import json
import os
import sys
import threading
import urllib.parse
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from looptune import report, verdicts
from looptune.report import KnobChange, ReportError, Series
from dashboard_queries import load_dashboards

T0 = 1_800_000_000.0


def series(labels: dict[str, str], values: list[float], start: float = T0, step: float = 1.0) -> Series:
    return Series(labels, [start + i * step for i in range(len(values))], values)


def _matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        if os.environ.get("LOOPTUNE_REQUIRE_SERVERS") == "1":
            pytest.fail("matplotlib is not installed (pip install '.[report]')")
        pytest.skip("matplotlib is not installed (pip install '.[report]')")


# ---- the same panels as the dashboard -------------------------------------------------------

def test_report_panels_are_the_dashboard_panels() -> None:
    job = load_dashboards()["looptune-job"]
    panels = {p["title"]: p for p in job["panels"] if p["type"] != "row"}
    for spec in report.PANELS:
        assert spec.title in panels, spec.title
        dash = [(t["expr"], t["legendFormat"]) for t in panels[spec.title]["targets"]]
        assert list(spec.queries) == dash, spec.title


def test_expand_substitutes_like_grafana() -> None:
    expr = report.PANELS[0].queries[0][0]
    out = report.expand(expr, "exp-1", "20s")
    assert "$" not in out and 'run="exp-1"' in out and 'rank=~".*"' in out and "[20s]" in out


# ---- durations, URLs -----------------------------------------------------------------------

@pytest.mark.parametrize("text, seconds", [("90s", 90), ("30m", 1800), ("1h", 3600), ("1h30m", 5400),
                                           ("2d", 172800), ("1w", 604800), ("500ms", 0.5)])
def test_parse_duration(text: str, seconds: float) -> None:
    assert report.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "1", "h", "1 h", "-1h", "1h-", "0s", "1.5h"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ReportError, match="--since"):
        report.parse_duration(text)


def test_prometheus_url_forms() -> None:
    p = report.Prometheus("prom.example:9090/")
    assert p.base == "http://prom.example:9090"
    p = report.Prometheus("https://alice:s%40cret@prom.example/prometheus/")
    assert p.base == "https://prom.example/prometheus" and "alice" not in p.display
    import base64
    assert p.headers["Authorization"] == "Basic " + base64.b64encode(b"alice:s@cret").decode()
    with pytest.raises(ReportError, match="not an http"):
        report.Prometheus("ftp://prom.example")


def test_unreachable_prometheus_is_a_clear_error() -> None:
    from conftest import free_port
    p = report.Prometheus(f"http://127.0.0.1:{free_port()}", timeout=2)
    with pytest.raises(ReportError, match="cannot reach Prometheus"):
        p.get("/api/v1/query", query="1")


# ---- knob changes, trials and decisions ------------------------------------------------------

def _workers(values: list[float], rank: str = "0") -> Series:
    return series({"knob": "num_workers", "rank": rank, "run": "r"}, values)


def test_knob_changes_join_ranks() -> None:
    a = _workers([0, 0, 2, 2, 4, 4])
    b = _workers([0, 0, 2, 2, 4, 4], rank="1")
    changes = report.knob_changes([a, b], 1.0)
    assert [(c.time - T0, c.old, c.new, c.ranks) for c in changes] == [(2, "0", "2", ["0", "1"]),
                                                                        (4, "2", "4", ["0", "1"])]


def test_text_knob_changes() -> None:
    none = series({"knob": "grad_compression", "value": "none", "rank": "0"}, [1, 1, 1])
    fp16 = series({"knob": "grad_compression", "value": "fp16", "rank": "0"}, [1, 1], start=T0 + 3)
    (c,) = report.text_knob_changes([none, fp16], 1.0)
    assert (c.time - T0, c.old, c.new) == (3, "none", "fp16")


def test_decisions_pair_with_trials() -> None:
    """0->1 rolled back, 0->2 kept, 2->4 rolled back, 2->3 still running; each decision is
    counted a few seconds after its trial began, the rolled-back ones as the knob goes back."""
    knob = _workers([0] * 5 + [1] * 5 + [0] * 5 + [2] * 7 + [4] * 5 + [2] * 5 + [3] * 3)
    changes = report.knob_changes([knob], 1.0)
    lab = {"tuner": "workers", "knob": "num_workers"}
    rolled = series({**lab, "outcome": "rolled_back"}, [1] * 26 + [2] * 9, start=T0 + 10)
    kept = series({**lab, "outcome": "kept"}, [1] * 20, start=T0 + 20)
    rows = report.decision_rows([rolled, kept], changes, T0, 1.0, 4.0)
    assert [(r.time - T0, r.change, r.tuner, r.outcome) for r in rows] == [
        (5, "0 → 1", "workers", "rolled_back"),
        (15, "0 → 2", "workers", "kept"),
        (22, "2 → 4", "workers", "rolled_back"),
        (32, "2 → 3", "", ""),
    ]


def test_decision_counters_already_there_are_the_baseline() -> None:
    old = series({"tuner": "workers", "knob": "num_workers", "outcome": "kept"}, [5, 5, 5, 6, 6])
    events = report.decision_events([old], T0, 1.0)
    assert [(t - T0, n) for t, _, _, _, n in events] == [(3, 1)]
    reset = series({"tuner": "workers", "knob": "num_workers", "outcome": "kept"}, [5, 5, 1, 1])
    assert [(t - T0, n) for t, _, _, _, n in report.decision_events([reset], T0, 1.0)] == [(2, 1)]


def test_a_failed_decision_without_a_change_gets_its_own_row() -> None:
    failed = series({"tuner": "workers", "knob": "num_workers", "outcome": "failed"}, [1, 1], start=T0 + 10)
    (row,) = report.decision_rows([failed], [], T0, 1.0, 4.0)
    assert (row.change, row.outcome, row.tuner) == ("", "failed", "workers")


# ---- the summary ------------------------------------------------------------------------------

def _report(panels: dict[str, list[tuple[str, Series]]], decisions: list[report.DecisionRow],
            end: float) -> report.Report:
    data = [report.PanelData(spec, panels.get(spec.title, [])) for spec in report.PANELS]
    return report.Report(run="r", prometheus="http://p", start=T0, end=end, step=1.0, rate_window="4s",
                         ranks=["0"], nodes=["n1:19400"], panels=data, decisions=decisions,
                         decisions_metric_found=True, summary="")


def test_summary_of_a_tuned_run() -> None:
    n = 100
    total = series({}, [100.0] * 40 + [200.0] * 60)            # doubles once 2 workers run
    verdicts = [("input", series({"kind": "input"}, [1.0] * 50 + [0.0] * 50)),
                ("gpu", series({"kind": "gpu"}, [0.0] * 50 + [1.0] * 50))]
    knob = _workers([0] * 40 + [2] * 60)
    changes = report.knob_changes([knob], 1.0)
    rows = [report.DecisionRow(T0 + 40, "num_workers", "0 → 2", "0", "workers", "kept")]
    rep = _report({"Samples/s": [("whole run", total)], "Bottleneck verdict": verdicts,
                   "Knob values": [("num_workers rank 0", knob)]}, rows, T0 + n - 1)
    counter, acc = [], 0.0
    for rate in total.v:
        counter.append(acc)
        acc += rate
    rep.samples_total = series({}, counter)
    text = report.summarize(rep, changes, 4.0)
    until = datetime.fromtimestamp(T0 + 49).astimezone().strftime("%H:%M:%S")
    assert text.startswith("Run r (1 rank on 1 node, ")
    assert f"input-bound 50% of the time until {until}" in text, text
    assert "num_workers 0→2;" in text and "samples/s ×2.0 (100 → 200)" in text, text
    assert text.endswith("1 trial kept, 0 rolled back or failed."), text


def test_summary_without_verdicts_or_changes() -> None:
    # under the input verdict's threshold (looptune.verdicts.INPUT_WAIT_SHARE): not input-bound
    wait = series({"rank": "0"}, [0.05] * 30)
    total = series({}, [300.0] * 30)
    rep = _report({"Data-wait share": [("rank 0", wait)], "Samples/s": [("whole run", total)]}, [], T0 + 29)
    text = report.summarize(rep, [], 4.0)
    assert "waited on data 5% of its time; no knob changed; 300 samples/s on average." in text, text


def test_summary_falls_back_on_the_data_wait_share() -> None:
    # the same threshold as the engine's input verdict: 0.10 counts, 0.09 does not
    assert verdicts.INPUT_WAIT_SHARE == 0.10
    wait = series({"rank": "0"}, [0.9] * 20 + [0.10] * 10 + [0.09] * 10)
    rep = _report({"Data-wait share": [("rank 0", wait)]}, [], T0 + 39)
    text = report.summarize(rep, [], 4.0)
    until = datetime.fromtimestamp(T0 + 29).astimezone().strftime("%H:%M:%S")
    assert f"input-bound (waiting on data 10% of the time or more) 75% of the time until {until}" in text, text


def test_every_verdict_kind_has_a_color() -> None:
    assert tuple(report.VERDICT_COLORS) == verdicts.KINDS


def test_settled_setting_is_the_last_kept_trial() -> None:
    rows = [report.DecisionRow(T0, "num_workers", "0 → 2", "0", "workers", "kept"),
            report.DecisionRow(T0 + 9, "num_workers", "2 → 4", "0", "workers", "rolled_back")]
    changes = [KnobChange(T0, "num_workers", "0", "2", ["0"]), KnobChange(T0 + 9, "num_workers", "2", "4", ["0"]),
               KnobChange(T0 + 14, "num_workers", "4", "2", ["0"])]
    assert report.settled_setting(_report({}, rows, T0 + 20), changes) == ("num_workers", "2")


# ---- errors at the command line ----------------------------------------------------------------

def test_missing_matplotlib_is_a_clear_error(monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)          # import matplotlib -> ImportError
    assert report.main(["--prometheus", "http://127.0.0.1:9", "--run", "r"]) == 1
    err = capsys.readouterr().err
    assert "matplotlib" in err and "pip install 'looptune[report]'" in err


# ---- a whole page from a stub Prometheus ----------------------------------------------------------

class StubPrometheus:
    """Answers /api/v1/query_range by the first canned (substring, series) rule that matches the
    query, every other query with an empty result; `calls` records the queries."""

    def __init__(self, rules: list[tuple[str, Callable[[float, float, float], list[dict[str, Any]]]]]) -> None:
        self.rules = rules
        self.calls: list[str] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                url = urllib.parse.urlsplit(self.path)
                q = {k: v[0] for k, v in urllib.parse.parse_qs(url.query).items()}
                body: Any = {"status": "success", "data": {"resultType": "matrix", "result": []}}
                if url.path == "/api/v1/query_range":
                    stub.calls.append(q["query"])
                    if "bad{" in q["query"]:
                        self._send(400, {"status": "error", "errorType": "bad_data", "error": "parse error"})
                        return
                    for needle, make in stub.rules:
                        if needle in q["query"]:
                            body["data"]["result"] = make(float(q["start"]), float(q["end"]), float(q["step"]))
                            break
                elif url.path == "/api/v1/targets":
                    body["data"] = {"activeTargets": [{"labels": {"instance": "n1:19400"}, "scrapeInterval": "1s"}]}
                elif url.path.startswith("/api/v1/label/"):
                    body["data"] = ["other-run"]
                self._send(200, body)

            def _send(self, code: int, body: Any) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _matrix(labels: dict[str, str], f: Callable[[float], float | None],
            *more: tuple[dict[str, str], Callable[[float], float | None]]) -> Callable[..., list[dict[str, Any]]]:
    """Series whose value at T0 + x is f(x) (None: no point)."""
    def make(start: float, end: float, step: float) -> list[dict[str, Any]]:
        out = []
        for lab, fn in ((labels, f), *more):
            values, t = [], start
            while t <= end:
                v = fn(t - T0)
                if v is not None:
                    values.append([t, str(v)])
                t += step
            if values:
                out.append({"metric": lab, "values": values})
        return out
    return make


@pytest.fixture
def stub() -> Iterator[StubPrometheus]:
    """Two minutes of a run "r": input-bound, then 4 workers and twice the samples/s; no GPU."""
    rank = {"run": "r", "rank": "0", "instance": "n1:19400", "job": "looptune"}
    s = StubPrometheus([
        ("count({__name__", _matrix({}, lambda x: 1 if 0 <= x <= 120 else None)),
        ("count by (instance, rank)", _matrix({"instance": "n1:19400", "rank": "0"}, lambda x: 1 if x >= 0 else None)),
        ("sum by (instance, rank) (rate(looptune_job_samples_total", _matrix(rank, lambda x: 100 if x < 60 else 200)),
        ("sum(rate(looptune_job_samples_total", _matrix({}, lambda x: 100 if x < 60 else 200)),
        ("sum(looptune_job_samples_total", _matrix({}, lambda x: 100 * x if x < 60 else 6000 + 200 * (x - 60))),
        ("looptune_job_data_wait_seconds_total", _matrix(rank, lambda x: 0.9 if x < 60 else 0.2)),
        ("looptune_job_knob{", _matrix({**rank, "knob": "num_workers"}, lambda x: 0 if x < 60 else 4)),
        ("sum by (kind) (looptune_job_bottleneck", _matrix({"kind": "input"}, lambda x: 1 if x < 60 else 0,
                                                           ({"kind": "none"}, lambda x: 0 if x < 60 else 1))),
        ("sum by (tuner, knob, outcome)", _matrix({"tuner": "workers", "knob": "num_workers", "outcome": "kept"},
                                                  lambda x: 1 if x >= 65 else None)),
        ("looptune_job_processes", _matrix(rank, lambda x: 1 if x < 60 else 5)),
    ])
    yield s
    s.close()


def test_render_a_page_from_the_stub(stub: StubPrometheus, tmp_path: Path) -> None:
    _matplotlib()
    now = T0 + 120
    index = report.run(stub.url, "r", since="10m", out_dir=tmp_path / "out", now=now)
    page = index.read_text(encoding="utf-8")
    pngs = sorted(p.name for p in (tmp_path / "out").glob("*.png"))
    assert pngs == ["01-samples-s.png", "02-data-wait-share.png", "04-knob-values.png",
                    "05-bottleneck-verdict.png", "07-processes.png"], pngs
    assert "No data: this run held no GPU." in page and "No data: this run held no GPU memory." in page
    summary = page.split('<p class="summary">')[1].split("</p>")[0]
    assert "input-bound 50% of the time until" in summary, summary
    assert "num_workers 0→4;" in summary and "samples/s ×2.0 (100 → 200)" in summary, summary
    assert "<td>num_workers</td><td>0 → 4</td><td>0</td><td>workers</td><td>kept</td>" in page
    assert not list((tmp_path / "out").glob("*.tmp"))
    # what each verdict means, from looptune.verdicts, under the verdict panel
    for kind in verdicts.KINDS:
        assert f"<b>{kind}</b>: {verdicts.DESCRIPTIONS[kind]}" in page, kind
    # the report asked for exactly the dashboard's queries, with the run and a rate window filled in
    assert any('looptune_job_samples_total{run="r", rank=~".*"}[4s]' in c for c in stub.calls), stub.calls


def test_unknown_run_names_the_runs_there_are(stub: StubPrometheus, tmp_path: Path) -> None:
    _matplotlib()
    stub.rules[:] = []
    with pytest.raises(ReportError, match=r"no data for run 'nope' in the last 10 min; "
                                          r"runs seen in that time: other-run"):
        report.run(stub.url, "nope", since="10m", out_dir=tmp_path)


def test_prometheus_errors_are_reported(stub: StubPrometheus) -> None:
    p = report.Prometheus(stub.url)
    with pytest.raises(ReportError, match="HTTP 400 to /api/v1/query_range: parse error"):
        p.query_range("bad{", T0, T0 + 10, 1)


def test_run_names_are_escaped_in_queries(stub: StubPrometheus, tmp_path: Path) -> None:
    _matplotlib()
    with pytest.raises(ReportError):
        report.run(stub.url, 'a"b', since="1h", out_dir=tmp_path)
    assert any('run="a\\"b"' in c for c in stub.calls), stub.calls
