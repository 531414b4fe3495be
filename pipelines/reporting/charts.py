"""A run's charts: each drawn once with matplotlib, written as inline SVG for the pages or as one PNG.

:func:`charts` lists what a report can show (throughput, time per stage, memory, CPU, and batching when
the report has it); each chart draws itself into a matplotlib figure. :func:`svg` writes one chart for
an HTML page (text kept as text, scaled by its ``viewBox``), :func:`write_png` tiles them all into
the image ``embedpipe report --png`` writes.

matplotlib is imported inside the functions that draw: the Serve router imports the pages for its search
page, and loads matplotlib only when it renders a run.
"""

from __future__ import annotations

import bisect
import contextlib
import html
import io
import math
import re
import textwrap
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import FigureBase

COLORS = ("#2563eb", "#d97706", "#059669", "#db2777")
INK, MUTED, AXIS, GRID = "#374151", "#6b7280", "#9ca3af", "#e5e7eb"
WIDTH_IN = 5.0  # a chart's width; a page scales it to its column, so text keeps this share of the width
LINE_HEIGHT_IN = 2.2
FONT_PT = 10.0
PNG_DPI = 120  # two charts side by side: 1200 px wide
STYLE = {
    "svg.fonttype": "none",  # text stays text: small, selectable, drawn in the page's own font
    "text.parse_math": False,  # a "$" in a stage name is a dollar sign, not mathtext
    "font.family": ["sans-serif"],
    "font.sans-serif": ["DejaVu Sans"],  # the PNG's font, and the one the SVG's text is measured with
    "font.size": FONT_PT,
    "text.color": INK,
    "axes.labelcolor": INK,
    "axes.edgecolor": AXIS,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "xtick.color": AXIS,
    "ytick.color": AXIS,
    "xtick.labelcolor": INK,
    "ytick.labelcolor": INK,
    "ytick.major.size": 0,
    "grid.color": GRID,
    "grid.linewidth": 0.8,
    "legend.frameon": False,
    "legend.fontsize": FONT_PT,
    "figure.facecolor": "white",
}
# rcParams are global: drawing holds this lock, so two pages rendered at once in a server's threads
# cannot mix their settings.
_LOCK = threading.Lock()


@dataclass(frozen=True)
class Chart:
    """One chart of a run: lines of (seconds since start, value) by name, or (name, seconds) bars."""

    key: str  # unique on a page: it names the chart's ids
    caption: str
    label: str  # what it shows, for screen readers
    lines: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    bars: list[tuple[str, float]] | None = None

    @property
    def height(self) -> float:
        """Inches: a line chart's fixed height, or what the bars and their names need."""
        if self.bars is None:
            return LINE_HEIGHT_IN
        rows = sum(len(_wrap(name)) * 1.15 + 1.85 for name, _ in self.bars) if self.bars else 3.0
        return round(0.1 + rows * FONT_PT * 1.2 / 72, 2)  # a text line is 1.2 font sizes tall

    def tooltips(self) -> dict[str, str]:
        """What each line or bar says when the pointer rests on it, by the id ``draw`` gives it."""
        if self.bars is not None:
            return {
                f"{self.key}-bar-{i}": f"{name}: {_fmt(value)} s" for i, (name, value) in enumerate(self.bars)
            }
        drawn = [(name, points) for name, points in self.lines.items() if points]
        return {f"{self.key}-series-{i}": _summary(name, points) for i, (name, points) in enumerate(drawn)}

    def draw(self, fig: FigureBase) -> None:
        """Draw into ``fig``, a matplotlib figure or subfigure."""
        if self.bars is None:
            _line(fig, self.lines, key=self.key)
        else:
            _bars(fig, self.bars, key=self.key)


def _summary(name: str, points: list[tuple[float, float]]) -> str:
    return f"{name}: last {_fmt(max(points)[1])}, peak {_fmt(max(y for _, y in points))}"


