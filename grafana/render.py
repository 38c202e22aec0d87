"""Draw each dashboard as a PNG from its own Prometheus queries: a render, not a Grafana
screenshot (Grafana does not run on the machines that build mlmon).

    python grafana/render.py --prometheus http://127.0.0.1:9090 [--minutes 30] [--model ctr_feed] [--window 24h]
        [--end 2018-11-18T00:00:00Z --dashboard mlmon-model --suffix car-loan]

Reads grafana/dashboards/*.json (or the one of ``--dashboard``), resolves the variables
against that Prometheus as Grafana would, runs every panel's queries over the ``--minutes``
before ``--end`` (default: now; range queries; stats, bar gauges and tables take the last
value) and writes docs/images/<uid>[-<suffix>].png with the panels where the dashboard
puts them. Needs matplotlib (the ``dashboards`` extra). A backfilled history
(docs/backfill.md) is drawn with ``--end`` at its end.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.colors
import matplotlib.dates
import matplotlib.pyplot as plt
import matplotlib.ticker
import numpy as np
import queries

REPO = Path(__file__).parent.parent
IMAGES = REPO / "docs" / "images"
COLOURS = {"green": "#56a64b", "red": "#e02f44", "orange": "#ff9830", "blue": "#3274d9"}
#: Inches per grid unit: Grafana's grid is 24 columns wide and its rows are 30 px high.
COLUMN, ROW = 0.7, 0.28
#: Inches above the panels for the figure's title.
HEADER = 0.7


class Panel:
    """One panel's data: its range series, by query refId."""

    def __init__(self, spec: dict, series: dict[str, list[dict]]):
        self.spec, self.series = spec, series
        self.defaults = spec["fieldConfig"]["defaults"]

    def shown(self) -> list[tuple[dict, dict]]:
        """(series, target) of the displayed queries: those no transformation consumes."""
        transformations = self.spec.get("transformations", [])
        config = {t["options"]["configRefId"] for t in transformations if t["id"] == "configFromData"}
        targets = [target for target in self.spec["targets"] if target["refId"] not in config]
        return [(series, target) for target in targets for series in self.series[target["refId"]]]

    def scale(self) -> tuple[float | None, float | None]:
        """min and max, with those that "Config from query results" reads from a query."""
        bounds = {"min": self.defaults.get("min"), "max": self.defaults.get("max")}
        for transformation in self.spec.get("transformations", []):
            if transformation["id"] == "configFromData":
                for series in self.series[transformation["options"]["configRefId"]][:1]:
                    bounds[transformation["options"]["mappings"][0]["handlerKey"]] = last(series)
        return bounds["min"], bounds["max"]

    def colour(self, value: float) -> str:
        """The colour Grafana's thresholds give ``value`` (absolute or percentage steps)."""
        thresholds = self.defaults.get("thresholds")
        if not thresholds:
            return COLOURS["blue"]
        if thresholds["mode"] == "percentage":
            low, high = self.scale()
            value = (value - low) / (high - low) * 100
        chosen = thresholds["steps"][0]["color"]
        for step in thresholds["steps"][1:]:
            if value >= step["value"]:
                chosen = step["color"]
        return COLOURS.get(chosen, chosen)

    def text(self, value: float) -> str:
        """``value`` as the panel shows it: value mappings first, then the unit."""
        for mapping in self.defaults.get("mappings", []):
            if (found := mapping["options"].get(f"{value:g}")) is not None:
                return found["text"]
        return formatted(value, self.defaults["unit"], self.defaults.get("decimals"))


