"""Run dashboards: a run report -> an HTML page with inline SVG charts, and a PNG of the same charts.

Pure functions over the report dict (see report.build_report), shared by the Serve pages and
``embedpipe report``. Any optional field may be missing, so an old or partial report still renders.
Every string from a report is escaped here: the Serve pages insert these fragments as they are.
"""

from __future__ import annotations

import bisect
import html
import json
import logging
import math
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipelines.store import RUNS_DIR, location

logger = logging.getLogger(__name__)

# Run ids as ingest makes them (20250101T120000Z-a1b2c3); the first character may not be a dot,
# so no id can name a parent folder or a hidden file.
RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
COLORS = ("#2563eb", "#d97706", "#059669", "#db2777")
MAX_FAILURE_ROWS = 500

CSS = """
:root { --fg: #1f2937; --muted: #6b7280; --line: #e5e7eb; --bg: #f9fafb; --accent: #2563eb;
        --bad: #b91c1c; font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; }
* { box-sizing: border-box; }
body { margin: 0; color: var(--fg); background: var(--bg); line-height: 1.45; }
header.top { display: flex; flex-wrap: wrap; gap: .5rem 1.5rem; align-items: baseline;
             padding: .75rem 1.25rem; background: #111827; color: #f9fafb; }
header.top a { color: #bfdbfe; }
header.top .brand { font-weight: 700; font-size: 1.1rem; color: #f9fafb; text-decoration: none; }
main { max-width: 72rem; margin: 0 auto; padding: 1rem 1.25rem 3rem; }
h1 { font-size: 1.4rem; margin: .5rem 0 1rem; word-break: break-all; }
h2 { font-size: 1.1rem; margin: 1.5rem 0 .5rem; }
a { color: var(--accent); }
.muted { color: var(--muted); overflow-wrap: anywhere; }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(10rem, 1fr)); gap: .75rem; }
.card { background: #fff; border: 1px solid var(--line); border-radius: .5rem; padding: .6rem .8rem; }
.card .label { font-size: .8rem; color: var(--muted); }
.card .value { font-size: 1.2rem; font-weight: 600; }
.charts { display: grid; grid-template-columns: repeat(auto-fit, minmax(min(100%, 30rem), 1fr)); gap: 1rem; }
figure.chart { margin: 0; background: #fff; border: 1px solid var(--line); border-radius: .5rem;
               padding: .6rem .8rem; }
figure.chart figcaption { font-weight: 600; margin-bottom: .25rem; }
figure.chart svg { width: 100%; height: auto; display: block; }
.table-wrap { overflow-x: auto; }
table { border-collapse: collapse; width: 100%; background: #fff; font-size: .9rem; }
th, td { text-align: left; padding: .4rem .6rem; border-bottom: 1px solid var(--line); vertical-align: top; }
th { background: #f3f4f6; font-weight: 600; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.reason { word-break: break-word; }
.error { color: var(--bad); background: #fef2f2; border: 1px solid #fecaca; border-radius: .5rem;
         padding: .6rem .8rem; white-space: pre-wrap; }
"""


def check_run_id(run_id: str) -> str:
    """``run_id`` itself, or a ValueError when it could not be a run's name (e.g. ``../x``)."""
    if not RUN_ID.fullmatch(run_id):
        raise ValueError(
            f"Invalid run id: {run_id!r}. A run id is letters, digits, '-', '_' and '.', "
            "not starting with '.' (e.g. 20250101T120000Z-a1b2c3)."
        )
    return run_id


def load_run(*, db: str | Path, run_id: str) -> dict[str, Any]:
    """The report of one run of ``db``.

    Args:
        db: the db directory; reports live in ``db/_runs/<run_id>.json``.
        run_id: the run's id, checked with :func:`check_run_id`.

    Returns:
        The report dict. Raises ValueError for a bad id, FileNotFoundError for an unknown run.
    """
    name = f"{RUNS_DIR}/{check_run_id(run_id)}.json"
    data = location(db).read_bytes(name)
    if data is None:
        raise FileNotFoundError(f"No run {run_id!r} in {str(db)!r}.")
    try:
        return json.loads(data)
    except json.JSONDecodeError as exc:
        raise ValueError(f"Run report {name!r} of {str(db)!r} is not valid JSON: {exc}") from exc


