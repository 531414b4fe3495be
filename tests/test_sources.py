"""Readers on a real local Ray: every document comes out as a row, readable or failed with a reason."""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.sources import SourceError, read_source
from tests.helpers import minimal_pdf


def _rows(ds):
    return {r["doc_id"]: r for r in ds.take_all()}


def test_directory_of_files(ray_local, tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("Plain text about cells.")
    (tmp_path / "sub" / "b.md").write_text("# Heading B\n\nMarkdown body.")
    (tmp_path / "c.html").write_text(
        "<html><head><title>Page C</title><style>p{}</style></head>"
        "<body><h2>Part</h2><p>Hello <b>web</b>.</p><script>var x=1;</script></body></html>"
    )
    (tmp_path / "d.pdf").write_bytes(minimal_pdf("Portable text inside a PDF", title="Doc D"))
    (tmp_path / "e.rst").write_text("Title E\n=======\n\nRestructured body.")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "binary.md").write_bytes(b"\x00\x01\x02binary")
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    (tmp_path / "broken.pdf").write_bytes(b"%PDF-1.4 not really")
    rows = _rows(read_source(tmp_path))
    assert set(rows) == {
        "a.txt", "sub/b.md", "c.html", "d.pdf", "e.rst",
        "empty.txt", "latin1.txt", "binary.md", "image.png", "broken.pdf",
    }  # fmt: skip
    ok = {k: r for k, r in rows.items() if r["error"] is None}
    assert set(ok) == {"a.txt", "sub/b.md", "c.html", "d.pdf", "e.rst"}
    assert ok["sub/b.md"]["title"] == "Heading B"
    assert ok["c.html"]["title"] == "Page C"
    assert "Hello web" in ok["c.html"]["text"] and "var x" not in ok["c.html"]["text"]
    assert "## Part" in ok["c.html"]["text"]
    assert ok["d.pdf"]["title"] == "Doc D" and "Portable text inside a PDF" in ok["d.pdf"]["text"]
    assert ok["e.rst"]["title"] == "Title E"
    assert ok["a.txt"]["title"] == "a"  # no heading: the file name
    assert all(len(r["content_hash"]) == 32 for r in ok.values())
    assert rows["empty.txt"]["error"] == "empty file"
    assert "UTF-8" in rows["latin1.txt"]["error"]
    assert "binary" in rows["binary.md"]["error"]
    assert "unsupported extension '.png'" in rows["image.png"]["error"]
    assert rows["broken.pdf"]["error"]


def test_jsonl_keeps_metadata_and_reports_bad_lines(ray_local, tmp_path):
    path = tmp_path / "docs.jsonl"
    lines = [
        json.dumps({"_id": "1", "title": "T1", "text": "first", "year": 2020, "tags": ["a"]}),
        json.dumps({"id": 2, "text": "second"}),
        "{not json",
        json.dumps({"title": "no id", "text": "x"}),
        json.dumps({"_id": "5", "title": "no text"}),
        "",
        json.dumps(["a", "list"]),
        json.dumps({"_id": "8", "text": 42}),
    ]
    path.write_text("\n".join(lines) + "\n")
    rows = _rows(read_source(path, docs_per_block=2))
    assert rows["1"]["error"] is None and json.loads(rows["1"]["metadata"]) == {"year": 2020, "tags": ["a"]}
    assert rows["2"]["error"] is None and rows["2"]["title"] == ""
    assert "invalid JSON" in rows["docs.jsonl:3"]["error"]
    assert "no '_id'" in rows["docs.jsonl:4"]["error"]
    assert "no 'text'" in rows["5"]["error"]
    assert "not an object" in rows["docs.jsonl:7"]["error"]
    assert "not a string" in rows["8"]["error"]
    assert len(rows) == 7  # the blank line is not a document


def test_parquet(ray_local, tmp_path):
    path = tmp_path / "docs.parquet"
    pq.write_table(
        pa.table({"id": [1, 2], "title": ["a", "b"], "text": ["x", "y"], "lang": ["en", "fr"]}), path
    )
    rows = _rows(read_source(path))
    assert set(rows) == {"1", "2"}
    assert json.loads(rows["2"]["metadata"]) == {"lang": "fr"}
    assert rows["1"]["content_hash"] != rows["2"]["content_hash"]


def test_a_broken_parquet_file_fails_alone(ray_local, tmp_path):
    folder = tmp_path / "pq"
    folder.mkdir()
    pq.write_table(pa.table({"id": ["a", "b"], "text": ["x", "y"]}), folder / "good.parquet")
    (folder / "truncated.parquet").write_bytes((folder / "good.parquet").read_bytes()[:-40])
    (folder / "not-parquet.parquet").write_text("id,text\nc,z\n")
    rows = _rows(read_source(folder))
    assert {k for k, r in rows.items() if not r["error"]} == {"a", "b"}
    broken = {Path(k).name: r["error"] for k, r in rows.items() if r["error"]}
    assert set(broken) == {"truncated.parquet", "not-parquet.parquet"}
    assert all(reason.startswith("unreadable Parquet file") for reason in broken.values())


def test_content_hash_is_stable_and_content_sensitive(ray_local, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"_id": "a", "text": "same"}) + "\n")
    first = _rows(read_source(path))["a"]["content_hash"]
    assert _rows(read_source(path))["a"]["content_hash"] == first
    path.write_text(json.dumps({"_id": "a", "text": "changed"}) + "\n")
    assert _rows(read_source(path))["a"]["content_hash"] != first


def test_bad_sources_are_clear_errors(tmp_path):
    with pytest.raises(SourceError, match="does not exist"):
        read_source(tmp_path / "missing")
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(SourceError, match="Unsupported source"):
        read_source(tmp_path / "x.csv")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="no files"):
        read_source(tmp_path / "empty")
