"""Run dashboards: a run report -> an HTML page with inline SVG charts, and a PNG of the same charts.

Pure functions over the report dict (see report.build_report), shared by the Serve pages and
``embedpipe report``. Any optional field may be missing, so an old or partial report still renders.
The pages come from the Jinja2 templates in ``templates/``, which escape every string they insert (the
Serve pages insert these fragments as they are); the charts come from :mod:`.charts`.
"""

from __future__ import annotations

import json
import logging
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jinja2

from pipelines.reporting import charts
from pipelines.store import RUNS_DIR, location

logger = logging.getLogger(__name__)

# Run ids as ingest makes them (20250101T120000Z-a1b2c3); the first character may not be a dot,
# so no id can name a parent folder or a hidden file.
RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
MAX_FAILURE_ROWS = 500


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
# HTML, from the templates


def _number(value: Any, spec: str = ",.0f", suffix: str = "") -> str:
    number = charts.finite(value)
    return "–" if number is None else f"{number:{spec}}{suffix}"


def _when(started_at: Any) -> str:
    stamp = charts.finite(started_at)
    if stamp is None:
        return "–"
    return datetime.fromtimestamp(stamp, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _cost(value: Any) -> str:
    number = charts.finite(value)
    return "–" if number is None else f"${number:.3g}"


_TEMPLATES = jinja2.Environment(
    loader=jinja2.PackageLoader("pipelines.reporting"),
    autoescape=True,
    trim_blocks=True,
    lstrip_blocks=True,
    finalize=lambda value: "" if value is None else value,  # a missing field shows as nothing, not "None"
)
_TEMPLATES.filters.update(number=_number, when=_when, cost=_cost)
_TEMPLATES.tests["run_id"] = lambda value: isinstance(value, str) and bool(RUN_ID.fullmatch(value))


def runs_table(rows: list[dict[str, Any]], *, link_prefix: str = "/runs/") -> str:
    """An HTML table of run summaries (see :func:`list_runs`), each run linking to its page."""
    return _TEMPLATES.get_template("runs.html").render(rows=rows, link_prefix=link_prefix)


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
    return _TEMPLATES.get_template("run.html").render(
        report=report,
        row=row,
        cards=cards,
        charts=[(chart.caption, charts.svg(chart)) for chart in charts.charts(report)],
        failures=report.get("failures") or [],
        max_rows=MAX_FAILURE_ROWS,
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
    return _TEMPLATES.get_template("page.html").render(
        title=title, body=body, script=script, css=css, nav=nav, attrs=attrs
    )


def run_page(report: dict[str, Any], *, nav: bool = False) -> str:
    """A run's whole page as one standalone HTML file (what ``embedpipe report --html`` writes)."""
    return page(title=f"embedpipe run {report.get('run_id', '')}", body=run_fragment(report), nav=nav)


def write_png(report: dict[str, Any], path: str | Path) -> None:
    """Draw a run's charts into one PNG image (see :func:`.charts.write_png`).

    Args:
        report: the run report.
        path: the image file to write.
    """
    charts.write_png(report, path)
