"""A document that will not parse in time or in memory fails with its reason; the run and the read task go
on, and every good document beside it is ingested."""

import time

import lancedb
import pytest

from pipelines import ingest, store
from pipelines.config import load_config
from pipelines.parsing import ParseError, ParseLimits, html_text, parse
from tests.helpers import minimal_pdf, slow_pdf

# A flat page of many paragraphs: ~3 MB, whose parse tree takes ~500 MB.
HUGE_HTML = b"<html><body>" + b"<p>x</p>" * 400_000 + b"</body></html>"


def test_a_slow_pdf_fails_at_the_deadline_and_the_next_file_parses():
    limits = ParseLimits(timeout_s=2, memory_mb=1024)
    started = time.monotonic()
    with pytest.raises(ParseError, match=r"took longer than read.parse_timeout_s=2 s"):
        parse(".pdf", slow_pdf(), limits)
    # Unbounded, this PDF parses for minutes (~0.08 s a page, 3,000 pages): the deadline cut it short.
    assert time.monotonic() - started < 30
    assert parse(".pdf", minimal_pdf("after the slow one", "Next"), limits) == ("Next", "after the slow one")


def test_a_parse_past_the_memory_bound_fails_with_its_reason():
    # At the bound the parser most often dies (SIGABRT), sometimes fails to allocate in a loop until the
    # deadline: either way the reason names the bound.
    with pytest.raises(ParseError, match=r"parse_memory_mb=300"):
        parse(".html", HUGE_HTML, ParseLimits(timeout_s=15, memory_mb=300))
    assert parse(".html", b"<title>T</title><p>fine</p>", ParseLimits(120, 300)) == ("T", "fine")


def test_a_broken_file_gives_the_parsers_reason_in_the_child_as_in_process():
    for limits in (ParseLimits(60, 1024), ParseLimits(0, 0)):
        with pytest.raises(Exception) as caught:  # noqa: B017  (pypdf's own error types)
            parse(".pdf", b"%PDF-1.4 cut short", limits)
        # The read task reports `Type: message`; from the child the type rides in the message.
        assert "PdfStreamError: Stream has ended" in f"{caught.type.__name__}: {caught.value}"


def test_html_text_keeps_headings_blocks_and_visible_text_only():
    page = (
        "<html><head><title>My  Page</title><style>p{}</style></head><body><h1>Head</h1>"
        "<p>Hello <b>bold</b> world</p><div>one<br>two</div><!-- a comment --><script>x=1</script>"
        "<ul><li>a</li><li>b</li></ul><h2>Sub</h2><p>end</p><svg><text>no</text></svg></body></html>"
    )
    assert html_text(page) == ("My  Page", "# Head\n\nHello bold world\none\ntwo\na\nb\n\n## Sub\n\nend")
    # Nested deeper than Python's recursion limit: walked with a stack, not recursion.
    assert html_text("<div>" * 5000 + "deep" + "</div>" * 5000)[1] == "deep"


def test_ingest_fails_the_slow_and_the_huge_document_and_keeps_every_good_one(ray_local, tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "slow.pdf").write_bytes(slow_pdf())
    (docs / "huge.html").write_bytes(HUGE_HTML)
    good = {
        "notes.txt": "Octopuses have three hearts and blue blood.",
        "guide.md": "# Bees\n\nHoney bees dance to tell where the flowers are.",
        "page.html": "<title>Owls</title><p>Owls turn their heads a long way round.</p>",
    }
    for name, text in good.items():
        (docs / name).write_text(text)
    (docs / "paper.pdf").write_bytes(minimal_pdf("Tardigrades survive in space", "Tardigrades"))
    good["paper.pdf"] = "Tardigrades"
    cfg = load_config(
        None,
        shards=2,
        **{"read.parse_timeout_s": 15, "read.parse_memory_mb": 300, "ray.progress_bars": False},
    )
    started = time.monotonic()
    report = ingest.build(source=docs, db=tmp_path / "db", cfg=cfg)
    elapsed = time.monotonic() - started

    assert report["docs"] == {"seen": 6, "ingested": 4, "unchanged": 0, "failed": 2}
    reasons = {f["doc_id"]: f["reason"] for f in report["failures"]}
    print(f"\nrun took {elapsed:.1f} s; failures: {reasons}")
    assert "read.parse_timeout_s=15" in reasons["slow.pdf"]
    assert "parse_memory_mb=300" in reasons["huge.html"]
    rows = [r for t in store.open_shards(tmp_path / "db").values() for r in t.to_arrow().to_pylist()]
    assert {r["doc_id"] for r in rows} == set(good)
    errors = lancedb.connect(str(tmp_path / "db")).open_table(store.ERRORS_TABLE).to_arrow().to_pylist()
    assert {e["doc_id"] for e in errors} == {"slow.pdf", "huge.html"}
