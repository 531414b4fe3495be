"""Run dashboards without a browser or Ray: report dict -> HTML with SVG charts, PNG, and the CLI."""

import json
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from html.parser import HTMLParser
from pathlib import Path

import pytest
from markupsafe import escape
from typer.testing import CliRunner

from pipelines.cli import app
from pipelines.reporting import charts, pages
from pipelines.reporting.report import build_report

EVIL = '<script>alert("x")</script><img src=x onerror=alert(1)>'


def _report(run_id: str = "20250101T120000Z-a1b2c3", started_at: float = 1735732800.0, **extra) -> dict:
    report = build_report(
        run_id=run_id,
        source="/data/corpus.jsonl",
        db="/data/db",
        model="sentence-transformers/all-MiniLM-L6-v2",
        wall_s=40.0,
        counts={
            "started_at": started_at, "chunks": 300, "tokens": 60000, "ingested": 95, "unchanged": 3,
            "failed": [[EVIL, "corpus.jsonl", f"bad {EVIL}"], ["doc-2", "corpus.jsonl", "line 7: not JSON"]],
        },
        resources={
            "peak_rss_mb": 2100.0, "cpu_util_pct": 87.5, "cpu_count": 2,
            "timeline": [{"t": t, "rss_mb": 1000.0 + 20 * t, "cpu_pct": 90.0} for t in range(1, 40)],
        },
        stages={
            "ReadJsonl": {"wall_s": 0.8}, "MapBatches(chunk_docs)->MapBatches(Embedder)": {"wall_s": 35.2},
            "MapBatches(<lambda>)": {"wall_s": 2.5},
        },
        shards={"shard_000": 150, "shard_001": 150},
        config={},
        hourly_usd=3.6,
        timeline=[{"t": 10.0, "chunks": 100, "docs": 30, "tokens": 20000},
                  {"t": 20.0, "chunks": 250, "docs": 80, "tokens": 50000},
                  {"t": 30.0, "chunks": 300, "docs": 100, "tokens": 60000}],
    )  # fmt: skip
    report.update(extra)
    return report


class _Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)


def _tags(text: str) -> list[str]:
    parser = _Tags()
    parser.feed(text)
    return parser.tags


def _svgs(text: str) -> list[ET.Element]:
    chunks = text.split("<svg")[1:]
    return [ET.fromstring("<svg" + chunk.split("</svg>")[0] + "</svg>") for chunk in chunks]


NS = "{http://www.w3.org/2000/svg}"


def _groups(svg: ET.Element, prefix: str) -> list[ET.Element]:
    """The groups charts.py names (series of a line chart, bars of a bar chart)."""
    return [g for g in svg.iter(f"{NS}g") if g.get("id", "").startswith(prefix)]


def _texts(svg: ET.Element) -> list[str]:
    return [t.text or "" for t in svg.iter(f"{NS}text")]


