"""Token-aware chunking with the bundled model's tokenizer."""

import pyarrow as pa
import pytest

from pipelines import models
from pipelines.chunking import CHUNK_SCHEMA, _TokenIndex, chunk_docs, split_spans
from pipelines.sources import DOC_SCHEMA, _doc

MODEL = "sentence-transformers/all-MiniLM-L6-v2"


def _index(text):
    enc = models.load_tokenizer(MODEL).encode(text, add_special_tokens=False)
    return _TokenIndex([s for s, _ in enc.offsets], [e for _, e in enc.offsets])


def _spans(text, budget, overlap=0):
    index = _index(text)
    return index, split_spans(text, index, budget=budget, overlap=overlap)


def test_model_limits_come_from_the_model():
    assert models.max_seq_length(MODEL) == 256
    assert models.special_token_count(MODEL) == 2


def test_short_text_is_one_chunk():
    text = "  A short note about vitamin D.\n"
    _, spans = _spans(text, budget=50)
    assert len(spans) == 1
    assert text[spans[0].start : spans[0].end] == "A short note about vitamin D."


def test_blank_text_gives_no_chunk():
    assert _spans("   \n\n ", budget=50)[1] == []


def test_every_chunk_fits_and_text_is_covered_in_order():
    paragraphs = [
        " ".join(f"Sentence {p}.{s} talks about topic {p} in some detail." for s in range(6))
        for p in range(12)
    ]
    text = "\n\n".join(paragraphs)
    index, spans = _spans(text, budget=60)
    assert len(spans) > 1
    assert all(span.n_tokens <= 60 for span in spans)
    assert all(index.count(s.start, s.end) == s.n_tokens for s in spans)
    # Without overlap, chunks tile the text: nothing but whitespace between them.
    for left, right in zip(spans, spans[1:], strict=False):
        assert left.end <= right.start
        assert text[left.end : right.start].strip() == ""


def test_splits_at_headings_and_paragraphs_before_sentences():
    section = "Plain words here. " * 20
    text = f"# Intro\n\n{section}\n\n# Methods\n\n{section}"
    index, spans = _spans(text, budget=index_count(text) // 2 + 5)
    starts = [text[s.start : s.start + 9] for s in spans]
    assert starts == ["# Intro\n\n", "# Methods"]


def index_count(text):
    index = _index(text)
    return index.count(0, len(text))


def test_sentence_boundaries_when_no_paragraphs():
    text = " ".join(f"This is sentence number {i} of a long paragraph." for i in range(40))
    _, spans = _spans(text, budget=40)
    assert all(text[s.end - 1] == "." for s in spans)


def test_overlap_repeats_whole_sentences():
    text = " ".join(f"Fact {i} is stated here." for i in range(60))
    _, spans = _spans(text, budget=40, overlap=15)
    assert len(spans) > 2
    assert all(b.start < a.end for a, b in zip(spans, spans[1:], strict=False))
    assert all(s.n_tokens <= 40 for s in spans)


def test_falls_back_to_token_windows():
    text = "word-" * 1000  # no whitespace at all: 2000 tokens
    index, spans = _spans(text, budget=32)
    assert len(spans) > 10
    assert all(s.n_tokens <= 32 for s in spans)
    assert sum(s.n_tokens for s in spans) == index.count(0, len(text))


def _docs(*rows):
    return pa.Table.from_pylist(list(rows), schema=DOC_SCHEMA)


def test_chunk_stage_rows_and_ids():
    long_text = "\n\n".join(f"Paragraph {i}. " + "Evidence accumulates slowly. " * 30 for i in range(8))
    batch = _docs(
        _doc("short", source="s", title="Short", text="One line."),
        _doc("long", source="s", title="Long title", text=long_text),
        _doc("bad", source="s", error="empty file"),
    )
    out = chunk_docs(batch, model=MODEL, max_tokens=128, overlap_tokens=16)
    assert out.schema == CHUNK_SCHEMA
    rows = out.to_pylist()
    short = [r for r in rows if r["doc_id"] == "short"]
    assert [(r["chunk_id"], r["chunk_index"], r["status"]) for r in short] == [("short#0", 0, "ok")]
    long = [r for r in rows if r["doc_id"] == "long"]
    assert [r["chunk_id"] for r in long] == [f"long#{i}" for i in range(len(long))]
    assert len(long) > 4
    assert all(r["n_tokens"] <= 128 and r["title"] == "Long title" for r in long)
    assert all(long_text[r["char_start"] : r["char_end"]] == r["text"] for r in long)
    bad = [r for r in rows if r["doc_id"] == "bad"]
    assert [(r["status"], r["error"]) for r in bad] == [("failed", "empty file")]
    # Stable: the same input gives the same chunks.
    assert chunk_docs(batch, model=MODEL, max_tokens=128, overlap_tokens=16).equals(out)


def test_default_budget_is_the_model_limit():
    text = "word " * 1000
    out = chunk_docs(_docs(_doc("d", source="s", text=text)), model=MODEL)
    counts = out["n_tokens"].to_pylist()
    assert max(counts) <= 256
    assert max(counts) > 200


@pytest.mark.parametrize("status", ["unchanged"])
def test_unchanged_docs_pass_through(status):
    batch = _docs(_doc("d", source="s", title="t", text="some text"))
    batch = batch.append_column("status", pa.array([status]))
    rows = chunk_docs(batch, model=MODEL).to_pylist()
    assert [(r["doc_id"], r["status"], r["error"]) for r in rows] == [("d", "unchanged", None)]
