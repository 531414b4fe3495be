"""BM25 with the statistics of the whole generation, whatever its shard count.

LanceDB's full-text index scores a row with its own table's statistics (rows, average length, each
term's document frequency), so each shard of a db scored a chunk differently, and the keyword results
of a 4-shard and a 16-shard db of the same rows differed. Elasticsearch's ``dfs_query_then_fetch``
answers this by gathering the query terms' statistics from every shard first; here they are kept per
generation:

- ``embedpipe index`` (and ingest's index step) stores, per shard, the statistics of its full-text
  columns at the version it indexed (``write_stats``): rows, terms, and each term's document frequency,
  under the generation's tables: ``_bm25/<shard>.json`` names ``_bm25/<shard>-v<version>.parquet``,
  written after it, so a reader sees a whole file or the previous one;
- a searching process sums them over every shard of the generation (``GenerationStats``), and
  ``global_top`` rescores each shard's LanceDB BM25 candidates with the sums: ``score`` is then the
  same for a chunk in a 1-, 4- or 16-shard db, in any layout of groups.

Exactness: LanceDB gives a shard's top-L by its local score. A row's global score is at most ``R`` times
its local one (``R``: over the query's terms, the largest ratio of global to local idf, times the
largest ratio of global to local average length), so candidates are rescored in order of that bound
until the next bound cannot enter the top, and a shard whose L-th local score, times its ``R``, still
could, is asked again for more. Rows committed after the statistics were stored are scored with the
stored statistics until the next index step brings them up to date.
"""

from __future__ import annotations

import hashlib
import heapq
import io
import json
import logging
import math
import time
from array import array
from bisect import bisect_left
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.lru import BytesLRU
from pipelines.store import Location
from pipelines.store.shard_files import ShardFiles

logger = logging.getLogger(__name__)

DIR = "_bm25"
FORMAT = 1
FILES = ShardFiles(DIR, FORMAT)
K1, B = 1.2, 0.75  # LanceDB's BM25 parameters (tests/test_bm25.py checks scores against its own)
MAX_DEPTH = 8192  # a shard is asked for at most this many candidates (ties that never end)
_EPS = 1e-9  # float headroom on the bounds


def term_hash(term: str) -> int:
    """A term's 64-bit key in the statistics (the terms themselves are not kept)."""
    return int.from_bytes(hashlib.blake2b(term.encode(), digest_size=8).digest(), "little")


def _hashes(terms: Sequence[str]) -> np.ndarray:
    return np.fromiter((term_hash(t) for t in terms), np.uint64, len(terms))


def tokenize(text: str | None, options: dict[str, Any]) -> list[str]:
    """``text``'s terms as the full-text index with ``options`` (pipelines.config.TextIndexSettings)
    splits them: LanceDB's own tokenizer."""
    import lancedb

    if not text:
        return []
    return [token.text for token in lancedb.tokenize(text, **options)]


@dataclass
class ColumnStats:
    """One full-text column's statistics: rows, their terms in all, and each term's document frequency
    (``hashes`` sorted, ``df`` beside them)."""

    rows: int
    terms: int
    hashes: np.ndarray
    df: np.ndarray

    @property
    def avgdl(self) -> float:
        return self.terms / self.rows if self.rows else 0.0

    def frequency(self, hashes: np.ndarray) -> np.ndarray:
        """Each hashed term's document frequency (0 where it is absent)."""
        if not len(self.hashes):
            return np.zeros(len(hashes), np.int64)
        at = np.minimum(np.searchsorted(self.hashes, hashes), len(self.hashes) - 1)
        return np.where(self.hashes[at] == hashes, self.df[at], 0).astype(np.int64)

    def idf(self, hashes: np.ndarray) -> np.ndarray:
        df = self.frequency(hashes)
        return np.log1p((self.rows - df + 0.5) / (df + 0.5))


@dataclass
class ShardStats:
    """A shard's statistics at one table version, per full-text column, and the tokenizer's options."""

    version: int
    columns: dict[str, ColumnStats]
    options: dict[str, Any]
    file: str = ""
    nbytes: int = field(default=0)