def test_run_page_draws_every_chart_as_svg():
    page = pages.run_page(_report())
    assert (
        page.startswith("<!doctype html>") and "<script" not in page and "http" not in page.split("<main>")[0]
    )
    svgs = _svgs(page)  # each one well-formed XML
    assert len(svgs) == 4
    assert [s.find(f"{NS}title").text for s in svgs] == [
        "Documents and chunks per second", "Wall time of each pipeline stage",
        "Memory in MB", "CPU use in percent",
    ]  # fmt: skip
    for svg in svgs:  # scales to its column: a view box, the full width, no fixed height
        assert svg.get("role") == "img" and svg.get("width") == "100%" and svg.get("height") is None
        assert len(svg.get("viewBox").split()) == 4
    throughput, stages, memory, cpu = svgs
    assert len(_groups(throughput, "throughput-series-")) == 2  # docs/s and chunks/s
    assert {"docs/s", "chunks/s"} <= set(_texts(throughput))  # the legend
    assert len(_groups(stages, "stages-bar-")) == 3
    assert {"ReadJsonl", "35.2 s", "2.5 s"} <= set(_texts(stages))
    assert len(_groups(memory, "memory-series-")) == 1 and len(_groups(cpu, "cpu-series-")) == 1
    # Each bar and line tells its value under the pointer (its group's <title>, the browser's tooltip).
    tips = [g.find(f"{NS}title").text for g in _groups(stages, "stages-bar-")]
    assert tips == [
        "ReadJsonl: 0.8 s",
        "MapBatches(chunk_docs)->MapBatches(Embedder): 35.2 s",
        "MapBatches(<lambda>): 2.5 s",
    ]
    (memory_line,) = _groups(memory, "memory-series-")
    assert memory_line.find(f"{NS}title").text == "RSS MB: last 1780, peak 1780"
    # Round ticks: the y axis up to the first above the highest value (1,780 MB), the x axis to the
    # last sample (39 s); then the axis title.
    x_ticks, y_ticks = ["0", "10", "20", "30"], ["0", "500", "1000", "1500", "2000"]
    assert _texts(memory) == [*x_ticks, "seconds since start", *y_ticks]
    for caption in ("Throughput over time", "Time per stage", "Memory over time", "CPU use over time"):
        assert caption in page
    assert "Batch size" not in page  # no batching in this report
    # 100 docs and 60,000 tokens in 40 s; peak RSS; mean CPU 87.5%
    for card in ("150.0", "1,500", "2,100 MB", "88%"):
        assert f'<div class="value">{card}</div>' in page


def test_inline_svgs_stand_alone_side_by_side():
    """Several charts on one page: their ids are unique, every reference stays inside its own chart,
    text stays text (no embedded glyphs), no <style> leaks into the page, and nothing is fetched."""
    page = pages.run_page(_report(batching={"timeline": [{"t": 1, "token_budget": 8192}]}))
    svgs = _svgs(page)
    ids = [e.get("id") for svg in svgs for e in svg.iter() if e.get("id")]
    assert ids and len(ids) == len(set(ids))
    for svg in svgs:
        own = {e.get("id") for e in svg.iter() if e.get("id")}
        refs = re.findall(r'url\(#([^)]+)\)|href="#([^"]+)"', ET.tostring(svg, encoding="unicode"))
        assert refs and {a or b for a, b in refs} <= own
        assert len(list(svg.iter(f"{NS}text"))) >= 3
    assert page.count("<style") == 1 and "<?xml" not in page and "<!DOCTYPE" not in page
    assert "<metadata" not in page and "DejaVuSans-" not in page
    assert set(re.findall(r"https?://[^\s\"'<>)]*", page)) == {"http://www.w3.org/2000/svg"}


def test_batching_timeline_is_drawn_when_present():
    timeline = [{"t": t, "token_budget": 4096 + 512 * t, "batch_rows": 32 + t, "note": "x"} for t in range(8)]
    page = pages.run_page(_report(batching={"timeline": timeline}))
    svgs = _svgs(page)
    assert len(svgs) == 5
    assert "Batch size / token budget over time (token budget, batch rows)" in page
    assert svgs[-1].find(f"{NS}title").text == "token budget, batch rows"
    assert len(_groups(svgs[-1], "batching-series-")) == 2  # the text field is skipped
    assert {"token budget", "batch rows"} <= set(_texts(svgs[-1]))


