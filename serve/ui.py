"""The service's web pages: the search page, the list of ingest runs and each run's dashboard.

Every page is one self-contained HTML document (inline CSS and script from serve/static/, no CDN, nothing
to build). The pages hold no data, so they load without the API key (serve/guard.py lets them through);
their scripts fetch the data (POST /search, GET /api/runs, GET /api/runs/{run_id}) with the key the user
types, kept in the browser tab's sessionStorage only. The Router deployment routes to these functions.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import html
from pathlib import Path
from typing import Any

from fastapi import HTTPException
from fastapi.responses import HTMLResponse

from pipelines.reporting import pages
from pipelines.store import Location

STATIC = Path(__file__).with_name("static")


@functools.cache
def _asset(name: str) -> str:
    return (STATIC / name).read_text()


def _csp(script: str) -> str:
    # Only this page's own inline script may run, and it may only talk to this origin.
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    return (
        f"default-src 'none'; script-src 'sha256-{digest}'; style-src 'unsafe-inline'; connect-src 'self'; "
        "img-src 'self' data:; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
    )


def _page(
    *, title: str, body: str, script: str, auth: bool, source: str = "", status: int = 200
) -> HTMLResponse:
    script = _asset("common.js") + "\n" + _asset(script)
    attrs = f'data-auth="{"required" if auth else "none"}"'
    if source:
        attrs += f' data-source="{html.escape(source)}"'
    document = pages.page(
        title=title, body=_asset("key.html") + body, script=script, css=_asset("ui.css"), attrs=attrs
    )
    headers = {
        "Content-Security-Policy": _csp(script),
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
    }
    return HTMLResponse(document, status_code=status, headers=headers)


def search_page(*, auth: bool, default_mode: str = "vector", max_k: int = 300) -> HTMLResponse:
    """The search page: query, k, mode and filter; results with highlighted snippets.

    Args:
        auth: whether the service wants an API key (the page then asks for one).
        default_mode: the mode selected at first (the service's default).
        max_k: the largest k the service answers.
    """
    form = _asset("search.html").replace("{max_k}", str(int(max_k)))
    for mode in ("vector", "text", "hybrid"):
        form = form.replace("{" + mode + "}", " selected" if mode == default_mode else "")
    return _page(title="embedpipe search", body=form, script="search.js", auth=auth)


def runs_page(*, auth: bool) -> HTMLResponse:
    """The list of ingest runs (its data comes from GET /api/runs)."""
    body = '<h1>Ingest runs</h1><div id="error" class="error" role="alert" hidden></div>'
    body += '<div id="run-data"></div>'
    return _page(title="embedpipe ingest runs", body=body, script="runs.js", auth=auth, source="/api/runs")


def run_page(*, run_id: str, auth: bool) -> HTMLResponse:
    """One run's dashboard (its data comes from GET /api/runs/{run_id}); 404 for an impossible id."""
    error = '<div id="error" class="error" role="alert" hidden></div>'
    try:
        pages.check_run_id(run_id)
    except ValueError as exc:
        body = f'<h1>No such run</h1><div class="error" role="alert">{html.escape(str(exc))}</div>'
        return _page(title="embedpipe: no such run", body=body, script="runs.js", auth=auth, status=404)
    body = f'<p><a href="/runs">← all runs</a></p>{error}<div id="run-data"></div>'
    return _page(
        title=f"embedpipe run {run_id}", body=body, script="runs.js", auth=auth, source=f"/api/runs/{run_id}"
    )


def runs_data(*, db: str | Location | None) -> dict[str, Any]:
    """GET /api/runs: every run's headline numbers, and the same as an HTML table for the page."""
    rows = pages.list_runs(db=db) if db else []
    return {"runs": rows, "html": pages.runs_table(rows)}


def run_data(*, db: str | Location | None, run_id: str) -> dict[str, Any]:
    """GET /api/runs/{run_id}: the run report, and its dashboard as an HTML fragment for the page."""
    try:
        if not db:
            raise FileNotFoundError(f"No run {run_id!r}: this service was started without a db path.")
        report = pages.load_run(db=db, run_id=run_id)
    except (ValueError, FileNotFoundError) as exc:
        raise HTTPException(404, str(exc)) from None
    return {"run": report, "html": pages.run_fragment(report)}
