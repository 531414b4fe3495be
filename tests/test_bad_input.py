"""Bad input never crashes a run and is never dropped: every document ends ingested, unchanged or failed
with its reason, in the report and in the db's ``_errors`` table; every good document is searchable."""

import json
import os

import lancedb
import pytest
from typer.testing import CliRunner

from pipelines import ingest, store
from pipelines.cli import EXIT_SOME_FAILED, EXIT_USAGE, app
from pipelines.config import load_config
from pipelines.search import Searcher
from tests.conftest import scifact_docs
from tests.helpers import minimal_pdf

MAX_DOC_MB = 0.02  # 20 kB: every SciFact abstract fits, big.txt does not

# file name -> what its failure reason must say
BAD_FILES = {
    "empty.txt": "empty file",
    "blank.md": "empty file",
    "latin1.txt": "not valid UTF-8",
    "binary.md": "binary content",
    "utf16.txt": "binary content",
    "broken.pdf": "Pdf",
    "truncated.pdf": "Pdf",
    "no-text.pdf": "no extractable text",
    "scripts-only.html": "no extractable text",
    "image.png": "unsupported extension '.png'",
    "no-extension": "unsupported extension ''",
    "nested/records.jsonl": "unsupported extension '.jsonl'",
    "big.txt": f"over max_doc_mb={MAX_DOC_MB}",
    "dangling.txt": "broken symbolic link",
    "pipe.txt": "not a regular file",
    "linked-folder": "symbolic link to a folder",
    "bad\\xffname.txt": "file name is not valid UTF-8",
}