def compute(table: Any, columns: Sequence[str], options: dict[str, Any]) -> ShardStats:
    """The statistics of ``table``'s ``columns`` at its current version (a scan of those columns)."""
    counts: dict[str, dict[str, int]] = {c: {} for c in columns}
    terms = dict.fromkeys(columns, 0)
    rows = 0
    scan = table.search().select(list(columns)).limit(None).to_batches(8192)
    for batch in scan:
        rows += batch.num_rows
        for column in columns:
            df, total = counts[column], 0
            for text in batch.column(column).to_pylist():
                found = tokenize(text, options)
                total += len(found)
                for term in set(found):
                    df[term] = df.get(term, 0) + 1
            terms[column] += total
    stats = {}
    for column in columns:
        hashes = _hashes(list(counts[column]))
        df = np.fromiter(counts[column].values(), np.uint32, len(hashes))
        order = np.argsort(hashes)
        stats[column] = ColumnStats(rows, terms[column], hashes[order], df[order])
    return ShardStats(table.version, stats, dict(options))


def write_stats(at: Location, shard: str, stats: ShardStats) -> dict[str, Any]:
    """Store ``shard``'s statistics and point to them; returns what was written."""
    name = f"{shard}-v{stats.version}"
    parts = [
        pa.table({"column": pa.array([c] * len(s.hashes), pa.string()), "hash": s.hashes, "df": s.df})
        for c, s in stats.columns.items()
    ]
    meta = {
        "version": stats.version,
        "options": stats.options,
        "columns": {c: {"rows": s.rows, "terms": s.terms} for c, s in stats.columns.items()},
    }
    table = pa.concat_tables(parts).replace_schema_metadata({"embedpipe": json.dumps(meta)})
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    at.write_bytes(f"{DIR}/{name}.parquet", buffer.getvalue())
    FILES.publish(at, shard, name, meta)
    return {"version": stats.version, "terms": {c: len(s.hashes) for c, s in stats.columns.items()}}


def update(table: Any, at: Location, columns: Sequence[str], options: dict[str, Any]) -> dict[str, Any]:
    """Bring ``table``'s stored statistics to its current version (computed whole: a scan and a
    tokenization of its full-text columns); returns what was done."""
    started = time.perf_counter()
    held = pointer(at, table.name)
    if (
        held is not None
        and held["version"] == table.version
        and held.get("options") == dict(options)
        and sorted(held.get("columns", {})) == sorted(columns)
    ):
        return {"action": "kept", "version": held["version"]}
    written = write_stats(at, table.name, compute(table, columns, options))
    return {"action": "built", **written, "seconds": round(time.perf_counter() - started, 2)}


def pointer(at: Location, shard: str) -> dict[str, Any] | None:
    """The small file naming ``shard``'s current statistics (None: it has none)."""
    return FILES.pointer(at, shard)


def drop(at: Location, shard: str) -> None:
    """Remove ``shard``'s statistics (its full-text indexes are gone)."""
    FILES.drop(at, shard)


def read(at: Location, shard: str) -> ShardStats | None:
    """The statistics ``embedpipe index`` stored for ``shard``, or None."""
    found = pointer(at, shard)
    if found is None:
        return None
    data = at.read_bytes(f"{DIR}/{found['file']}.parquet")
    if data is None:
        return None
    table = pq.read_table(io.BytesIO(data))
    meta = json.loads(table.schema.metadata[b"embedpipe"])
    columns = {}
    for column, counts in meta["columns"].items():
        part = table.filter(pc.equal(table.column("column"), column))
        hashes = part.column("hash").to_numpy().astype(np.uint64)
        order = np.argsort(hashes)
        df = part.column("df").to_numpy().astype(np.uint32)
        columns[column] = ColumnStats(int(counts["rows"]), int(counts["terms"]), hashes[order], df[order])
    nbytes = sum(s.hashes.nbytes + s.df.nbytes for s in columns.values())
    return ShardStats(int(meta["version"]), columns, meta["options"], found["file"], nbytes)