def formatted(value: float, unit: str, decimals: int | None = None) -> str:
    """A small subset of Grafana's unit formatting, enough for the mlmon dashboards."""
    if np.isnan(value):
        return "NaN"
    if unit == "percentunit":
        return f"{value * 100:.{1 if decimals is None else decimals}f}%"
    if unit == "dateTimeAsIso":
        return datetime.fromtimestamp(value / 1000, UTC).strftime("%Y-%m-%d %H:%M")
    if unit == "bytes":
        return f"{value / 2**20:.4g} MiB"
    if unit == "s":
        return f"{value * 1000:.3g} ms" if value < 1 else f"{value:.3g} s" if value < 120 else f"{value / 60:.3g} min"
    suffix = {"reqps": " req/s", "ops": " /s"}.get(unit, "")
    if unit == "short" and abs(value) >= 1000:
        return f"{value / 1000:.1f} K" if abs(value) < 1e6 else f"{value / 1e6:.2f} M"
    return f"{value:.{3 if decimals is None else decimals}f}{suffix}" if value % 1 else f"{value:.0f}{suffix}"


def last(series: dict) -> float:
    return float(series["values"][-1][1])


def legend(series: dict, target: dict) -> str:
    """The legend Grafana shows: legendFormat with {{label}} filled in."""
    labels = {k: v for k, v in series["metric"].items() if k != "__name__"}
    if target["legendFormat"] == "__auto":
        return ", ".join(f"{k}={v}" for k, v in labels.items()) or "value"
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), target["legendFormat"])


def fetch(prometheus: str, expr: str, start: float, end: float, step: float) -> list[dict]:
    response = httpx.get(
        f"{prometheus}/api/v1/query_range", params={"query": expr, "start": start, "end": end, "step": step}, timeout=30
    )
    response.raise_for_status()
    return response.json()["data"]["result"]


def draw_stat(ax, panel: Panel) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    shown = panel.shown()
    text_mode = panel.spec["options"]["textMode"]
    coloured = panel.spec["options"]["colorMode"] != "none"
    for i, (series, target) in enumerate(shown):
        value = last(series)
        y = 1 - (i + 0.5) / len(shown)
        if coloured:
            ax.add_patch(
                plt.Rectangle((0, 1 - (i + 1) / len(shown)), 1, 1 / len(shown), color=panel.colour(value), alpha=0.85)
            )
        name = legend(series, target)
        label = (
            name
            if text_mode == "name"
            else f"{name}: {panel.text(value)}"
            if text_mode == "value_and_name"
            else panel.text(value)
        )
        ax.text(
            0.5,
            y,
            label,
            ha="center",
            va="center",
            fontsize=13 if len(shown) == 1 else 9,
            weight="bold",
            color="white" if coloured else "black",
        )
    if not shown:
        ax.text(0.5, 0.5, "No data", ha="center", va="center", color="grey")


def draw_timeseries(ax, panel: Panel, annotations: list[float]) -> None:
    for target in panel.spec["targets"]:
        for series in panel.series[target["refId"]]:
            times = [datetime.fromtimestamp(t, UTC) for t, _ in series["values"]]
            ax.plot(times, [float(v) for _, v in series["values"]], linewidth=1, label=legend(series, target))
    for moment in annotations:
        ax.axvline(datetime.fromtimestamp(moment, UTC), color=COLOURS["blue"], linestyle="--", linewidth=1)
    ax.yaxis.set_major_formatter(
        matplotlib.ticker.FuncFormatter(
            lambda v, _: formatted(v, panel.defaults["unit"], panel.defaults.get("decimals"))
        )
    )
    ax.tick_params(labelsize=7)
    if ax.lines:
        ax.legend(fontsize=6, loc="best", ncol=4, framealpha=0.6)


def draw_bargauge(ax, panel: Panel) -> None:
    """Bars by legend; a by-version panel's in the order of its sortBy field (training time)."""
    target = panel.spec["targets"][0]
    rows = sorted((legend(s, target), last(s)) for s in panel.series[target["refId"]])
    for transformation in panel.spec.get("transformations", []):
        if transformation["id"] == "sortBy":
            ref = transformation["options"]["sort"][0]["field"].removeprefix("Value #")
            key_target = next(t for t in panel.spec["targets"] if t["refId"] == ref)
            keys = {legend(s, key_target): last(s) for s in panel.series[ref]}
            rows.sort(key=lambda row: keys.get(row[0], float("inf")))
    names, values = [n for n, _ in rows], [v for _, v in rows]
    ax.barh(range(len(rows)), values, color=[panel.colour(v) for v in values])
    ax.set_yticks(range(len(rows)), names, fontsize=6)
    ax.invert_yaxis()
    for i, value in enumerate(values):
        ax.text(value, i, " " + panel.text(value), va="center", fontsize=6)
    ax.tick_params(axis="x", labelsize=6)
    ax.margins(x=0.25)