def list_runs(*, db: str | Path) -> list[dict[str, Any]]:
    """One summary row per run report found under ``db/_runs``, newest first.

    Args:
        db: the db directory.

    Returns:
        Rows of :func:`run_summary`; files that are not readable reports are skipped (and logged).
    """
    rows = []
    loc = location(db)
    for obj in sorted(loc.list(RUNS_DIR + "/"), key=lambda o: o["path"]):
        stem = obj["path"].rsplit("/", 1)[-1].removesuffix(".json")
        if not obj["path"].endswith(".json") or not RUN_ID.fullmatch(stem):
            continue
        try:
            rows.append(run_summary(json.loads(loc.read_bytes(obj["path"]) or b"")))
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            logger.warning("skipping unreadable run report %s: %s", obj["path"], exc)
    return sorted(rows, key=lambda row: (row["started_at"] or 0, row["run_id"]), reverse=True)


def run_summary(report: dict[str, Any]) -> dict[str, Any]:
    """The headline numbers of one run, for the runs list (missing fields are None)."""
    docs = report.get("docs") or {}
    throughput = report.get("throughput") or {}
    return {
        "run_id": str(report.get("run_id", "")),
        "started_at": report.get("started_at"),
        "wall_s": report.get("wall_s"),
        "docs_seen": docs.get("seen"),
        "docs_ingested": docs.get("ingested"),
        "docs_unchanged": docs.get("unchanged"),
        "docs_failed": docs.get("failed"),
        "docs_per_min": throughput.get("docs_per_min"),
        "tokens_per_s": throughput.get("tokens_per_s"),
        "peak_rss_mb": (report.get("resources") or {}).get("peak_rss_mb"),
        "cost_per_doc_usd": (report.get("cost") or {}).get("per_doc_usd"),
    }


# ---------------------------------------------------------------------------------------------
# Chart data: one extraction shared by the SVG and the PNG renderers.


def chart_data(report: dict[str, Any]) -> dict[str, Any]:
    """The series every chart draws, from whatever the report holds.

    Returns:
        ``throughput``: {series: [(t, per second)]}; ``stages``: [(name, wall_s)];
        ``memory`` and ``cpu``: [(t, value)]; ``batching``: {field: [(t, value)]}.
    """
    resources = report.get("resources") or {}
    timeline = [p for p in resources.get("timeline") or [] if _num(p.get("t")) is not None]
    stages = [
        (str(name), float(stats.get("wall_s") or 0.0))
        for name, stats in (report.get("stages") or {}).items()
        if isinstance(stats, dict)
    ]
    batching: dict[str, list[tuple[float, float]]] = {}
    for point in (report.get("batching") or {}).get("timeline") or []:
        t = _num(point.get("t"))
        for key, value in point.items():
            if key != "t" and t is not None and _num(value) is not None:
                batching.setdefault(key, []).append((t, float(value)))
    return {
        "throughput": _rates(report.get("progress") or [], ("docs", "chunks")),
        "stages": stages,
        "memory": [
            (float(p["t"]), float(p["rss_mb"])) for p in timeline if _num(p.get("rss_mb")) is not None
        ],
        "cpu": [(float(p["t"]), float(p["cpu_pct"])) for p in timeline if _num(p.get("cpu_pct")) is not None],
        "batching": dict(sorted(batching.items(), key=lambda kv: (kv[0] != "token_budget", kv[0]))),
    }


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def _rates(progress: list[dict[str, Any]], keys: tuple[str, ...]) -> dict[str, list[tuple[float, float]]]:
    """Per-second rates of cumulative counters, over up to 30 equal time bins.

    Blocks finish in bursts, so rates between consecutive points would be spikes; equal bins show
    the pace the run kept.
    """
    points = sorted((p for p in progress if _num(p.get("t")) is not None), key=lambda p: p["t"])
    if not points or points[-1]["t"] <= 0:
        return {}
    times = [float(p["t"]) for p in points]
    bins = max(1, min(30, len(points)))
    width = times[-1] / bins
    rates = {}
    for key in keys:
        values = [_num(p.get(key)) for p in points]
        if all(value is None for value in values):
            continue
        totals, last = [], 0.0
        for value in values:  # a point without this counter keeps the last known total
            last = last if value is None else value
            totals.append(last)
        edges = []
        for i in range(bins + 1):
            done = bisect.bisect_right(times, i * width + 1e-9)  # points finished by this edge
            edges.append(totals[done - 1] if done else 0.0)
        rates[f"{key}/s"] = [((i + 0.5) * width, (edges[i + 1] - edges[i]) / width) for i in range(bins)]
    return rates


