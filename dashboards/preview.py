"""Draw a looptune dashboard from live Prometheus data, without Grafana.

    python dashboards/preview.py --prometheus http://localhost:9090 \\
        --dashboard dashboards/grafana/looptune-job.json --var run=exp-1 --since 30m --out job.png

Lays the panels out on Grafana's 24-column grid (their gridPos), runs every target the way
Grafana would (range queries for graphs, instant queries for stats, bar gauges and tables,
template variables substituted, `$__rate_interval` from the scrape interval) and draws each
panel roughly as its type looks in Grafana's dark theme. It is how the README's pictures of
the dashboards are made, and the live dashboard test renders all three with it. Needs
matplotlib (`pip install 'looptune[report]'`).
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from looptune.report import Prometheus, ReportError, _require_matplotlib, parse_duration  # noqa: E402

BG, PANEL, TEXT, DIM, GRID = "#111217", "#181b1f", "#ccccdc", "#8e8e9a", "#2c3235"
PALETTE = ["#73bf69", "#f2cc0c", "#5794f2", "#ff9830", "#f2495c", "#b877d9", "#8ab8ff", "#fade2a",
           "#37872d", "#c4162a", "#1f60c4", "#fa6400"]
PX_PER_UNIT = 30          # Grafana: one gridPos height unit is 30 px; 24 columns span the width
WIDTH_PX = 1800


def substitute(expr: str, values: dict[str, str]) -> str:
    for name in sorted(values, key=len, reverse=True):
        expr = expr.replace("${" + name + "}", values[name])
        expr = re.sub(r"\$" + re.escape(name) + r"(?![A-Za-z0-9_])", lambda _m, v=values[name]: v, expr)
    return expr


def legend(fmt: str, labels: dict[str, str]) -> str:
    out = re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt or "").strip()
    return out or ", ".join(f"{k}={v}" for k, v in sorted(labels.items()) if k != "__name__") or "value"


def fmt_value(v: float, unit: str, decimals: int | None = None) -> str:
    if not math.isfinite(v):
        return "NaN"
    if unit == "percentunit":
        return f"{v:.0%}" if decimals is None else f"{v:.{decimals}%}"
    if unit in ("bytes", "Bps"):
        suffix = "/s" if unit == "Bps" else ""
        for u in ("B", "KiB", "MiB", "GiB", "TiB"):
            if abs(v) < 1024 or u == "TiB":
                return (f"{v:.0f} {u}" if u == "B" else f"{v:.1f} {u}") + suffix
            v /= 1024
    if unit == "s":
        return f"{v * 1000:.0f} ms" if abs(v) < 1 else f"{v:.2f} s"
    if unit == "hertz":
        return f"{v / 1e9:.2f} GHz" if abs(v) >= 1e9 else f"{v / 1e6:.0f} MHz"
    units = {"watt": " W", "celsius": " °C", "kwatth": " kWh", "h": " h"}
    if unit.startswith("suffix:"):
        tail = " " + unit.split(":", 1)[1].strip()
    else:
        tail = units.get(unit, "")
    if decimals is not None:
        return f"{v:,.{decimals}f}{tail}"
    if abs(v) >= 1e6:
        return f"{v / 1e6:.2f} M{tail}"
    if abs(v) >= 1000:
        return f"{v:,.0f}{tail}"
    return f"{v:.3g}{tail}"


def byte_scale(top: float) -> tuple[float, str]:
    scale, name = 1.0, "B"
    for u in ("KiB", "MiB", "GiB", "TiB"):
        if top >= 1024 * scale:
            scale, name = scale * 1024, u
    return scale, name


def tick_formatter(ax: Any, unit: str, scaled: str = "") -> Any:
    """Axis ticks with short unit names; byte values arrive already divided into `scaled` units."""
    def compact(v: float) -> str:
        for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
            if abs(v) >= div:
                return f"{v / div:g}{suffix}"
        return f"{v:.3g}"

    def fmt(v: float, _: Any) -> str:
        top = max(abs(x) for x in ax.get_ylim())
        if unit == "percentunit":
            return f"{v:.0%}"
        if unit in ("bytes", "Bps"):
            return f"{v:g} {scaled}" + ("/s" if unit == "Bps" else "")
        if unit == "s":
            return f"{v * 1000:g} ms" if top < 1 else f"{v:g} s"
        if unit == "hertz":
            return f"{v / 1e9:g} GHz" if top >= 1e9 else f"{v / 1e6:g} MHz"
        return compact(v) + {"watt": " W", "celsius": " °C", "kwatth": " kWh", "h": " h"}.get(unit, "")
    return fmt


class Preview:
    def __init__(self, prom: Prometheus, dashboard: dict[str, Any], values: dict[str, str], start: float,
                 end: float, step: float) -> None:
        self.prom, self.dashboard, self.values = prom, dashboard, values
        self.start, self.end, self.step = start, end, step

    def _range(self, expr: str) -> list[Any]:
        return self.prom.query_range(substitute(expr, self.values), self.start, self.end, self.step)

    def _instant(self, expr: str) -> list[tuple[dict[str, str], float]]:
        data = self.prom.get("/api/v1/query", query=substitute(expr, self.values), time=f"{self.end:.3f}")
        if data["resultType"] == "scalar":
            return [({}, float(data["result"][1]))]
        return [(dict(r["metric"]), float(r["value"][1])) for r in data["result"]]

    def draw(self, path: Path) -> Path:
        mpl = _require_matplotlib()
        Figure, FigureCanvasAgg = mpl
        panels = self.dashboard["panels"]
        rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels)
        head = 2.0
        dpi = 100
        w_in = WIDTH_PX / dpi
        h_in = (rows * PX_PER_UNIT) / dpi + head * PX_PER_UNIT / dpi
        fig = Figure(figsize=(w_in, h_in), dpi=dpi, facecolor=BG)
        FigureCanvasAgg(fig)
        fig.text(0.008, 1 - 0.5 * head * PX_PER_UNIT / (h_in * dpi), self.dashboard["title"], color=TEXT,
                 fontsize=15, fontweight="bold", va="center")
        shown = "  ".join(f"{k}={v}" for k, v in self.values.items() if not k.startswith("__") and k != "datasource")
        fig.text(0.992, 1 - 0.5 * head * PX_PER_UNIT / (h_in * dpi), f"{shown}   "
                 f"{datetime.fromtimestamp(self.start).astimezone():%Y-%m-%d %H:%M} – "
                 f"{datetime.fromtimestamp(self.end).astimezone():%H:%M}", color=DIM, fontsize=10, ha="right",
                 va="center")
        total_h = rows + head
        fig_h = h_in * dpi
        for p in panels:
            g = p["gridPos"]
            x0, x1 = g["x"] / 24 * WIDTH_PX + 4, (g["x"] + g["w"]) / 24 * WIDTH_PX - 4
            top = fig_h - (head + g["y"]) * PX_PER_UNIT - 4
            bottom = fig_h - (head + g["y"] + g["h"]) * PX_PER_UNIT + 4
            if p["type"] == "row":
                fig.text(x0 / WIDTH_PX, (top + bottom) / 2 / fig_h, p["title"], color=TEXT, fontsize=12,
                         fontweight="bold", va="center")
                continue
            frame = fig.add_axes([x0 / WIDTH_PX, bottom / fig_h, (x1 - x0) / WIDTH_PX, (top - bottom) / fig_h],
                                 facecolor=PANEL)
            self._bare(frame)
            for side in frame.spines.values():
                side.set_color(GRID)
            frame.text(8 / (x1 - x0), 1 - 12 / (top - bottom), p["title"], color=TEXT, fontsize=10,
                       va="center", transform=frame.transAxes)
            graph = p["type"] in ("timeseries",)
            left, right = (x0 + (58 if graph else 6)), x1 - (40 if graph and self._twin(p) else 6)
            inner_top, inner_bottom = top - 24, bottom + (20 if graph else 6)
            ax = fig.add_axes([left / WIDTH_PX, inner_bottom / fig_h, (right - left) / WIDTH_PX,
                               (inner_top - inner_bottom) / fig_h], facecolor=PANEL)
            for side in ax.spines.values():
                side.set_visible(False)
            try:
                getattr(self, "_" + p["type"].replace("-", "_"), self._unknown)(ax, p)
            except ReportError as exc:
                self._bare(ax)
                ax.text(0.5, 0.5, f"query error: {exc}"[:120], color="#f2495c", ha="center", va="center",
                        fontsize=8, transform=ax.transAxes, wrap=True)
        tmp = path.with_name(path.name + ".tmp")
        fig.savefig(tmp, format="png", facecolor=BG)
        tmp.replace(path)
        return path

    @staticmethod
    def _twin(p: dict[str, Any]) -> bool:
        return any(o["matcher"]["id"] == "byFrameRefID" for o in p["fieldConfig"]["overrides"])

    # ---- panel types ----

    @staticmethod
    def _bare(ax: Any) -> None:
        ax.set_xticks([])
        ax.set_yticks([])

    def _no_data(self, ax: Any) -> None:
        self._bare(ax)
        ax.text(0.5, 0.5, "No data", color=DIM, ha="center", va="center", fontsize=11, transform=ax.transAxes)

    def _unknown(self, ax: Any, p: dict[str, Any]) -> None:
        self._no_data(ax)

    def _unit(self, p: dict[str, Any]) -> tuple[str, int | None]:
        d = p["fieldConfig"]["defaults"]
        return d.get("unit", "short"), d.get("decimals")

    def _timeseries(self, ax: Any, p: dict[str, Any]) -> None:
        import matplotlib.dates as mdates
        from matplotlib.ticker import FuncFormatter

        unit, decimals = self._unit(p)
        overrides = {o["matcher"]["options"]: {x["id"]: x["value"] for x in o["properties"]}
                     for o in p["fieldConfig"]["overrides"] if o["matcher"]["id"] == "byFrameRefID"}
        custom = p["fieldConfig"]["defaults"].get("custom", {})
        steps = custom.get("lineInterpolation") == "stepAfter"
        fetched = [(t, s) for t in p["targets"] for s in self._range(t["expr"])]
        if not fetched:
            self._no_data(ax)
            return
        u2 = next(iter(overrides.values())).get("unit", "short") if overrides else unit
        ax2 = ax.twinx() if overrides else None
        scales = {}
        for which, u in (("main", unit), ("twin", u2)):
            top = max((abs(v) for t, s in fetched if (t["refId"] in overrides) == (which == "twin")
                       for v in s.v if math.isfinite(v)), default=0.0)
            scales[which] = byte_scale(top) if u in ("bytes", "Bps") else (1.0, "")
        for n, (t, s) in enumerate(fetched):
            which = "twin" if t["refId"] in overrides else "main"
            xs = [datetime.fromtimestamp(x).astimezone() for x in s.t]
            (ax2 if which == "twin" else ax).plot(
                xs, [v / scales[which][0] for v in s.v], color=PALETTE[n % len(PALETTE)], linewidth=1.3,
                drawstyle="steps-post" if steps else "default", label=legend(t.get("legendFormat", ""), s.labels))
        ax.yaxis.set_major_formatter(FuncFormatter(tick_formatter(ax, unit, scales["main"][1])))
        if ax2 is not None:
            ax2.yaxis.set_major_formatter(FuncFormatter(tick_formatter(ax2, u2, scales["twin"][1])))
            ax2.tick_params(colors=DIM, labelsize=7)
            ax2.set_ylim(bottom=0)
            for side in ax2.spines.values():
                side.set_visible(False)
        d = p["fieldConfig"]["defaults"]
        if "min" in d or "max" in d:
            ax.set_ylim(d.get("min"), d.get("max"))
        else:
            ax.set_ylim(bottom=0)
        ax.set_xlim(datetime.fromtimestamp(self.start).astimezone(), datetime.fromtimestamp(self.end).astimezone())
        short = self.end - self.start < 900
        ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M:%S" if short else "%H:%M",
                                                          tz=datetime.now().astimezone().tzinfo))
        ax.tick_params(colors=DIM, labelsize=7)
        ax.grid(color=GRID, linewidth=0.6)
        handles, labels = ax.get_legend_handles_labels()
        if ax2 is not None:
            h2, l2 = ax2.get_legend_handles_labels()
            handles, labels = handles + h2, labels + l2
        if handles:
            ax.legend(handles[:8], labels[:8], fontsize=6.5, loc="upper left", frameon=False, labelcolor=TEXT,
                      ncols=min(4, len(handles[:8])), bbox_to_anchor=(0, 1.0))

    def _instant_items(self, p: dict[str, Any]) -> list[tuple[str, float]]:
        """(legend, value) of every instant result of the panel's targets."""
        return [(legend(t.get("legendFormat", ""), labels), v)
                for t in p["targets"] for labels, v in self._instant(t["expr"])]

    def _stat(self, ax: Any, p: dict[str, Any]) -> None:
        self._bare(ax)
        unit, decimals = self._unit(p)
        mode = p["options"].get("textMode", "auto")
        items = self._instant_items(p)
        if not items:
            self._no_data(ax)
            return
        steps = p["fieldConfig"]["defaults"].get("thresholds", {}).get("steps", [])
        for i, (name, v) in enumerate(items[:4]):
            color = "#73bf69"
            for st in steps:
                if st["value"] is None or v >= st["value"]:
                    color = {"green": "#73bf69", "yellow": "#fade2a", "red": "#f2495c"}.get(st["color"], st["color"])
            x = (i + 0.5) / min(len(items), 4)
            if mode == "name":
                ax.text(x, 0.45, name, color=color, ha="center", va="center", fontsize=16, transform=ax.transAxes)
                continue
            ax.text(x, 0.42, fmt_value(v, unit, decimals), color=color, ha="center", va="center", fontsize=20,
                    fontweight="bold", transform=ax.transAxes)
            if mode == "value_and_name" or len(items) > 1:
                ax.text(x, 0.8, name, color=DIM, ha="center", va="center", fontsize=8, transform=ax.transAxes)

    def _bargauge(self, ax: Any, p: dict[str, Any]) -> None:
        unit, decimals = self._unit(p)
        items = self._instant_items(p)
        if not items:
            self._no_data(ax)
            return
        items = items[:10]
        hi = p["fieldConfig"]["defaults"].get("max") or max(v for _, v in items) or 1
        ys = range(len(items))
        ax.barh(list(ys), [hi] * len(items), color="#22252b", height=0.6)
        ax.barh(list(ys), [v for _, v in items], color=[PALETTE[i % len(PALETTE)] for i in ys], height=0.6)
        for y, (name, v) in zip(ys, items):
            ax.text(0, y - 0.42, name, color=TEXT, fontsize=7, va="bottom")
            ax.text(hi, y, fmt_value(v, unit, decimals) + " ", color=TEXT, fontsize=8, va="center", ha="right")
        ax.set_xlim(0, hi)
        ax.set_ylim(len(items) - 0.4, -0.9)
        self._bare(ax)

    def _table(self, ax: Any, p: dict[str, Any]) -> None:
        self._bare(ax)
        org = next((t["options"] for t in p.get("transformations", []) if t["id"] == "organize"), {})
        hidden = {k for k, v in org.get("excludeByName", {}).items() if v}
        rename = org.get("renameByName", {})
        rows: list[dict[str, str]] = []
        merge = any(t["id"] == "merge" for t in p.get("transformations", []))
        for t in p["targets"]:
            for labels, v in self._instant(t["expr"]):
                col = f"Value #{t['refId']}" if merge else "Value"
                row = {k: val for k, val in labels.items()}
                row[col] = f"{v:.3g}" if not float(v).is_integer() else str(int(v))
                if merge:
                    key = tuple(sorted((k, val) for k, val in labels.items() if k != "__name__"))
                    existing = next((r for r in rows if r.get("__key") == key), None)
                    if existing:
                        existing.update(row)
                        continue
                    row["__key"] = key       # type: ignore[assignment]
                rows.append(row)
        if not rows:
            self._no_data(ax)
            return
        cols = [c for c in dict.fromkeys(k for r in rows for k in r) if c not in hidden and c != "__key"]
        cells = [[str(r.get(c, "")) for c in cols] for r in rows[:12]]
        table = ax.table(cellText=cells, colLabels=[rename.get(c, c) for c in cols], loc="upper center",
                         cellLoc="left", colLoc="left")
        table.auto_set_font_size(False)
        table.set_fontsize(7)
        for (r, _), cell in table.get_celld().items():
            cell.set_edgecolor(GRID)
            cell.set_facecolor("#22252b" if r == 0 else PANEL)
            cell.get_text().set_color(TEXT)

    def _state_timeline(self, ax: Any, p: dict[str, Any]) -> None:
        mapping = {}
        for m in p["fieldConfig"]["defaults"].get("mappings", []):
            for k, r in m.get("options", {}).items():
                mapping[float(k)] = (r.get("text", k), r.get("color", "#73bf69"))
        series = []
        for t in p["targets"]:
            for s in self._range(t["expr"]):
                series.append((legend(t.get("legendFormat", ""), s.labels), s))
        if not series:
            self._no_data(ax)
            return
        for i, (name, s) in enumerate(series):
            for x0, x1, v in zip(s.t, s.t[1:] + [s.t[-1] + self.step], s.v):
                text, color = mapping.get(v, ("", "#ff9830" if v > 0 else "transparent"))
                if color == "transparent":
                    continue
                color = {"green": "#73bf69", "red": "#f2495c"}.get(color, color)
                ax.barh(i, x1 - x0, left=x0, color=color, height=0.8, linewidth=0)
            ax.text(self.start, i, " " + name, color=TEXT, fontsize=7, va="center")
        ax.set_xlim(self.start, self.end)
        ax.set_ylim(len(series) - 0.5, -0.5)
        self._bare(ax)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prometheus", required=True)
    ap.add_argument("--dashboard", required=True, type=Path)
    ap.add_argument("--var", action="append", default=[], metavar="NAME=VALUE",
                    help="a template variable's value (multi-value variables take a regex)")
    ap.add_argument("--since", default="1h")
    ap.add_argument("--rate-interval", default="1m", help="what $__rate_interval stands for")
    ap.add_argument("--out", required=True, type=Path)
    a = ap.parse_args(argv)
    try:
        seconds = parse_duration(a.since)
        end = time.time()
        values = {"datasource": "", "__rate_interval": a.rate_interval, "__interval": a.rate_interval,
                  "__range": a.since, "__range_s": str(int(seconds))}
        for v in json.loads(a.dashboard.read_text())["templating"]["list"]:
            if v.get("includeAll"):
                values.setdefault(v["name"], v.get("allValue", ".*"))
        values.update(dict(kv.split("=", 1) for kv in a.var))
        Preview(Prometheus(a.prometheus), json.loads(a.dashboard.read_text()), values, end - seconds, end,
                max(1.0, seconds / 300)).draw(a.out)
    except ReportError as exc:
        print(f"preview: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