def test_report_text_is_escaped():
    stages = {"MapBatches(<lambda>)": {"wall_s": 2.5}, EVIL: {"wall_s": 1.0}, "costs $x^2$": {"wall_s": 1}}
    batching = {"timeline": [{"t": 1.0, EVIL: 5.0}, {"t": 2.0, EVIL: 6.0}]}
    report = _report(run_id="r1", model=EVIL, source=EVIL, stages=stages, batching=batching)
    page = pages.run_page(report)
    assert "<script" not in page and "<img" not in page
    assert str(escape(EVIL)) in page
    assert set(_tags(page)) <= {
        "html", "head", "meta", "link", "title", "style", "body", "header", "a", "main", "h1", "h2", "p",
        "section", "div", "figure", "figcaption", "svg", "g", "path", "text", "use", "defs", "clippath",
        "rect", "table", "thead", "tbody", "tr", "th", "td",
    }  # fmt: skip
    rows = page.split('<table id="failures">')[1]
    assert rows.count('<tr class="failure">') == 2 and "bad &lt;script&gt;" in rows
    assert "MapBatches(&lt;lambda&gt;)" in page  # a stage name in an SVG label
    svgs = _svgs(page)
    stage_text = "".join(_texts(svgs[1]))  # a long name wraps over lines: one <text> each
    assert EVIL.replace(" ", "") in stage_text.replace(" ", "") and "MapBatches(<lambda>)" in stage_text
    assert "costs $x^2$" in _texts(svgs[1])  # dollar signs are text, not matplotlib's math
    assert svgs[-1].find(f"{NS}title").text == EVIL.replace("_", " ")  # a batching field's name
    table = pages.runs_table([pages.run_summary({**report, "run_id": EVIL})])
    assert "<script" not in table and "<a " not in table  # an id that is not a run id gets no link
    assert str(escape(EVIL)) in table


@pytest.mark.parametrize("report", [{}, {"run_id": "x"}, {"run_id": "x", "resources": {}, "stages": None}])
def test_missing_optional_fields_are_tolerated(report):
    page = pages.run_page(report)
    assert len(_svgs(page)) == 4 and "no samples in this report" in page and "no stage times" in page
    assert "No document failed." in page
    summary = pages.run_summary(report)
    assert summary["docs_seen"] is None and summary["peak_rss_mb"] is None
    assert "–" in pages.runs_table([summary])


def test_throughput_is_a_rate_over_equal_bins():
    data = charts.chart_data({"progress": [{"t": 10, "docs": 10, "chunks": 20}, {"t": 20, "docs": 30}]})
    assert data["throughput"]["docs/s"] == [(5.0, 1.0), (15.0, 2.0)]
    assert data["throughput"]["chunks/s"] == [(5.0, 2.0), (15.0, 0.0)]  # the second point has no chunks


def test_runs_are_listed_newest_first_and_ids_are_checked(tmp_path):
    runs = tmp_path / "_runs"
    runs.mkdir()
    for run_id, started in (("20250101T000000Z-aaaaaa", 100.0), ("20250102T000000Z-bbbbbb", 200.0)):
        (runs / f"{run_id}.json").write_text(json.dumps(_report(run_id=run_id, started_at=started)))
    (runs / "20250103T000000Z-cccccc.json").write_text("{not json")
    (runs / ".hidden.json").write_text("{}")
    rows = pages.list_runs(db=tmp_path)
    assert [r["run_id"] for r in rows] == ["20250102T000000Z-bbbbbb", "20250101T000000Z-aaaaaa"]
    assert rows[0]["docs_seen"] == 100 and rows[0]["docs_failed"] == 2 and rows[0]["cost_per_doc_usd"] > 0
    assert pages.load_run(db=tmp_path, run_id="20250101T000000Z-aaaaaa")["started_at"] == 100.0
    assert pages.list_runs(db=tmp_path / "nowhere") == []
    for bad in ("../secret", ".hidden", "a/b", "", "x" * 200):
        with pytest.raises(ValueError, match="Invalid run id"):
            pages.load_run(db=tmp_path, run_id=bad)
    with pytest.raises(FileNotFoundError, match="No run"):
        pages.load_run(db=tmp_path, run_id="20250109T000000Z-000000")
    with pytest.raises(ValueError, match="not valid JSON"):
        pages.load_run(db=tmp_path, run_id="20250103T000000Z-cccccc")