# ---------------------------------------------------------------------------------------------
# SVG charts


def _fmt(value: float) -> str:
    magnitude = abs(value)
    if magnitude >= 1e6:
        return f"{value / 1e6:.3g}M"
    if magnitude >= 1e4:
        return f"{value / 1e3:.3g}k"
    return f"{value:.4g}" if magnitude >= 1 or value == 0 else f"{value:.2g}"


def _ticks(top: float, count: int = 4) -> list[float]:
    """Round tick values from 0 to at least ``top``."""
    top = top if top > 0 else 1.0
    raw = top / count
    scale = 10 ** math.floor(math.log10(raw))
    step = next(m * scale for m in (1, 2, 2.5, 5, 10) if m * scale >= raw - 1e-12)
    return [i * step for i in range(math.ceil(top / step - 1e-9) + 1)]


def line_chart(
    *,
    series: dict[str, list[tuple[float, float]]],
    label: str,
    x_label: str = "seconds since start",
    width: int = 560,
    height: int = 220,
) -> str:
    """An SVG line chart of one or more (x, y) series on shared axes starting at 0.

    Args:
        series: name -> points; names show in a legend when there is more than one.
        label: what the chart shows, for screen readers.
        x_label: the x axis title.
        width: view box width (the chart scales to its container).
        height: view box height.

    Returns:
        The ``<svg>`` element as text.
    """
    series = {name: sorted(points) for name, points in series.items() if points}
    left, right, top, bottom = 56, 16, 24 if len(series) > 1 else 12, 40
    plot_w, plot_h = width - left - right, height - top - bottom
    xs = [x for points in series.values() for x, _ in points]
    ys = [y for points in series.values() for _, y in points]
    x_max = max(xs, default=0.0) or 1.0
    x_ticks = [x for x in _ticks(x_max, 5) if x <= x_max * (1 + 1e-9)]  # the x axis ends at the last sample
    y_ticks = _ticks(max(ys, default=1.0), 4)

    def px(x: float) -> float:
        return round(left + plot_w * x / x_max, 1)

    def py(y: float) -> float:
        return round(top + plot_h * (1 - y / y_ticks[-1]), 1)

    parts = [_svg_open(width, height, label)]
    for y in y_ticks:
        parts.append(f'<line x1="{left}" x2="{width - right}" y1="{py(y)}" y2="{py(y)}" stroke="#e5e7eb"/>')
        parts.append(_text(left - 6, py(y) + 4, _fmt(y), anchor="end"))
    for x in x_ticks:
        parts.append(_text(px(x), height - bottom + 16, _fmt(x), anchor="middle"))
    parts.append(f'<line x1="{left}" x2="{left}" y1="{top}" y2="{top + plot_h}" stroke="#9ca3af"/>')
    parts.append(
        f'<line x1="{left}" x2="{width - right}" y1="{top + plot_h}" y2="{top + plot_h}" stroke="#9ca3af"/>'
    )
    parts.append(_text(left + plot_w / 2, height - 6, x_label, anchor="middle"))
    if not series:
        parts.append(_text(left + plot_w / 2, top + plot_h / 2, "no samples in this report", anchor="middle"))
    for i, (name, points) in enumerate(series.items()):
        color = COLORS[i % len(COLORS)]
        coords = " ".join(f"{px(x)},{py(y)}" for x, y in points)
        parts.append(
            f'<polyline class="series" fill="none" stroke="{color}" stroke-width="2" '
            f'stroke-linejoin="round" points="{coords}"><title>{html.escape(name)}</title></polyline>'
        )
        if len(points) == 1:
            parts.append(f'<circle cx="{px(points[0][0])}" cy="{py(points[0][1])}" r="3" fill="{color}"/>')
        if len(series) > 1:
            x = left + 8 + 120 * i
            parts.append(f'<rect x="{x}" y="6" width="12" height="4" fill="{color}"/>')
            parts.append(_text(x + 16, 12, name))
    parts.append("</svg>")
    return "".join(parts)