class GenerationStats:
    """Every shard's statistics of one generation, and their sums (the global statistics).

    Args:
        shards: each shard's statistics, by shard name (every shard of the generation).
    """

    def __init__(self, shards: dict[str, ShardStats]):
        self.shards = shards
        first = next(iter(shards.values()))
        self.options = first.options
        if any(s.options != self.options for s in shards.values()):
            raise ValueError("the shards' full-text indexes split text differently; run `embedpipe index`")
        self.columns: dict[str, ColumnStats] = {}
        for column in first.columns:
            parts = [s.columns[column] for s in shards.values() if column in s.columns]
            hashes = np.concatenate([p.hashes for p in parts])
            df = np.concatenate([p.df.astype(np.int64) for p in parts])
            order = np.argsort(hashes, kind="stable")
            hashes, df = hashes[order], df[order]
            starts = np.flatnonzero(np.r_[True, hashes[1:] != hashes[:-1]]) if len(hashes) else hashes[:0]
            summed = np.add.reduceat(df, starts) if len(hashes) else df
            self.columns[column] = ColumnStats(
                sum(p.rows for p in parts), sum(p.terms for p in parts), hashes[starts], summed
            )

    @property
    def nbytes(self) -> int:
        own = sum(c.hashes.nbytes + c.df.nbytes for c in self.columns.values())
        return own + sum(s.nbytes for s in self.shards.values())

    @classmethod
    def load(cls, at: Location, shards: Sequence[str]) -> GenerationStats | None:
        """The statistics of ``shards`` (every shard of the generation), or None when one has none."""
        found = {}
        for shard in shards:
            stats = read(at, shard)
            if stats is None:
                return None
            found[shard] = stats
        return cls(found)

    def files(self) -> dict[str, str]:
        return {name: s.file for name, s in self.shards.items()}


@dataclass
class Candidate:
    shard: str
    rowid: int
    chunk_id: str
    local: float
    bound: float
    score: float | None = None


Search = Callable[[str, int], pa.Table]  # (shard, depth) -> its local BM25 top-depth (KEY_COLUMNS)
# The named columns of rows, by shard and row id: {shard: row ids} -> {shard: {row id: {column: text}}}
Read = Callable[[dict[str, list[int]], list[str]], dict[str, dict[int, dict[str, str | None]]]]


class RowTerms(NamedTuple):
    """One column of a row as BM25 reads it: its length in terms, and each distinct term's count
    (``keys``: the terms' hashes in this process, sorted; compact arrays, searched with bisect: a
    row is scored in a few microseconds, where numpy's per-call cost was ~30)."""

    length: int
    keys: array
    counts: array

    @property
    def nbytes(self) -> int:
        return 8 * len(self.keys) + 4 * len(self.counts) + 200


def row_terms(text: str | None, options: dict[str, Any]) -> RowTerms:
    found = Counter(tokenize(text, options))
    pairs = sorted((hash(term), count) for term, count in found.items())
    return RowTerms(sum(found.values()), array("q", [k for k, _ in pairs]), array("i", [c for _, c in pairs]))


class Query(NamedTuple):
    """A query's terms: their hashes in this process (``keys``, to find them in rows) and in the stored
    statistics (``hashes``), and each one's global idf, per column."""

    keys: list[int]
    hashes: np.ndarray
    idf: dict[str, list[float]]


def make_query(text: str, stats: GenerationStats, columns: Sequence[str]) -> Query:
    terms = tokenize(text, stats.options)
    hashes = _hashes(terms)
    idf = {
        c: (stats.columns[c].idf(hashes) if c in stats.columns else np.zeros(len(terms))).tolist()
        for c in columns
    }
    return Query([hash(t) for t in terms], hashes, idf)


def _score(row: dict[str, RowTerms], query: Query, stats: GenerationStats) -> float:
    """A row's global BM25 score: over the full-text columns, the best of each column's sum over the
    query's terms (LanceDB's multi-column match takes the best column)."""
    best = 0.0
    for column, idf in query.idf.items():
        terms = row.get(column)
        if terms is None or not terms.length:
            continue
        keys, counts, n = terms.keys, terms.counts, len(terms.keys)
        norm = K1 * (1 - B + B * terms.length / stats.columns[column].avgdl)
        total = 0.0
        for key, weight in zip(query.keys, idf, strict=True):
            at = bisect_left(keys, key)
            if at < n and keys[at] == key:
                tf = counts[at]
                total += weight * tf * (K1 + 1) / (tf + norm)
        best = max(best, total)
    return best