def _make_folder(root):
    """A folder of good documents of every kind mixed with BAD_FILES; returns {doc_id: query}."""
    (root / "nested").mkdir(parents=True)
    good = {}
    for doc in scifact_docs(8):
        name = f"nested/{doc['_id']}.md"
        (root / name).write_text(f"# {doc['title']}\n\n{doc['text']}")
        good[name] = doc["title"]
    (root / "plain.txt").write_text("Honeybees communicate the direction of flowers with a waggle dance.")
    good["plain.txt"] = "how do honeybees tell each other where flowers are"
    (root / "page.html").write_text(
        "<html><title>Tides</title><body><p>The moon's gravity raises the ocean tides.</p></body></html>"
    )
    good["page.html"] = "what causes ocean tides"
    (root / "paper.pdf").write_bytes(minimal_pdf("Volcanic ash cools the climate for years", title="Ash"))
    good["paper.pdf"] = "volcanic ash and climate cooling"
    (root / "notes.rst").write_text("Glaciers\n========\n\nGlaciers carve U-shaped valleys as they move.")
    good["notes.rst"] = "how glaciers shape valleys"
    (root / "_index.md").write_text("# Octopus\n\nAn octopus has three hearts and blue blood.")
    good["_index.md"] = "octopus hearts and blood"

    (root / "empty.txt").write_bytes(b"")
    (root / "blank.md").write_text("  \n\n\t \n")
    (root / "latin1.txt").write_bytes("caf\xe9 cr\xe8me br\xfbl\xe9e".encode("latin-1"))
    (root / "binary.md").write_bytes(b"\x7fELF\x02\x01\x00\x00binary")
    (root / "utf16.txt").write_text("text saved as UTF-16", encoding="utf-16")
    (root / "broken.pdf").write_bytes(b"%PDF-1.4 not really a pdf")
    pdf = minimal_pdf("cut in half")
    (root / "truncated.pdf").write_bytes(pdf[: len(pdf) // 2])
    (root / "no-text.pdf").write_bytes(minimal_pdf(""))
    (root / "scripts-only.html").write_text("<html><script>var x = 1;</script><style>p {}</style></html>")
    (root / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (root / "no-extension").write_text("a file without an extension")
    (root / "nested" / "records.jsonl").write_text('{"_id": "x", "text": "y"}\n')
    (root / "big.txt").write_text("word " * 5000)  # 25 kB
    os.symlink(root / "missing.txt", root / "dangling.txt")
    os.mkfifo(root / "pipe.txt")  # reading it would block forever
    os.symlink(root / "nested", root / "linked-folder")
    (root / os.fsdecode(b"bad\xffname.txt")).write_text("a name that is not UTF-8")
    # Hidden files and folders are not documents: skipped, like .git and .DS_Store should be.
    (root / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (root / ".git").mkdir()
    (root / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    return good


@pytest.fixture(scope="module")
def folder_run(ray_local, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad-folder")
    good = _make_folder(root / "docs")
    db = root / "db"
    cfg = load_config(None, shards=3, **{"read.max_doc_mb": MAX_DOC_MB, "ray.progress_bars": False})
    return root / "docs", db, good, ingest.build(source=root / "docs", db=db, cfg=cfg)


def test_every_file_is_ingested_or_failed_with_its_reason(folder_run):
    _, db, good, report = folder_run
    docs = report["docs"]
    assert docs["seen"] == docs["ingested"] + docs["unchanged"] + docs["failed"]
    assert docs == {"seen": len(good) + len(BAD_FILES), "ingested": len(good), "unchanged": 0,
                    "failed": len(BAD_FILES)}  # fmt: skip
    reasons = {f["doc_id"]: f["reason"] for f in report["failures"]}
    print(f"\n{len(BAD_FILES)} bad files of {len(good) + len(BAD_FILES)}:")
    for doc_id, reason in sorted(reasons.items()):
        print(f"  {doc_id:24} {reason[:90]}")
    assert set(reasons) == set(BAD_FILES)
    for name, needle in BAD_FILES.items():
        assert needle in reasons[name], (name, reasons[name])
    assert not any(".git" in d or ".DS_Store" in d for d in reasons)

    # The same list in the db's _errors table, which the shard listing leaves alone.
    errors = lancedb.connect(str(db)).open_table(store.ERRORS_TABLE).to_arrow().to_pylist()
    assert {(e["doc_id"], e["reason"]) for e in errors if e["run_id"] == report["run_id"]} == set(
        reasons.items()
    )
    assert all(e["time"] is not None and e["source"] for e in errors)
    assert sorted(store.open_shards(db)) == ["shard_000", "shard_001", "shard_002"]
    assert sum(store.shard_rows(db).values()) == report["chunks"]["written"]


def test_every_good_document_is_searchable(folder_run):
    _, db, good, _ = folder_run
    searcher = Searcher(db, device="cpu", dtype="fp32")
    for doc_id, query in good.items():
        hits = searcher.search(query, k=3)["doc_id"].to_pylist()
        assert doc_id in hits, (doc_id, query, hits)


def test_rerun_through_the_cli_exit_codes(folder_run, tmp_path):
    source, db, good, first = folder_run
    config = tmp_path / "c.yaml"
    config.write_text(f"shards: 3\nread:\n  max_doc_mb: {MAX_DOC_MB}\nray:\n  progress_bars: false\n")
    runner = CliRunner()
    args = [
        "ingest",
        str(source),
        "--db",
        str(db),
        "--config",
        str(config),
        "--report",
        str(tmp_path / "r.json"),
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == EXIT_SOME_FAILED, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["docs"] == {"seen": len(good) + len(BAD_FILES), "ingested": 0, "unchanged": len(good),
                              "failed": len(BAD_FILES)}  # fmt: skip
    assert "failed" in result.output and "more in the report" in result.output  # the summary lists some
    assert runner.invoke(app, ["ingest", str(source)]).exit_code == EXIT_USAGE  # no --db
    runs = {
        e["run_id"] for e in lancedb.connect(str(db)).open_table(store.ERRORS_TABLE).to_arrow().to_pylist()
    }
    assert runs == {first["run_id"], report["run_id"]}


def test_bad_jsonl_lines_fail_with_their_line_numbers(ray_local, tmp_path):
    good = scifact_docs(6)
    lines = [json.dumps(d) for d in good[:3]]
    bad = {  # line number -> what the reason must say
        4: ("{broken json", "line 4: invalid JSON"),
        5: ("[" * 5000 + "]" * 5000, "line 5: invalid JSON (maximum recursion"),
        6: (b'{"_id": "l\xe9", "text": "latin-1"}', "line 6: invalid JSON"),
        7: ('{"_id": "s1", "text": "lone \\ud800 surrogate"}', "surrogate in title, text or metadata"),
        8: ('{"_id": "\\udc00", "text": "surrogate id"}', "'_id' is not valid Unicode"),
        9: (json.dumps({"_id": {"a": 1}, "text": "object id"}), "'_id' is a dict"),
        10: (json.dumps({"title": "no id", "text": "x"}), "no '_id' or 'id'"),
        11: (json.dumps({"_id": "no-text", "title": "t"}), "no 'text'"),
        12: (json.dumps({"_id": "num-text", "text": 42}), "'text' is a int"),
        13: (json.dumps({"_id": "blank", "title": " ", "text": "  "}), "empty document"),
        14: (json.dumps(["a", "list"]), "not an object"),
        15: (
            json.dumps({"_id": "huge", "text": "x " * 20_000}),
            "line 15: record is 0.04 MB, over max_doc_mb",
        ),
        16: (json.dumps({"_id": "twice", "text": "first copy"}), "duplicate doc_id"),
        17: (json.dumps({"_id": "twice", "text": "second copy"}), "duplicate doc_id"),
    }
    lines += [line for line, _ in bad.values()]
    lines += [json.dumps(d) for d in good[3:]]
    lines.append(json.dumps({"_id": "it's \\ odd", "title": "Quotes", "text": "Odd ids with ' and \\ work."}))
    lines.append(json.dumps({"_id": "nul", "title": "Control", "text": "NUL \u0000 inside the text."}))
    lines.append("")  # a blank line is not a document
    path = tmp_path / "c.jsonl"
    path.write_bytes(b"\n".join(x if isinstance(x, bytes) else x.encode() for x in lines))
    db = tmp_path / "db"
    cfg = load_config(None, shards=2, **{"read.max_doc_mb": MAX_DOC_MB, "ray.progress_bars": False})
    report = ingest.build(source=path, db=db, cfg=cfg)
    docs = report["docs"]
    print("\njsonl:", docs, *(f"\n  {f['doc_id']:12} {f['reason'][:90]}" for f in report["failures"]))
    assert docs["seen"] == docs["ingested"] + docs["unchanged"] + docs["failed"] == len(good) + len(bad) + 2
    assert docs["ingested"] == len(good) + 2 and docs["failed"] == len(bad)
    reasons = sorted(f["reason"] for f in report["failures"])
    for _, needle in bad.values():
        match = next((r for r in reasons if needle in r), None)
        assert match, (needle, reasons)
        reasons.remove(match)
    searcher = Searcher(db, device="cpu", dtype="fp32")
    for doc in good:
        assert searcher.search(doc["title"], k=1)["doc_id"][0].as_py() == doc["_id"]
    assert "it's \\ odd" in searcher.search("Odd ids with quotes", k=2)["doc_id"].to_pylist()
