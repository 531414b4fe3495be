"""Split documents into chunks that fit the embedding model, counted in the model's own tokens.

A document is split at the most natural boundary that makes the pieces fit: headings, then
paragraphs, then lines, then sentences, then words, and only then raw token windows. Neighbouring
pieces are packed back together up to the token budget, with an overlap of whole pieces.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from pipelines import models

# Boundaries, most natural first. Each pattern matches the position where a new piece starts.
_LEVELS = [
    re.compile(r"\n(?=[ \t]{0,3}#{1,6}\s)|\n(?=[^\n]+\n[=\-~^\"'`#*+]{3,}[ \t]*(?:\n|$))"),
    re.compile(r"\n[ \t]*\n\s*"),
    re.compile(r"\n"),
    re.compile(r"(?<=[.!?;:])[\"')\]]*\s+"),
    re.compile(r"\s+"),
]


@dataclass(frozen=True, slots=True)
class Span:
    start: int
    end: int
    n_tokens: int


class _TokenIndex:
    """Counts the tokens of any character range of one text from a single tokenization."""

    def __init__(self, starts: list[int], ends: list[int]):
        self.starts, self.ends = starts, ends

    def count(self, start: int, end: int) -> int:
        return bisect.bisect_left(self.starts, end) - bisect.bisect_left(self.starts, start)

    def first(self, start: int) -> int:
        return bisect.bisect_left(self.starts, start)


def split_spans(text: str, index: _TokenIndex, *, budget: int, overlap: int) -> list[Span]:
    """Chunk one text into character spans of at most ``budget`` tokens each.

    Args:
        text: the document text.
        index: its tokenization.
        budget: most tokens per chunk.
        overlap: most tokens a chunk repeats from the end of the one before it.

    Returns:
        Spans in text order, each trimmed of surrounding whitespace; [] for blank text.
    """
    start, end = _trim(text, 0, len(text))
    if start >= end:
        return []
    total = index.count(start, end)
    if total <= budget:
        return [Span(start, end, total)]
    pieces = _pieces(text, index, start, end, budget, level=0)
    return _pack(text, index, pieces, budget=budget, overlap=overlap)


def _trim(text: str, start: int, end: int) -> tuple[int, int]:
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


def _pieces(
    text: str, index: _TokenIndex, start: int, end: int, budget: int, level: int
) -> list[tuple[int, int]]:
    """Recursively cut [start, end) at boundaries of increasing fineness until every piece fits."""
    if index.count(start, end) <= budget:
        return [(start, end)]
    if level == len(_LEVELS):
        return _token_windows(index, start, end, budget)
    cuts = [m.end() for m in _LEVELS[level].finditer(text, start, end)]
    bounds = [start, *(c for c in cuts if start < c < end), end]
    out: list[tuple[int, int]] = []
    for a, b in zip(bounds, bounds[1:], strict=False):
        a, b = _trim(text, a, b)
        if a < b:
            out.extend(_pieces(text, index, a, b, budget, level + 1))
    return out


def _token_windows(index: _TokenIndex, start: int, end: int, budget: int) -> list[tuple[int, int]]:
    first, last = index.first(start), index.first(end)
    return [
        (max(start, index.starts[i]), min(end, index.ends[min(i + budget, last) - 1]))
        for i in range(first, last, budget)
    ]


def _pack(
    text: str, index: _TokenIndex, pieces: list[tuple[int, int]], *, budget: int, overlap: int
) -> list[Span]:
    spans: list[Span] = []
    current: list[tuple[int, int]] = []
    for piece in pieces:
        if current and index.count(current[0][0], piece[1]) > budget:
            spans.append(Span(current[0][0], current[-1][1], index.count(current[0][0], current[-1][1])))
            current = _tail(index, current, overlap, room_for=piece, budget=budget)
        current.append(piece)
    if current:
        spans.append(Span(current[0][0], current[-1][1], index.count(current[0][0], current[-1][1])))
    return spans


def _tail(
    index: _TokenIndex,
    pieces: list[tuple[int, int]],
    overlap: int,
    *,
    room_for: tuple[int, int],
    budget: int,
) -> list[tuple[int, int]]:
    """The last whole pieces of a finished chunk worth repeating at the start of the next."""
    tail: list[tuple[int, int]] = []
    for piece in reversed(pieces):
        if index.count(piece[0], pieces[-1][1]) > overlap:
            break
        if index.count(piece[0], room_for[1]) > budget:
            break
        tail.insert(0, piece)
    return tail


# --- the Ray Data stage --------------------------------------------------------------------------

CHUNK_FIELDS = [
    ("chunk_id", pa.string()),
    ("doc_id", pa.string()),
    ("chunk_index", pa.int32()),
    ("title", pa.string()),
    ("text", pa.string()),
    ("char_start", pa.int32()),
    ("char_end", pa.int32()),
    ("n_tokens", pa.int32()),
    ("source", pa.string()),
    ("content_hash", pa.string()),
    ("metadata", pa.string()),
    # "ok" for a chunk to embed; a document that yields no chunk travels on as one row with
    # status "failed" (error says why) or "unchanged", so that every document is accounted for.
    ("status", pa.string()),
    ("error", pa.string()),
    # The token ids the model reads for an "ok" chunk (embed_input of title and text, special tokens,
    # truncated at the model's limit): tokenized here, beside the chunking, so that the embedding
    # actor (a GPU's feeder) only pads them. The embedder drops the column.
    ("input_ids", pa.list_(pa.int32())),
]
CHUNK_SCHEMA = pa.schema(CHUNK_FIELDS)


def chunk_id(doc_id: str, index: int) -> str:
    return f"{doc_id}#{index}"


def chunk_docs(
    batch: pa.Table, *, model: str, max_tokens: int | None = None, overlap_tokens: int = 32
) -> pa.Table:
    """Turn a batch of document rows into chunk rows (CHUNK_SCHEMA).

    Args:
        batch: rows with DOC_SCHEMA columns, plus an optional ``status`` ("unchanged" to skip).
        model: the embedding model whose tokenizer counts the tokens.
        max_tokens: tokens per chunk including title and special tokens; default the model's limit.
        overlap_tokens: most tokens repeated between neighbouring chunks.

    Returns:
        One row per chunk, and one status row per document that gives no chunk.
    """
    docs = batch.to_pylist()
    ok = [d for d in docs if not d.get("error") and d.get("status", "ok") == "ok"]
    encodings = title_lengths = []
    if ok:  # a batch of unchanged documents needs no tokenizer
        tokenizer = models.load_tokenizer(model)
        limit = max_tokens or models.max_seq_length(model)
        specials = models.special_token_count(model)
        encodings = tokenizer.encode_batch([d["text"] for d in ok], add_special_tokens=False)
        title_lengths = tokenizer.encode_batch(
            [d["title"] + " " if d["title"] else "" for d in ok], add_special_tokens=False
        )
    chunked: dict[int, list[Span]] = {}
    titled: dict[int, int] = {}
    for doc, enc, title_enc in zip(ok, encodings, title_lengths, strict=True):
        # Room left for the text once the title and special tokens are counted; a very long title
        # must not starve the text, so it keeps at least half of the budget.
        budget = max(limit - specials - len(title_enc.ids), (limit - specials) // 2, 1)
        index = _TokenIndex([s for s, _ in enc.offsets], [e for _, e in enc.offsets])
        try:
            chunked[id(doc)] = split_spans(
                doc["text"], index, budget=budget, overlap=min(overlap_tokens, budget // 2)
            )
        except Exception as exc:  # one document must never end the run
            doc["error"] = f"chunking failed: {type(exc).__name__}: {exc}"
            continue
        titled[id(doc)] = specials + len(title_enc.ids)

    rows: list[dict[str, Any]] = []
    for doc in docs:
        base = {
            "doc_id": doc["doc_id"],
            "title": doc["title"],
            "source": doc["source"],
            "content_hash": doc["content_hash"],
            "metadata": doc["metadata"],
        }
        spans = chunked.get(id(doc))
        if not spans:
            status = doc.get("status") or "ok"
            error = doc.get("error") or (None if status == "unchanged" else "no text to embed")
            rows.append(
                {
                    **base,
                    "chunk_id": chunk_id(doc["doc_id"], -1),
                    "chunk_index": -1,
                    "text": "",
                    "char_start": 0,
                    "char_end": 0,
                    "n_tokens": 0,
                    "status": "unchanged" if status == "unchanged" else "failed",
                    "error": error,
                    "input_ids": None,
                }
            )
            continue
        for i, span in enumerate(spans):
            rows.append(
                {
                    **base,
                    "chunk_id": chunk_id(doc["doc_id"], i),
                    "chunk_index": i,
                    "text": doc["text"][span.start : span.end],
                    "char_start": span.start,
                    "char_end": span.end,
                    "n_tokens": span.n_tokens + titled[id(doc)],
                    "status": "ok",
                    "error": None,
                    "input_ids": None,
                }
            )
    todo = [row for row in rows if row["status"] == "ok"]
    if todo:
        encoder = models.load_embedding_tokenizer(model)
        encoded = encoder.encode_batch([models.embed_input(row["title"], row["text"]) for row in todo])
        for row, enc in zip(todo, encoded, strict=True):
            row["input_ids"] = enc.ids
    return pa.Table.from_pylist(rows, schema=CHUNK_SCHEMA)