def score_text(texts: dict[str, str | None], text: str, stats: GenerationStats) -> float:
    """``texts``' (a row's full-text columns) global BM25 score for the query ``text``."""
    query = make_query(text, stats, list(texts))
    return _score({c: row_terms(t, stats.options) for c, t in texts.items()}, query, stats)


class Row(NamedTuple):
    """A rescored row: its chunk id and its full-text columns' terms."""

    chunk_id: str
    terms: dict[str, RowTerms]

    @property
    def nbytes(self) -> int:
        return 100 + len(self.chunk_id) + sum(t.nbytes for t in self.terms.values())


class TermCache(BytesLRU):
    """The chunk ids and term counts of rows rescored lately, by (shard, table version, row id), least
    recently used out first, at most ``max_bytes``: a row that keyword queries keep finding is tokenized
    once.

    Args:
        max_bytes: what it may hold (0: nothing is kept).
    """

    def size(self, value: Row) -> int:
        return value.nbytes


def global_top(
    text: str,
    *,
    depth: int,
    stats: GenerationStats,
    first: dict[str, pa.Table],
    columns: Sequence[str],
    search: Search,
    read: Read,
    cache: TermCache | None = None,
    versions: dict[str, int] | None = None,
) -> pa.Table:
    """The top ``depth`` rows of some shards for ``text`` by BM25 with the generation's statistics.

    Args:
        text: the query.
        depth: rows to return.
        stats: the generation's statistics (every shard's, not only these).
        first: each shard's LanceDB BM25 top ``depth`` (local scores and row ids; chunk ids are read
            with the rows' text), by shard name (a group's shards).
        columns: the full-text columns searched.
        search: a shard's LanceDB BM25 top-n, when a shard must be asked for more.
        read: the named columns of rows, by shard and row id (one call for a batch of rows).
        cache: rows' term counts kept between queries, with ``versions``, each shard's table version.

    Returns:
        KEY_COLUMNS: ``score`` the global BM25 score, best first, ties by chunk_id.
    """
    from pipelines.search.merge import merge_topk

    query = make_query(text, stats, columns)
    ratio = {shard: _ratio(stats, shard, query.hashes, columns) for shard in first}
    rescore = lambda batch: _rescore(batch, query, stats, read, cache, versions or {})  # noqa: E731
    limit = dict.fromkeys(first, depth)
    hits = dict(first)
    candidates: dict[tuple[str, int], Candidate] = {}
    scored: list[Candidate] = []
    while True:
        for shard, found in hits.items():
            for local, rowid in zip(
                found.column("score").to_pylist(), found.column("_rowid").to_pylist(), strict=True
            ):
                if (shard, rowid) not in candidates:
                    bound = float(local) * ratio[shard] * (1 + _EPS) + _EPS
                    candidates[(shard, rowid)] = Candidate(shard, rowid, "", float(local), bound)
        pending = sorted(
            (c for c in candidates.values() if c.score is None), key=lambda c: (-c.bound, c.shard, c.rowid)
        )
        # Each shard's best row is rescored whatever its bound (it checks the shard's ratio, below);
        # then the others, best bound first, a batch at a time, until no bound left can enter the top.
        leaders: dict[str, tuple[float, Candidate]] = {}
        checked = {c.shard for c in scored}
        for c in pending:
            if c.shard not in checked and c.local > leaders.get(c.shard, (float("-inf"), c))[0]:
                leaders[c.shard] = (c.local, c)
        batch = [c for _, c in leaders.values()]
        while pending:
            floor = _floor(scored, depth)
            chosen = {id(c) for c in batch}
            batch += [c for c in pending[: max(depth, 16)] if c.bound >= floor and id(c) not in chosen]
            if not batch:
                break
            rescore(batch)
            scored.extend(batch)
            done = {id(c) for c in batch}
            pending = [c for c in pending if id(c) not in done]
            # A safeguard: LanceDB's local scores of rows not yet folded into its index (or of an index
            # updated in place) can stray from the stored statistics; where a rescored row beat its
            # bound, the shard's ratio grows to cover it, and its bounds with it.
            grown = set()
            for c in batch:
                if c.score > c.bound:
                    ratio[c.shard] = max(ratio[c.shard], c.score / max(c.local, 1e-12) * 1.25)
                    grown.add(c.shard)
            if grown:
                for c in pending:
                    if c.shard in grown:
                        c.bound = c.local * ratio[c.shard] * (1 + _EPS) + _EPS
                pending.sort(key=lambda c: (-c.bound, c.shard, c.rowid))
            batch = []
        # A shard cut at its limit may hold unseen rows whose bound still enters the top: ask it deeper.
        floor = _floor(scored, depth)
        deeper = {}
        for shard, found in hits.items():
            if found.num_rows < limit[shard] or limit[shard] >= MAX_DEPTH:
                continue
            last = float(found.column("score")[-1].as_py())
            if last * ratio[shard] * (1 + _EPS) + _EPS >= floor:
                limit[shard] = min(MAX_DEPTH, limit[shard] * 4)
                deeper[shard] = search(shard, limit[shard])
        if not deeper:
            break
        hits = deeper
    table = pa.table(
        {
            "chunk_id": pa.array([c.chunk_id for c in scored], pa.string()),
            "score": pa.array([c.score for c in scored], pa.float32()),
            "shard": pa.array([c.shard for c in scored], pa.string()),
            "_rowid": pa.array([c.rowid for c in scored], pa.uint64()),
        }
    )
    return merge_topk([table.filter(pc.greater(table.column("score"), 0))], k=depth)