def charts(report: dict[str, Any]) -> list[Chart]:
    """Every chart of a run, in page order: throughput, stage times, memory, CPU, and batching (batch size
    / token budget over time) when the report has it."""
    data = chart_data(report)
    out = [
        Chart("throughput", "Throughput over time", "Documents and chunks per second", data["throughput"]),
        Chart("stages", "Time per stage", "Wall time of each pipeline stage", bars=data["stages"]),
        Chart("memory", "Memory over time (RSS, MB)", "Memory in MB", {"RSS MB": data["memory"]}),
        Chart("cpu", "CPU use over time (%)", "CPU use in percent", {"CPU %": data["cpu"]}),
    ]
    if data["batching"]:
        lines = {_title(key): points for key, points in data["batching"].items()}
        names = ", ".join(lines)
        out.append(Chart("batching", f"Batch size / token budget over time ({names})", names, lines))
    return out


def svg(chart: Chart) -> str:
    """One chart as an ``<svg>`` element to put inside an HTML page.

    Returns:
        SVG text without XML prolog: it fills its container's width (``viewBox``, height from the aspect
        ratio), is named for screen readers by its ``<title>``, keeps its text as escaped text, makes
        the ids it references unique to this chart, and refers to nothing outside itself.
    """
    from matplotlib.figure import Figure

    out = io.StringIO()
    with _drawing(salt=chart.key):
        fig = Figure(figsize=(WIDTH_IN, chart.height), layout="constrained")
        chart.draw(fig)
        metadata = {"Title": chart.label, "Date": None, "Creator": None, "Format": None, "Type": None}
        fig.savefig(out, format="svg", metadata=metadata)
    return _inline(out.getvalue(), key=chart.key, tooltips=chart.tooltips())


def write_png(report: dict[str, Any], path: str | Path) -> None:
    """Draw a run's charts into one PNG image, two charts a row, each under its caption.

    Args:
        report: the run report.
        path: the image file to write.
    """
    from matplotlib.figure import Figure

    items = charts(report)
    captions = {chart.key: "\n".join(textwrap.wrap(chart.caption, 56)) for chart in items}
    rows = [items[i : i + 2] for i in range(0, len(items), 2)]
    heights = [
        max(chart.height + 0.25 * (1 + captions[chart.key].count("\n")) for chart in row) for row in rows
    ]
    with _drawing(salt="png"):
        fig = Figure(figsize=(2 * WIDTH_IN, sum(heights) + 0.4), layout="constrained")
        fig.get_layout_engine().set(w_pad=0.12, h_pad=0.08)
        fig.suptitle(f"embedpipe ingest run {report.get('run_id', '')}", fontsize=FONT_PT * 1.3)
        cells = fig.subfigures(len(rows), 2, height_ratios=heights, squeeze=False)
        for row, cell_row in zip(rows, cells, strict=False):
            for chart, cell in zip(row, cell_row, strict=False):
                cell.suptitle(captions[chart.key], fontweight="bold", fontsize=FONT_PT * 1.1)
                chart.draw(cell)
        fig.savefig(path, dpi=PNG_DPI)


@contextlib.contextmanager
def _drawing(*, salt: str) -> Iterator[None]:
    import matplotlib

    with _LOCK, matplotlib.rc_context({**STYLE, "svg.hashsalt": salt}):
        yield


def _inline(text: str, *, key: str, tooltips: dict[str, str]) -> str:
    """matplotlib's SVG file made fit to sit in a page beside other charts, and smaller; each named line
    or bar gets its ``<title>`` (the browser's tooltip)."""
    text = text[text.index("<svg") :]  # no XML prolog or DOCTYPE inside HTML
    # The RDF metadata names outside vocabularies (the title stays, as <title>); a <style> in an inline
    # SVG would style the whole page (the root's attributes below do its job).
    text = re.sub(r"<metadata>.*?</metadata>", "", text, count=1, flags=re.DOTALL)
    text = re.sub(r"<defs>\s*<style[^>]*>[^<]*</style>\s*</defs>", "", text, count=1)
    out, groups = [], []
    for part in re.split(r"(<[^>]*>)", text):  # tags, and text between them (escaped: no "<" in it)
        if not part.startswith("<"):
            out.append(part if part.strip() else "")
        elif part.startswith("<svg "):
            view_box = re.search(r'viewBox="([^"]+)"', part).group(1)
            out.append(
                f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="{view_box}" width="100%" role="img" '
                'stroke-linejoin="round" stroke-linecap="butt">'
            )
        elif part.startswith("<g"):  # matplotlib's own group ids (figure_1, axes_1...) repeat per chart:
            plain = bool(re.fullmatch(r'<g(?: id="[^"]*")?/?>', part)) and f'id="{key}-' not in part
            if not part.endswith("/>"):
                groups.append(plain)
            out.append("" if plain else part)  # keep only the groups this module named
            named = re.match(r'<g id="([^"]+)"', part)
            if named and named.group(1) in tooltips and not part.endswith("/>"):
                out.append(f"<title>{html.escape(tooltips[named.group(1)])}</title>")
        elif part == "</g>":
            out.append("" if groups.pop() else part)
        else:
            out.append(_tag(part))
    return "".join(out)