def draw_heatmap(ax, panel: Panel) -> None:
    """Cumulative ``le`` buckets into per-bucket rates, time on x, buckets on y."""
    series = sorted(panel.series["A"], key=lambda s: float(s["metric"]["le"]))
    if not series:
        return
    cumulative = np.array([[float(v) for _, v in s["values"]] for s in series])
    counts = np.diff(cumulative, axis=0, prepend=0)
    times = [matplotlib.dates.date2num(datetime.fromtimestamp(t, UTC)) for t, _ in series[0]["values"]]
    # The panel's colour scale: Oranges with exponent 0.5.
    ax.imshow(
        counts,
        aspect="auto",
        origin="lower",
        cmap="Oranges",
        norm=matplotlib.colors.PowerNorm(0.5),
        interpolation="nearest",
        extent=[times[0], times[-1], -0.5, len(series) - 0.5],
    )
    ticks = range(0, len(series), max(1, len(series) // 8))
    ax.set_yticks(ticks, [series[i]["metric"]["le"] for i in ticks], fontsize=6)
    ax.set_ylabel("score bucket (le)", fontsize=7)
    ax.tick_params(axis="x", labelsize=7)


def draw_table(ax, panel: Panel) -> None:
    """Rows keyed by the labels left after the organize transformation, one column per query."""
    excluded = next(
        (t["options"].get("excludeByName", {}) for t in panel.spec.get("transformations", []) if t["id"] == "organize"),
        {},
    )
    renamed = next(
        (t["options"].get("renameByName", {}) for t in panel.spec.get("transformations", []) if t["id"] == "organize"),
        {},
    )
    rows: dict[tuple, dict[str, str]] = {}
    columns: list[str] = []
    targets = panel.spec["targets"]
    for target in targets:
        value_column = renamed.get(f"Value #{target['refId']}" if len(targets) > 1 else "Value", "Value")
        for series in panel.series[target["refId"]]:
            labels = {k: v for k, v in sorted(series["metric"].items()) if not excluded.get(k) and k != "__name__"}
            key = tuple(labels.items())
            row = rows.setdefault(key, dict(labels))
            if not excluded.get("Value"):
                row[value_column] = panel.text(last(series))
            columns += [c for c in row if c not in columns]
    ax.axis("off")
    if not rows:
        ax.text(0.5, 0.5, "No data", ha="center", va="center", color="grey")
        return
    cells = [[row.get(c, "") for c in columns] for row in rows.values()]
    table = ax.table(cellText=cells, colLabels=columns, loc="upper center", cellLoc="left")
    table.auto_set_font_size(False)
    table.set_fontsize(7)


DRAW = {"stat": draw_stat, "bargauge": draw_bargauge, "heatmap": draw_heatmap, "table": draw_table}


def render(
    prometheus: str,
    dashboard: dict,
    minutes: int,
    model: str,
    path: Path,
    window: str = "24h",
    end: float | None = None,
) -> None:
    end = time.time() if end is None else end
    start, step = end - minutes * 60, max(5.0, minutes * 60 / 150)
    wanted = {"model": model, "window": window}
    values = queries.resolve_variables(prometheus, dashboard, wanted)
    # resolve_variables falls back to the first value offered, as Grafana does; a picture
    # silently drawn on another model or window (1h sorts first) would mislead.
    for name, value in wanted.items():
        if name in values and values[name] != value:
            raise SystemExit(f"{dashboard['uid']}: Prometheus offers no {name}={value} (took {values[name]})")

    # Grafana's $__rate_interval: at least four 15 s scrapes, and more than one step, so
    # that a rate() over a long range (backfilled history at 5-minute steps) has samples.
    rate_interval = f"{max(60, int(step) + 15)}s"

    def run(expr: str) -> list[dict]:
        return fetch(prometheus, queries.substitute(expr, values, rate_interval), start, end, step)

    # Annotations with useValueForTime: each distinct value is an event time in ms.
    expressions = [a["expr"] for a in dashboard.get("annotations", {}).get("list", []) if "expr" in a]
    moments = {float(v) / 1000 for expr in expressions for s in run(expr) for _, v in s["values"]}
    annotations = sorted(m for m in moments if start <= m <= end)
    specs = queries.panels(dashboard)
    rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in specs)
    tall = rows * ROW + HEADER
    figure = plt.figure(figsize=(24 * COLUMN, tall), dpi=72)
    chosen = ", ".join(f"{k}={v}" for k, v in values.items() if k != "datasource")
    figure.suptitle(
        f'Render of "{dashboard["title"]}" from its Prometheus queries (not a Grafana screenshot)\n{chosen}, last {minutes} min, '
        f"{datetime.fromtimestamp(end, UTC):%Y-%m-%d %H:%M} UTC",
        fontsize=11,
    )
    for spec in specs:
        grid = spec["gridPos"]
        # Figure fractions of the grid cell, less room for the title and the tick labels.
        left, width = grid["x"] / 24 + 0.004, grid["w"] / 24 - 0.008
        bottom, height = 1 - (HEADER + (grid["y"] + grid["h"]) * ROW) / tall, (grid["h"] * ROW - 0.3) / tall
        pad = {"timeseries": 0.03, "heatmap": 0.045, "bargauge": 0.06}.get(spec["type"], 0)
        if pad:
            left, width, bottom, height = left + pad, width - pad, bottom + 0.25 / tall, height - 0.25 / tall
        ax = figure.add_axes([left, bottom, width, height])
        ax.set_title(spec["title"], fontsize=8, loc="left")
        panel = Panel(spec, {t["refId"]: run(t["expr"]) for t in spec["targets"]})
        if spec["type"] == "timeseries":
            draw_timeseries(ax, panel, annotations)
        else:
            DRAW[spec["type"]](ax, panel)
        if spec["type"] in ("timeseries", "heatmap"):  # days on a range of days
            clock = "%H:%M" if minutes <= 24 * 60 else "%m-%d"
            ax.xaxis.set_major_formatter(matplotlib.dates.DateFormatter(clock, tz=UTC))
    figure.savefig(path, dpi=72)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prometheus", required=True, help="base URL, e.g. http://127.0.0.1:9090")
    parser.add_argument("--minutes", type=int, default=30, help="time range of the range queries")
    parser.add_argument("--model", default="ctr_feed", help="value of the model variable")
    # The README's recommended window: the first in sort order, 1h, holds too few clicks.
    parser.add_argument("--window", default="24h", help="value of the window variable")
    parser.add_argument("--end", type=datetime.fromisoformat, help="ISO-8601 end of the range (default: now)")
    parser.add_argument("--dashboard", help="uid of the one dashboard to draw (default: all)")
    parser.add_argument("--suffix", help="appended to the file name: <uid>-<suffix>.png")
    args = parser.parse_args()
    IMAGES.mkdir(parents=True, exist_ok=True)
    end = args.end.timestamp() if args.end else None
    for path in sorted((Path(__file__).parent / "dashboards").glob("*.json")):
        dashboard = json.loads(path.read_text())
        if args.dashboard not in (None, dashboard["uid"]):
            continue
        out = IMAGES / f"{dashboard['uid']}{'-' + args.suffix if args.suffix else ''}.png"
        render(args.prometheus, dashboard, args.minutes, args.model, out, args.window, end)
        print(f"wrote {out.relative_to(REPO)} ({out.stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    main()