def _floor(scored: list[Candidate], depth: int) -> float:
    """The score a candidate must reach to enter the top ``depth`` (0 until it is full)."""
    if len(scored) < depth:
        return 0.0
    return heapq.nlargest(depth, (c.score for c in scored))[-1]


def _ratio(stats: GenerationStats, shard: str, hashes: np.ndarray, columns: Sequence[str]) -> float:
    """How far above its local score a row of ``shard`` can score with the global statistics."""
    own = stats.shards[shard].columns
    worst = 1.0
    for column in columns:
        if column not in own or column not in stats.columns:
            continue
        local, whole = own[column], stats.columns[column]
        present = local.frequency(hashes) > 0
        if not present.any():
            continue
        idf = whole.idf(hashes)[present] / np.maximum(local.idf(hashes)[present], 1e-12)
        length = max(1.0, whole.avgdl / local.avgdl) if local.avgdl else 1.0
        worst = max(worst, float(idf.max()) * length)
    return worst if math.isfinite(worst) else float("inf")


def _rescore(
    batch: list[Candidate],
    query: Query,
    stats: GenerationStats,
    read: Read,
    cache: TermCache | None,
    versions: dict[str, int],
) -> None:
    key = lambda c: (c.shard, versions.get(c.shard, -1), c.rowid)  # noqa: E731
    known = cache.get([key(c) for c in batch]) if cache is not None else {}
    by_shard: dict[str, list[int]] = {}
    for c in batch:
        if key(c) not in known:
            by_shard.setdefault(c.shard, []).append(c.rowid)
    if by_shard:
        columns = list(query.idf)
        texts = read(by_shard, ["chunk_id", *columns])
        new = {
            (shard, versions.get(shard, -1), rowid): Row(
                row["chunk_id"], {c: row_terms(row.get(c), stats.options) for c in columns}
            )
            for shard, rows in texts.items()
            for rowid, row in rows.items()
        }
        if cache is not None:
            cache.put(new)
        known.update(new)
    for c in batch:
        row = known.get(key(c))
        c.chunk_id, c.score = (
            (row.chunk_id, _score(row.terms, query, stats)) if row is not None else ("", 0.0)
        )