def _tag(tag: str) -> str:
    tag = tag.replace(" xlink:href=", " href=")  # SVG 2: no xlink namespace needed
    tag = re.sub(r' transform="rotate\(-0 [^"]*\)"', "", tag)
    # Text inherits the page's font (measured with DejaVu Sans, wider than most: nothing clips).
    tag = re.sub(r"font-family: [^;\"]*(; )?", "", tag) if tag.startswith("<text ") else tag
    return re.sub(r' (d|x|y|width|height|transform)="([^"]*)"', _round_attribute, tag)


def _round_attribute(match: re.Match[str]) -> str:
    # A tenth of a point is finer than a pixel at any width a page shows a chart.
    value = re.sub(r"\d+\.\d+", lambda m: f"{float(m.group()):.1f}".rstrip("0").rstrip("."), match.group(2))
    return f' {match.group(1)}="{" ".join(value.split())}"'


# ---------------------------------------------------------------------------------------------
# Drawing: one function per kind of chart, into any matplotlib figure or subfigure.


def _line(fig: FigureBase, series: dict[str, list[tuple[float, float]]], *, key: str) -> None:
    """Lines of (seconds since start, value) on shared axes from 0, with a legend above for two or more."""
    from matplotlib.ticker import FuncFormatter

    ax = fig.add_subplot()
    series = {name: sorted(points) for name, points in series.items() if points}
    lines = []
    for i, points in enumerate(series.values()):
        xs, ys = zip(*points, strict=True)
        marker = "o" if len(points) == 1 else None
        lines += ax.plot(xs, ys, color=COLORS[i % len(COLORS)], linewidth=1.6, marker=marker, markersize=4)
        lines[-1].set_gid(f"{key}-series-{i}")
    x_max = max((x for points in series.values() for x, _ in points), default=0.0) or 1.0
    y_top = _ticks(max((y for points in series.values() for _, y in points), default=1.0), 4)
    ax.set_xticks([x for x in _ticks(x_max, 5) if x <= x_max * (1 + 1e-9)])  # ends at the last sample
    ax.set_yticks(y_top)
    ax.set_xlim(0, x_max)
    ax.set_ylim(0, y_top[-1])
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: _fmt(value)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: _fmt(value)))
    ax.grid(axis="y")
    ax.set_axisbelow(True)
    ax.set_xlabel("seconds since start", color=MUTED)
    if not series:
        _note(ax, "no samples in this report")
    if len(series) > 1:
        ax.legend(
            lines, list(series), loc="lower left", bbox_to_anchor=(0, 1), ncols=len(series),
            handlelength=1.2, columnspacing=1.5, borderaxespad=0.2, borderpad=0,
        )  # fmt: skip