def bar_chart(*, bars: list[tuple[str, float]], label: str, unit: str = "s", width: int = 560) -> str:
    """An SVG horizontal bar chart, one labelled bar per (name, value).

    Args:
        bars: (name, value) in display order.
        label: what the chart shows, for screen readers.
        unit: appended to each value.
        width: view box width.

    Returns:
        The ``<svg>`` element as text.
    """
    row, top = 36, 8
    height = top + row * max(len(bars), 1) + 8
    peak = max((value for _, value in bars), default=0.0) or 1.0
    parts = [_svg_open(width, height, label)]
    if not bars:
        parts.append(_text(width / 2, height / 2 + 4, "no stage times in this report", anchor="middle"))
    for i, (name, value) in enumerate(bars):
        y = top + row * i
        bar_w = round(max(value / peak, 0.002) * (width - 90), 1)
        short = name if len(name) <= 72 else name[:69] + "..."
        parts.append(_text(0, y + 11, short))
        parts.append(
            f'<rect class="bar" x="0" y="{y + 15}" width="{bar_w}" height="14" rx="2" '
            f'fill="{COLORS[0]}"><title>{html.escape(name)}: {_fmt(value)} {unit}</title></rect>'
        )
        parts.append(_text(bar_w + 6, y + 26, f"{_fmt(value)} {unit}"))
    parts.append("</svg>")
    return "".join(parts)


def _svg_open(width: int, height: int, label: str) -> str:
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" width="{width}" '
        f'height="{height}" role="img" aria-label="{html.escape(label)}" font-family="system-ui, sans-serif" '
        f'font-size="13" fill="#374151">'
    )


def _text(x: float, y: float, text: str, *, anchor: str = "start") -> str:
    return f'<text x="{round(x, 1)}" y="{round(y, 1)}" text-anchor="{anchor}">{html.escape(text)}</text>'


def charts(report: dict[str, Any]) -> list[tuple[str, str]]:
    """Every chart of a run as (caption, svg): throughput, stage times, memory, CPU, and batching
    (batch size / token budget over time) when the report has it."""
    data = chart_data(report)
    out = [
        (
            "Throughput over time",
            line_chart(series=data["throughput"], label="Documents and chunks per second"),
        ),
        ("Time per stage", bar_chart(bars=data["stages"], label="Wall time of each pipeline stage")),
        ("Memory over time (RSS, MB)", line_chart(series={"RSS MB": data["memory"]}, label="Memory in MB")),
        ("CPU use over time (%)", line_chart(series={"CPU %": data["cpu"]}, label="CPU use in percent")),
    ]
    if data["batching"]:
        names = ", ".join(_title(key) for key in data["batching"])
        out.append(
            (f"Batch size / token budget over time ({names})",
             line_chart(series={_title(k): v for k, v in data["batching"].items()}, label=names))
        )  # fmt: skip
    return out


def _title(key: str) -> str:
    return key.replace("_", " ")


# ---------------------------------------------------------------------------------------------
# HTML


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _number(value: Any, spec: str = ",.0f", suffix: str = "") -> str:
    number = _num(value)
    return "–" if number is None else f"{number:{spec}}{suffix}"