class HeldTerms:
    """The full-text columns of rows held in memory (``MemoryShard``), inverted: each term's rows and
    counts, and each row's length. A keyword query of held shards is then scored here, every row with
    the generation's statistics, as ``global_top`` scores LanceDB's candidates (the same float64 sums,
    term by term in the query's order), with no LanceDB query and no rescoring: a few postings lists
    added up. Built from the held rows' text once per held version, with LanceDB's tokenizer.

    Args:
        columns: each full-text column's text, one entry per held row.
        options: the tokenizer's options (the statistics' ``options``).
    """

    def __init__(self, columns: dict[str, list[str | None]], options: dict[str, Any]):
        self.options = dict(options)
        self.rows = len(next(iter(columns.values()))) if columns else 0
        self.columns = {c: _Postings.build(texts, options) for c, texts in columns.items()}

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.columns.values())

    def scores(self, query: Query, stats: GenerationStats) -> np.ndarray:
        """Every held row's BM25 score for ``query`` with ``stats`` (float32; 0: no query term)."""
        best = np.zeros(self.rows, np.float64)
        for column, idf in query.idf.items():
            postings = self.columns.get(column)
            if postings is None or column not in stats.columns:
                continue
            avgdl = stats.columns[column].avgdl
            total = np.zeros(self.rows, np.float64)
            for (start, end), weight in zip(postings.find(query.keys), idf, strict=True):
                if start == end:
                    continue
                rows = postings.rows[start:end]
                tf = postings.tf[start:end].astype(np.float64)
                norm = K1 * (1 - B + B * postings.lengths[rows] / avgdl)
                total[rows] += weight * tf * (K1 + 1) / (tf + norm)
            np.maximum(best, total, out=best)
        return best.astype(np.float32)


@dataclass
class _Postings:
    """One column's postings: its terms' hashes in this process (``keys``, sorted, as ``Query.keys``),
    each one's rows ``rows[starts[i]:starts[i + 1]]`` (int32, ascending) and counts ``tf`` beside them
    (float32: exact below 2**24), and each row's length in terms. 16 bytes a term, 8 a posting, 8 a row."""

    keys: np.ndarray
    starts: np.ndarray
    rows: np.ndarray
    tf: np.ndarray
    lengths: np.ndarray

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.keys, self.starts, self.rows, self.tf, self.lengths))

    def find(self, keys: list[int]) -> list[tuple[int, int]]:
        """Each key's [start, end) in ``rows`` (empty where the column lacks the term)."""
        if not keys or not len(self.keys):
            return [(0, 0)] * len(keys)
        wanted = np.asarray(keys, np.int64)
        at = np.minimum(np.searchsorted(self.keys, wanted), len(self.keys) - 1)
        hit = self.keys[at] == wanted
        return [
            (int(self.starts[i]), int(self.starts[i + 1])) if ok else (0, 0)
            for i, ok in zip(at.tolist(), hit.tolist(), strict=True)
        ]

    @classmethod
    def build(cls, texts: list[str | None], options: dict[str, Any]) -> _Postings:
        terms: list[str] = []
        lengths = np.zeros(len(texts), np.int64)
        for row, text in enumerate(texts):
            found = tokenize(text, options)
            terms.extend(found)
            lengths[row] = len(found)
        keys = np.fromiter(map(hash, terms), np.int64, len(terms))
        rows = np.repeat(np.arange(len(texts), dtype=np.int32), lengths)
        # Every (term, row) pair once, in term order and rows ascending within a term, with its count.
        order = np.lexsort((rows, keys))
        keys, rows = keys[order], rows[order]
        first = np.r_[True, (keys[1:] != keys[:-1]) | (rows[1:] != rows[:-1])] if len(keys) else keys[:0]
        at = np.flatnonzero(first)
        tf = np.diff(np.r_[at, len(keys)]).astype(np.float32)
        keys, rows = keys[at], rows[at]
        new_term = np.r_[True, keys[1:] != keys[:-1]] if len(keys) else keys[:0].astype(bool)
        starts = np.r_[np.flatnonzero(new_term), len(keys)].astype(np.int64)
        return cls(keys[new_term], starts, rows, tf, lengths.astype(np.float64))