def _bars(fig: FigureBase, bars: list[tuple[str, float]], *, key: str, unit: str = "s") -> None:
    """Horizontal bars, one a row, each under its full name (long names wrap) and ending in its value."""
    ax = fig.add_subplot()
    ax.set_axis_off()
    if not bars:
        _note(ax, "no stage times in this report")
        return
    peak = max(value for _, value in bars) or 1.0
    y = 0.0
    for i, (name, value) in enumerate(bars):
        lines = _wrap(name)
        ax.text(0, y, "\n".join(lines), va="top", ha="left", linespacing=1.15)
        y += len(lines) * 1.15 + 0.15
        bar = ax.barh(y + 0.55, max(value, peak * 0.002), height=1.1, left=0, color=COLORS[0])
        bar.patches[0].set_gid(f"{key}-bar-{i}")
        ax.text(value + peak * 0.01, y + 0.55, f"{_fmt(value)} {unit}", va="center", ha="left")
        y += 1.1 + 0.6
    ax.set_xlim(0, peak * 1.2)  # room after the longest bar for its value
    ax.set_ylim(y - 0.4, 0)


def _wrap(name: str) -> list[str]:
    """A stage name in lines that fit a chart's width, broken after "->" where it can be, else anywhere."""
    from matplotlib.font_manager import FontProperties
    from matplotlib.textpath import TextToPath

    font, measure, room = FontProperties(family="DejaVu Sans", size=FONT_PT), TextToPath(), WIDTH_IN * 72 - 12
    rest = name if len(name) <= 300 else name[:297] + "..."
    lines = []
    while rest:
        low, high = 1, len(rest)  # the longest prefix that fits: at least one character a line
        while low < high:
            mid = (low + high + 1) // 2
            fits = measure.get_text_width_height_descent(rest[:mid], font, ismath=False)[0] <= room
            low, high = (mid, high) if fits else (low, mid - 1)
        arrow = rest.rfind("->", 0, low)
        cut = low if low == len(rest) or arrow < 0 else arrow + 2
        lines.append(rest[:cut])
        rest = rest[cut:]
    return lines or [""]


def _note(ax: Axes, text: str) -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", color=MUTED)


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


def _title(key: str) -> str:
    return key.replace("_", " ")


# ---------------------------------------------------------------------------------------------
# Chart data: what every chart draws, from whatever the report holds.


def chart_data(report: dict[str, Any]) -> dict[str, Any]:
    """The series every chart draws, from whatever the report holds.

    Returns:
        ``throughput``: {series: [(t, per second)]}; ``stages``: [(name, wall_s)];
        ``memory`` and ``cpu``: [(t, value)]; ``batching``: {field: [(t, value)]}.
    """
    resources = report.get("resources") or {}
    timeline = [p for p in resources.get("timeline") or [] if finite(p.get("t")) is not None]
    stages = [
        (str(name), float(stats.get("wall_s") or 0.0))
        for name, stats in (report.get("stages") or {}).items()
        if isinstance(stats, dict)
    ]
    batching: dict[str, list[tuple[float, float]]] = {}
    for point in (report.get("batching") or {}).get("timeline") or []:
        t = finite(point.get("t"))
        for key, value in point.items():
            if key != "t" and t is not None and finite(value) is not None:
                batching.setdefault(key, []).append((t, float(value)))
    return {
        "throughput": _rates(report.get("progress") or [], ("docs", "chunks")),
        "stages": stages,
        "memory": [
            (float(p["t"]), float(p["rss_mb"])) for p in timeline if finite(p.get("rss_mb")) is not None
        ],
        "cpu": [
            (float(p["t"]), float(p["cpu_pct"])) for p in timeline if finite(p.get("cpu_pct")) is not None
        ],
        "batching": dict(sorted(batching.items(), key=lambda kv: (kv[0] != "token_budget", kv[0]))),
    }


def finite(value: Any) -> float | None:
    """``value`` as a float when it is a finite number (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def _rates(progress: list[dict[str, Any]], keys: tuple[str, ...]) -> dict[str, list[tuple[float, float]]]:
    """Per-second rates of cumulative counters, over up to 30 equal time bins.

    Blocks finish in bursts, so rates between consecutive points would be spikes; equal bins show
    the pace the run kept.
    """
    points = sorted((p for p in progress if finite(p.get("t")) is not None), key=lambda p: p["t"])
    if not points or points[-1]["t"] <= 0:
        return {}
    times = [float(p["t"]) for p in points]
    bins = max(1, min(30, len(points)))
    width = times[-1] / bins
    rates = {}
    for key in keys:
        values = [finite(p.get(key)) for p in points]
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