def _when(started_at: Any) -> str:
    stamp = _num(started_at)
    if stamp is None:
        return "–"
    return datetime.fromtimestamp(stamp, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def runs_table(rows: list[dict[str, Any]], *, link_prefix: str = "/runs/") -> str:
    """An HTML table of run summaries (see :func:`list_runs`), each run linking to its page."""
    if not rows:
        return '<p class="muted">No ingest runs found in this db yet.</p>'
    head = (
        "<tr><th>run</th><th>started</th><th class=num>docs seen</th><th class=num>ingested</th>"
        "<th class=num>unchanged</th><th class=num>failed</th><th class=num>docs/min</th>"
        "<th class=num>tokens/s</th><th class=num>peak RSS</th><th class=num>cost/doc</th></tr>"
    )
    body = []
    for row in rows:
        run_id = row["run_id"]
        name = (
            f'<a href="{_e(link_prefix + run_id)}">{_e(run_id)}</a>'
            if RUN_ID.fullmatch(run_id)
            else _e(run_id)
        )
        body.append(
            f'<tr class="run"><td>{name}</td><td>{_when(row["started_at"])}</td>'
            f"<td class=num>{_number(row['docs_seen'])}</td>"
            f"<td class=num>{_number(row['docs_ingested'])}</td>"
            f"<td class=num>{_number(row['docs_unchanged'])}</td>"
            f"<td class=num>{_number(row['docs_failed'])}</td>"
            f"<td class=num>{_number(row['docs_per_min'], ',.1f')}</td>"
            f"<td class=num>{_number(row['tokens_per_s'], ',.0f')}</td>"
            f"<td class=num>{_number(row['peak_rss_mb'], ',.0f', ' MB')}</td>"
            f"<td class=num>{_cost(row['cost_per_doc_usd'])}</td></tr>"
        )
    table = f'<table id="runs"><thead>{head}</thead><tbody>{"".join(body)}</tbody></table>'
    return f'<div class="table-wrap">{table}</div>'


def _cost(value: Any) -> str:
    number = _num(value)
    return "–" if number is None else f"${number:.3g}"


def run_fragment(report: dict[str, Any]) -> str:
    """The body of a run page: headline numbers, every chart, and the failed documents with reasons."""
    row = run_summary(report)
    throughput = report.get("throughput") or {}
    resources = report.get("resources") or {}
    cards = [
        ("docs seen", _number(row["docs_seen"])),
        ("ingested", _number(row["docs_ingested"])),
        ("unchanged", _number(row["docs_unchanged"])),
        ("failed", _number(row["docs_failed"])),
        ("chunks written", _number((report.get("chunks") or {}).get("written"))),
        ("wall time", _number(row["wall_s"], ",.1f", " s")),
        ("docs/min", _number(row["docs_per_min"], ",.1f")),
        ("chunks/s", _number(throughput.get("chunks_per_s"), ",.1f")),
        ("tokens/s", _number(row["tokens_per_s"], ",.0f")),
        ("peak RSS", _number(row["peak_rss_mb"], ",.0f", " MB")),
        ("CPU use", _number(resources.get("cpu_util_pct"), ".0f", "%")),
        ("cost per doc", _cost(row["cost_per_doc_usd"])),
    ]
    parts = [
        f"<h1>Ingest run {_e(row['run_id'])}</h1>",
        f'<p class="muted">started {_when(row["started_at"])}'
        + (f" · model {_e(report['model'])}" if report.get("model") else "")
        + (f" · source {_e(report['source'])}" if report.get("source") else "")
        + "</p>",
        '<section class="cards" aria-label="Headline numbers">',
        *(
            f'<div class="card"><div class="label">{_e(k)}</div><div class="value">{v}</div></div>'
            for k, v in cards
        ),
        "</section>",
        '<h2>Charts</h2><section class="charts">',
        *(
            f'<figure class="chart"><figcaption>{_e(cap)}</figcaption>{svg}</figure>'
            for cap, svg in charts(report)
        ),
        "</section>",
        _failures_table(report.get("failures") or []),
    ]
    return "\n".join(parts)


def _failures_table(failures: list[dict[str, Any]]) -> str:
    if not failures:
        return '<h2>Failed documents</h2><p class="muted" id="no-failures">No document failed.</p>'
    rows = "".join(
        f'<tr class="failure"><td>{_e(f.get("doc_id"))}</td><td>{_e(f.get("source"))}</td>'
        f'<td class="reason">{_e(f.get("reason"))}</td></tr>'
        for f in failures[:MAX_FAILURE_ROWS]
    )
    more = len(failures) - MAX_FAILURE_ROWS
    note = f'<p class="muted">... and {more} more in the report file.</p>' if more > 0 else ""
    return (
        f"<h2>Failed documents ({len(failures)})</h2>"
        '<div class="table-wrap"><table id="failures"><thead><tr><th>doc_id</th><th>source</th>'
        f"<th>reason</th></tr></thead><tbody>{rows}</tbody></table></div>{note}"
    )


def page(*, title: str, body: str, script: str = "", css: str = "", nav: bool = True, attrs: str = "") -> str:
    """A whole self-contained HTML document: inline CSS (and script), no outside requests.

    Args:
        title: the document title (escaped here).
        body: the inside of ``<main>``, already safe HTML.
        script: inline JavaScript, if any.
        css: more inline CSS after the shared style sheet.
        nav: links to the search page and the runs list (off for a standalone file).
        attrs: extra attributes of ``<body>``, already safe.

    Returns:
        The document as text.
    """
    links = '<a href="/">Search</a> <a href="/runs">Ingest runs</a>' if nav else ""
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<link rel="icon" href="data:,"><title>{_e(title)}</title><style>{CSS}{css}</style></head>'
        f'<body{" " + attrs if attrs else ""}><header class="top">'
        f'<a class="brand" href="{"/" if nav else "#"}">embedpipe</a>{links}</header><main>{body}</main>'
        + (f"<script>{script}</script>" if script else "")
        + "</body></html>"
    )