def test_report_command_writes_html_and_png(tmp_path):
    run = tmp_path / "run.json"
    run.write_text(json.dumps(_report(batching={"timeline": [{"t": 1, "token_budget": 8192}]})))
    out_html, out_png = tmp_path / "out" / "run.html", tmp_path / "out" / "run.png"
    result = CliRunner().invoke(app, ["report", str(run), "--html", str(out_html), "--png", str(out_png)])
    assert result.exit_code == 0, result.output
    page = out_html.read_text()
    assert len(_svgs(page)) == 5 and "Ingest run 20250101T120000Z-a1b2c3" in page
    image = out_png.read_bytes()
    assert image.startswith(b"\x89PNG\r\n\x1a\n")
    width, height = int.from_bytes(image[16:20], "big"), int.from_bytes(image[20:24], "big")
    assert width == 1200 and 800 < height < 1100 and len(image) > 20_000  # 5 charts: 3 rows of 2

    from PIL import Image

    with Image.open(out_png) as png:
        colors = {rgb for _, rgb in png.convert("RGB").getcolors(1 << 20)}
    assert {(0x25, 0x63, 0xEB), (0xD9, 0x77, 0x06)} <= colors  # the page's chart colours

    summary = CliRunner().invoke(app, ["report", str(run)])
    assert summary.exit_code == 0 and "100 seen: 95 ingested, 3 unchanged, 2 failed" in summary.output


def test_the_summary_says_when_a_logical_gpu_stood_in(tmp_path):
    """With EMBEDPIPE_LOGICAL_GPUS (tests), the plan says cuda while the CPU computes: the summary says so."""
    stood_in = {"device": "cpu", "dtype": "fp32", "logical_gpu": True, "cuda_visible_devices": "0"}
    embeddings = {"computed": 300, "cache_hits": 0, "oom_splits": 0, "actor_devices": {"11": stood_in}}
    run = tmp_path / "run.json"
    run.write_text(json.dumps(_report(embeddings=embeddings, backend={"dtype": "fp16", "device": "cuda"})))
    summary = CliRunner().invoke(app, ["report", str(run)], terminal_width=300)
    assert summary.exit_code == 0, summary.output
    assert "1 actor(s) held a logical GPU and computed fp32 on cpu" in " ".join(summary.output.split())
    real = {**embeddings, "actor_devices": {"11": {**stood_in, "device": "cuda", "logical_gpu": False}}}
    run.write_text(json.dumps(_report(embeddings=real, backend={"dtype": "fp16", "device": "cuda"})))
    assert "logical GPU" not in CliRunner().invoke(app, ["report", str(run)], terminal_width=300).output


def test_report_command_names_a_bad_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    result = CliRunner().invoke(app, ["report", str(bad), "--html", str(tmp_path / "x.html")])
    assert result.exit_code == 1 and "not a run report" in " ".join(result.output.split())
    bad.write_text("{oops")
    result = CliRunner().invoke(app, ["report", str(bad), "--png", str(tmp_path / "x.png")])
    assert result.exit_code == 1 and result.output.startswith("error: cannot render")
    assert not (tmp_path / "x.png").exists()
    missing = CliRunner().invoke(app, ["report", str(tmp_path / "nope.json")])
    assert missing.exit_code == 2


def test_pages_render_the_same_from_many_threads():
    """Serve renders runs in threads; matplotlib's settings are global, so drawing takes a lock."""
    report = _report(batching={"timeline": [{"t": 1, "token_budget": 8192}]})
    alone = pages.run_fragment(report)
    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(lambda _: pages.run_fragment(report), range(4))) == [alone] * 4


def test_matplotlib_is_loaded_only_to_draw_a_run():
    """The Serve router imports the pages for its search page; matplotlib (tens of MB) waits for a run."""
    probe = (
        "import sys; from serve import ui; from pipelines.reporting import pages;"
        "pages.page(title='t', body=''); pages.runs_table([]); before = 'matplotlib' in sys.modules;"
        "pages.run_fragment({}); print(before, 'matplotlib' in sys.modules)"
    )
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=root)
    assert out.stdout.split() == ["False", "True"]