def run_page(report: dict[str, Any], *, nav: bool = False) -> str:
    """A run's whole page as one standalone HTML file (what ``embedpipe report --html`` writes)."""
    return page(title=f"embedpipe run {report.get('run_id', '')}", body=run_fragment(report), nav=nav)


# ---------------------------------------------------------------------------------------------
# PNG


def write_png(report: dict[str, Any], path: str | Path) -> None:
    """Draw a run's charts into one PNG image with matplotlib (Agg: no display needed).

    Args:
        report: the run report.
        path: the image file to write.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    data = chart_data(report)
    fig, axes = plt.subplots(2, 2, figsize=(12, 7.5), layout="constrained")
    fig.suptitle(f"embedpipe ingest run {report.get('run_id', '')}")
    ax = axes[0][0]
    for name, points in data["throughput"].items():
        ax.plot(*zip(*points, strict=True), label=name)
    _axes(ax, "Throughput over time", "per second", legend=bool(data["throughput"]))
    ax = axes[0][1]
    if data["stages"]:
        names = [n if len(n) <= 40 else n[:37] + "..." for n, _ in data["stages"]]
        ax.barh(range(len(names)), [v for _, v in data["stages"]], color=COLORS[0])
        ax.set_yticks(range(len(names)), names, fontsize=8)
        ax.invert_yaxis()
    ax.set_title("Time per stage")
    ax.set_xlabel("seconds")
    ax = axes[1][0]
    if data["memory"]:
        ax.plot(*zip(*data["memory"], strict=True), color=COLORS[0], label="RSS MB")
    cpu_ax = ax.twinx()
    if data["cpu"]:
        cpu_ax.plot(*zip(*data["cpu"], strict=True), color=COLORS[1], label="CPU %")
    cpu_ax.set_ylabel("CPU %")
    cpu_ax.set_ylim(bottom=0)
    _axes(ax, "Memory and CPU over time", "RSS MB", legend=False)
    lines = ax.get_lines() + cpu_ax.get_lines()
    if lines:
        ax.legend(lines, [line.get_label() for line in lines], loc="lower right", fontsize=8)
    ax = axes[1][1]
    if data["batching"]:
        for name, points in data["batching"].items():
            ax.plot(*zip(*points, strict=True), label=_title(name))
        _axes(ax, "Batch size / token budget over time", "", legend=True)
    else:
        docs = report.get("docs") or {}
        names = ["ingested", "unchanged", "failed"]
        ax.bar(names, [_num(docs.get(n)) or 0 for n in names], color=COLORS[:3])
        ax.set_title("Documents")
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _axes(ax: Any, title: str, y_label: str, *, legend: bool) -> None:
    ax.set_title(title)
    ax.set_xlabel("seconds since start")
    ax.set_ylabel(y_label)
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    if legend:
        ax.legend(loc="best", fontsize=8)
