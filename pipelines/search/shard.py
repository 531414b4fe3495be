"""One shard table: exact or ANN search through LanceDB, BM25, or exact search of small shards' vectors
held in memory; the result rows of an answer read by row id (``fetch_rows``); and ``Shard``, which keeps
a table open at one version at a time and follows new commits.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from lancedb.query import MatchQuery, MultiMatchQuery

from pipelines import codes as shard_codes
from pipelines import store
from pipelines.codes import ShardCodes
from pipelines.config import IndexSettings
from pipelines.filters import FilterError
from pipelines.index import ShardIndexes, query_params, read_indexes
from pipelines.lru import BytesLRU
from pipelines.search.merge import merge_topk

logger = logging.getLogger(__name__)

RESULT_COLUMNS = ["chunk_id", "doc_id", "chunk_index", "title", "text", "source", "metadata"]
# What a search returns per hit: the chunk's id (ties and fusion), its score, its shard and its row id
# there. The other RESULT_COLUMNS are read for the final top-k only (``fetch_rows``): a process that
# searches never holds the text, title, source or metadata of rows that are not in an answer.
KEY_COLUMNS = ["chunk_id", "score", "shard", "_rowid"]
# What a small shard held in memory keeps besides its vectors: the columns an answer of /search shows,
# so that its answers read nothing from the table (a LanceDB take costs ~1.4 ms of CPU a shard here).
HELD_COLUMNS = ["chunk_id", "doc_id", "title", "text"]
SCAN_WARN_ROWS = 100_000  # an unindexed shard this large costs every query a scan worth a warning
# Rows committed since a shard's codes were built are held in memory beside them (FreshRows: ~1.5 KB a
# 384-dim row, so at most ~77 MB a shard whatever its size); past this many, or after a compaction gave
# every row a new id, the codes are set aside and LanceDB's own index serves until `embedpipe index`
# brings them up to date.
CODES_NEW_ROWS_MAX = 50_000
KEY_SCHEMA = pa.schema(
    [("chunk_id", pa.string()), ("score", pa.float32()), ("shard", pa.string()), ("_rowid", pa.uint64())]
)


def search_shard(table: Any, vector: np.ndarray, *, k: int, shard: str, **options: Any) -> pa.Table:
    """Cosine search of one shard table for one query vector, from synchronous code; ``options`` as
    ``search_shard_async`` takes them (where, params, exact)."""
    (hits,) = run_async(search_shard_async(table, np.atleast_2d(vector), k=k, shard=shard, **options))
    return hits


async def search_shard_async(
    table: Any,
    vectors: np.ndarray,
    *,
    k: int,
    shard: str,
    where: str | None = None,
    params: dict[str, int] | None = None,
    exact: bool = False,
) -> list[pa.Table]:
    """Cosine search of one shard table for several query vectors in one LanceDB query, exact or
    through its ANN index. A LanceDB query costs ~1-3 ms of fixed overhead on 2 cores and well under
    that for each further vector it carries (README, "Search path"): a batch of queries is one call
    per shard, and the shards of a group are searched side by side on one event loop (LanceDB's
    async API: no thread per call, no schema lookups per call as its synchronous API makes).

    Args:
        table: an open LanceDB table.
        vectors: unit-length query vectors, one row each.
        k: rows to return from this shard for each query.
        shard: the shard's name, added as a column.
        where: an optional SQL predicate applied before the search (to every query).
        params: ANN query parameters (``nprobes``, ``ef``, ``refine_factor``; see pipelines.index).
        exact: scan every row even when the table has an ANN index.

    Returns:
        Per query, KEY_COLUMNS: ``score`` is the cosine similarity (1 - cosine distance; higher is
        better), best first.
    """
    vectors = np.atleast_2d(np.asarray(vectors, np.float32))
    many = len(vectors) > 1
    query = _async_table(table).vector_search(list(vectors) if many else vectors[0]).distance_type("cosine")
    query = query.select(["chunk_id", "_distance", "_rowid"]).limit(k)
    if exact:
        query = query.bypass_vector_index()
    else:
        for name, value in (params or {}).items():
            query = getattr(query, name)(value)
    if where:
        query = query.where(where)  # a prefilter, as in the synchronous API
    hits = await query.to_arrow()
    score = pc.subtract(pa.scalar(1.0, pa.float32()), hits.column("_distance").cast(pa.float32()))
    keys = _keys(hits, score, shard)
    if not many:
        return [keys]
    which = hits.column("query_index").to_numpy()
    return [keys.filter(pa.array(which == i)) for i in range(len(vectors))]


def _async_table(table: Any) -> Any:
    # lancedb's synchronous LanceTable wraps an AsyncTable (checked out at the same version); its
    # queries are what the synchronous API itself awaits on a background loop.
    return getattr(table, "_table", table)


_LOOP: asyncio.AbstractEventLoop | None = None
_LOOP_LOCK = threading.Lock()


def run_async(coroutine: Any) -> Any:
    """Run ``coroutine`` on this process's search event loop (one thread, started on first use) and
    wait for its result."""
    return asyncio.run_coroutine_threadsafe(coroutine, search_loop()).result()


def search_loop() -> asyncio.AbstractEventLoop:
    """The event loop LanceDB searches run on in this process."""
    global _LOOP
    with _LOOP_LOCK:
        if _LOOP is None or _LOOP.is_closed():
            loop = asyncio.new_event_loop()
            threading.Thread(target=loop.run_forever, name="shard-search-loop", daemon=True).start()
            _LOOP = loop
        return _LOOP


def text_search_shard(
    table: Any, text: str, *, k: int, shard: str, columns: tuple[str, ...], where: str | None = None
) -> pa.Table:
    """BM25 full-text search of one shard, from synchronous code; see ``text_search_shard_async``."""
    return run_async(text_search_shard_async(table, text, k=k, shard=shard, columns=columns, where=where))


async def text_search_shard_async(
    table: Any,
    text: str,
    *,
    k: int,
    shard: str,
    columns: tuple[str, ...],
    where: str | None = None,
    ids: bool = True,
) -> pa.Table:
    """BM25 full-text search of one shard over ``columns`` (each needs an FTS index), with the shard's
    own statistics (``pipelines.bm25`` rescores with the generation's), through LanceDB's async API.

    Args:
        ids: read each hit's chunk_id (False: left empty, for a caller that reads it later; a
            LanceDB search that reads no column costs ~0.85 ms of CPU less here).

    Returns:
        KEY_COLUMNS, ``score`` the BM25 score (higher is better), best first.
    """
    if not columns:
        raise NoTextIndexError(f"{shard} has no full-text index; run `embedpipe index --db DIR` first.")
    match = MatchQuery(text, columns[0]) if len(columns) == 1 else MultiMatchQuery(text, list(columns))
    query = _async_table(table).query().nearest_to_text(match)
    query = query.select(["chunk_id", "_score"] if ids else ["_score"]).with_row_id().limit(k)
    if where:
        query = query.where(where)  # a prefilter
    hits = await query.to_arrow()
    if not ids:
        hits = hits.append_column("chunk_id", pa.array([""] * hits.num_rows, pa.string()))
    return _keys(hits, hits.column("_score").cast(pa.float32()), shard)


def _keys(hits: pa.Table, score: Any, shard: str) -> pa.Table:
    n = hits.num_rows
    return pa.table(
        [hits.column("chunk_id"), score, pa.array([shard] * n, pa.string()), hits.column("_rowid")],
        schema=KEY_SCHEMA,
    )


async def _no_rows(table: Any) -> pa.Table:
    dim = table.schema.field("vector").type.list_size
    schema = pa.schema(
        [("chunk_id", pa.string()), ("vector", pa.list_(pa.float32(), dim)), ("_rowid", pa.uint64())]
    )
    return schema.empty_table()


class Pinned(NamedTuple):
    """A shard table at the version a search read it at (row ids are per version), and the memory
    that holds its rows when it is a small shard held by its group."""

    version: int
    table: Any
    held: MemoryShard | None = None


class RowCache(BytesLRU):
    """The result columns of rows that were in recent answers, by (shard, table version, row id), least
    recently used out first, at most ``max_bytes`` of their values: an answer whose rows are all here
    costs no LanceDB read (a LanceDB take costs ~1-2 ms of CPU per shard however few its rows). It holds
    rows that were in answers only, never those a search merely scanned, and its bound does not grow
    with the db.

    Args:
        max_bytes: the values' bytes it may hold (0: nothing is kept).
    """

    ENTRY_OVERHEAD = 200  # Python's tuple and key around a row's values

    def size(self, value: tuple) -> int:
        return self.ENTRY_OVERHEAD + sum(len(v) if isinstance(v, str) else 8 for v in value)


def fetch_rows(
    hits: list[pa.Table],
    tables: Mapping[str, Pinned],
    columns: list[str] | None = None,
    cache: RowCache | None = None,
) -> list[pa.Table]:
    """The result rows of each hit list: ``columns`` (default RESULT_COLUMNS; chunk_id always) read from
    the shard tables by row id, then ``score`` and ``shard``, in the hits' order. Rows the cache holds
    are not read again; the others are one LanceDB take per shard for all the lists, the shards read
    side by side on the search loop.

    Args:
        hits: tables of KEY_COLUMNS (a query's merged top-k each).
        tables: each shard's table at the version its hits were found on.
        columns: the columns to read (the same for every call that shares ``cache``).
        cache: rows of earlier answers.
    """
    columns = list(dict.fromkeys(["chunk_id", *(columns or RESULT_COLUMNS)]))
    keyed = [
        [(shard, tables[shard].version, rowid) for shard, rowid in zip(
            table.column("shard").to_pylist(), table.column("_rowid").to_pylist(), strict=True)]
        for table in hits
    ]  # fmt: skip
    by_shard: dict[str, set[int]] = {}
    for shard, _, rowid in {key for keys in keyed for key in keys}:
        by_shard.setdefault(shard, set()).add(rowid)
    found: dict[tuple[str, int, int], tuple] = {}
    wanted: dict[str, list[int]] = {}  # rows to read: neither held by their group nor cached
    for shard, rowids in by_shard.items():
        pinned, ordered = tables[shard], sorted(rowids)
        values = pinned.held.values(shard, ordered, columns) if pinned.held is not None else None
        if values is not None:  # a small shard held with these columns: nothing to read
            found.update({(shard, pinned.version, r): row for r, row in zip(ordered, values, strict=True)})
            continue
        if cache is not None:
            found.update(cache.get([(shard, pinned.version, r) for r in ordered]))
        missing = [r for r in ordered if (shard, pinned.version, r) not in found]
        if missing:
            wanted[shard] = missing

    async def take(shard: str, rowids: list[int]) -> pa.Table:
        query = _async_table(tables[shard].table).take_row_ids(rowids).select(columns).with_row_id()
        return await query.to_arrow()

    async def take_all() -> list[pa.Table]:
        return await asyncio.gather(*(take(shard, rowids) for shard, rowids in wanted.items()))

    read = {}
    for shard, rows in zip(wanted, run_async(take_all()) if wanted else [], strict=True):
        values = zip(*(rows.column(c).to_pylist() for c in columns), strict=True)
        version = tables[shard].version
        rowids = rows.column("_rowid").to_pylist()
        read.update({(shard, version, r): row for r, row in zip(rowids, values, strict=True)})
    if cache is not None and read:
        cache.put(read)
    found.update(read)
    schema = pa.schema([_ROW_SCHEMA.field(c) for c in columns])
    out = []
    for table, keys in zip(hits, keyed, strict=True):
        missing = [key for key in keys if key not in found]
        if missing:
            rowids = [r for _, _, r in missing][:5]
            raise ShardError(f"{missing[0][0]}: rows {rowids} not found at the version searched")
        values = [found[key] for key in keys]
        rows = pa.table(
            [pa.array([v[i] for v in values], f.type) for i, f in enumerate(schema)], schema=schema
        )
        out.append(
            rows.append_column("score", table.column("score")).append_column("shard", table.column("shard"))
        )
    return out


_ROW_SCHEMA = store.table_schema(1)  # the result columns' types (the vector's size does not matter)


class NoTextIndexError(ValueError):
    """Hybrid search on a shard without full-text indexes."""


class ShardError(RuntimeError):
    """A query that failed inside a shard for a reason of the shard's own (not the user's input)."""


class QueryTimeout(TimeoutError):
    """A query that a shard did not answer within its deadline."""


class MemoryShard:
    """Exact cosine search over small shard tables held in memory: their vectors, row ids and the
    columns an answer shows (HELD_COLUMNS; never source or metadata).

    A LanceDB query costs a few milliseconds of planning even on a tiny table; small shards searched
    many times (Serve) answer from memory instead, many queries in one matrix product. Several shards
    of a group are held as one (``combined``), so a query costs one product and one top-k for all of
    them. The rows, scores and order equal ``search_shard(..., exact=True)`` merged with
    ``merge_topk``: score is 1 - cosine distance, and rows tied with the k-th best are kept or cut by
    chunk_id, as the merge orders them. What it holds per row: ``bytes_per_row`` in pipelines.index.

    Args:
        table: an open LanceDB table, at the version to hold.
        shard: the shard's name, added as a column.
    """

    def __init__(self, table: Any, *, shard: str):
        self._load([(shard, table)])

    @classmethod
    def combined(cls, parts: list[tuple[str, Any]]) -> MemoryShard:
        """One MemoryShard over several (shard name, table at the version to hold) parts."""
        memory = cls.__new__(cls)
        memory._load(parts)
        return memory

    def _load(self, parts: list[tuple[str, Any]]) -> None:
        # Only the columns it needs are read (a scan with a projection), not whole tables.
        columns = [*HELD_COLUMNS, "vector"]
        tables = [
            table.search().select(columns).with_row_id(True).limit(None).to_arrow() for _, table in parts
        ]
        data = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
        vectors = data.column("vector").combine_chunks()
        dim = vectors.type.list_size
        flat = vectors.flatten()  # respects the array's offset, unlike .values
        self.vectors = np.asarray(flat.to_numpy(zero_copy_only=False), dtype=np.float32).reshape(-1, dim)
        norms = np.linalg.norm(self.vectors, axis=1)
        self.norms = np.where(norms > 0, norms, 1.0).astype(np.float32)
        self.rows = data.select(HELD_COLUMNS).combine_chunks()
        self.chunk_ids = (
            self.rows.column("chunk_id").chunk(0) if self.rows.num_rows else pa.array([], pa.string())
        )
        self.rowids = data.column("_rowid").combine_chunks()
        # Each row's shard, as dictionary indices into the names.
        names = pa.array([name for name, _ in parts], pa.string())
        sizes = [t.num_rows for t in tables]
        owner = np.repeat(np.arange(len(parts), dtype=np.int32), sizes)
        self.shards = pa.DictionaryArray.from_arrays(pa.array(owner), names)
        # Where each shard's rows are, by row id: (sorted row ids, their positions), for ``values``.
        starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        rowids = self.rowids.to_numpy()
        self._where: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for (name, _), start, end in zip(parts, starts[:-1], starts[1:], strict=True):
            order = np.argsort(rowids[start:end], kind="stable")
            self._where[name] = (rowids[start:end][order], order + start)
        # Position of each row in chunk_id order: ties in score are cut by it, as merge_topk does.
        order = np.argsort(np.asarray(self.chunk_ids.to_pylist(), dtype=object))
        self.id_rank = np.empty(len(order), np.int32)
        self.id_rank[order] = np.arange(len(order), dtype=np.int32)
        # (key, keyword postings) of the held rows, built apart (``index_terms``, in a thread)
        self.terms: tuple[tuple, Any] | None = None
        self.terms_started: tuple | None = None  # the key of the build under way or done, its thread
        self.terms_thread: Any = None

    def values(self, shard: str, rowids: list[int], columns: list[str]) -> list[tuple] | None:
        """The ``columns`` of a held shard's rows, or None when it does not hold them all."""
        if shard not in self._where or not set(columns) <= set(HELD_COLUMNS):
            return None
        sorted_ids, positions = self._where[shard]
        wanted = np.asarray(rowids, dtype=sorted_ids.dtype)
        at = np.searchsorted(sorted_ids, wanted)
        if len(wanted) and (at.max() >= len(sorted_ids) or not np.array_equal(sorted_ids[at], wanted)):
            return None
        rows = self.rows.take(pa.array(positions[at], pa.int64()))
        return list(zip(*(rows.column(c).to_pylist() for c in columns), strict=True))

    @property
    def num_rows(self) -> int:
        return len(self.chunk_ids)

    @property
    def nbytes(self) -> int:
        where = sum(ids.nbytes + positions.nbytes for ids, positions in self._where.values())
        return (
            self.vectors.nbytes + self.norms.nbytes + self.id_rank.nbytes + self.rows.nbytes
            + self.rowids.nbytes + self.shards.nbytes + where
        )  # fmt: skip

    def search(self, vectors: np.ndarray, ks: list[int]) -> list[pa.Table]:
        """The top ``ks[i]`` rows (KEY_COLUMNS) for each query vector ``vectors[i]``, best first."""
        queries = np.atleast_2d(np.asarray(vectors, dtype=np.float32))
        qnorms = np.linalg.norm(queries, axis=1, keepdims=True)
        queries = queries / np.where(qnorms > 0, qnorms, 1.0)
        cosine = (queries @ self.vectors.T) / self.norms
        scores = (1.0 - (1.0 - cosine)).astype(np.float32)  # as LanceDB: 1 - cosine distance
        return [self._top(row, k) for row, k in zip(scores, ks, strict=True)]

    def text_search(self, query: Any, stats: Any, k: int, terms: Any) -> pa.Table:
        """The top ``k`` held rows (KEY_COLUMNS) by BM25 with the generation's ``stats``, scored from
        ``terms`` (``pipelines.bm25.HeldTerms`` of these rows), rows without a query term left out."""
        scores = terms.scores(query, stats)
        return self._top(scores, k, np.flatnonzero(scores > 0))

    def index_terms(self, columns: list[str], options: dict[str, Any]) -> None:
        """Build the held rows' keyword postings for ``columns``, tokenized with ``options``: ``terms``
        becomes (their key, ``pipelines.bm25.HeldTerms``), set at once."""
        from pipelines import bm25

        built = bm25.HeldTerms({c: self.rows.column(c).to_pylist() for c in columns}, options)
        self.terms = (terms_key(columns, options), built)

    def _top(self, scores: np.ndarray, k: int, among: np.ndarray | None = None) -> pa.Table:
        idx = np.arange(scores.size) if among is None else among
        n = min(k, idx.size)
        if n == 0:
            idx = np.zeros(0, dtype=np.int64)
        else:
            if n < idx.size:
                cutoff = scores[idx][np.argpartition(-scores[idx], n - 1)[:n]].min()
                idx = idx[scores[idx] >= cutoff]  # every row tied with the k-th
            idx = idx[np.lexsort((self.id_rank[idx], -scores[idx]))][:n]
        take = pa.array(idx, pa.int64())
        return pa.table(
            [
                self.chunk_ids.take(take),
                pa.array(scores[idx], pa.float32()),
                self.shards.take(take).cast(pa.string()),
                self.rowids.take(take),
            ],
            schema=KEY_SCHEMA,
        )


def terms_key(columns: list[str] | tuple[str, ...], options: dict[str, Any]) -> tuple:
    """What held keyword postings were built for: the full-text columns and the tokenizer's options."""
    return tuple(columns), tuple(sorted((k, repr(v)) for k, v in options.items()))


@dataclass(frozen=True)
class FreshRows:
    """The rows of a shard committed after its codes were built: row ids and unit float32 vectors, read
    once per table version and searched exactly in memory (at most ``CODES_NEW_ROWS_MAX``). A LanceDB
    scan filtered on ``_rowid`` costs 150-230 ms a query on a 250k-row shard however few rows match:
    it evaluates the filter over every row."""

    rowids: np.ndarray
    vectors: np.ndarray

    @property
    def nbytes(self) -> int:
        return int(self.rowids.nbytes + self.vectors.nbytes)

    @classmethod
    def read(cls, table: Any, new_from: int, limit: int) -> FreshRows:
        """The rows from row id ``new_from`` on, at most ``limit`` of them (one scan of the table)."""
        rows = (
            table.search().where(f"_rowid >= {new_from}").select(["vector"]).with_row_id(True).limit(limit)
        ).to_arrow()
        dim = rows.schema.field("vector").type.list_size
        flat = rows.column("vector").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        vectors = shard_codes.unit_rows(np.asarray(flat, np.float32).reshape(-1, dim))
        return cls(rows.column("_rowid").to_numpy().astype(np.int64), vectors)

    def top(self, queries: np.ndarray, k: int) -> list[np.ndarray]:
        """Each unit query's ``k`` nearest rows' ids (cosine), unordered."""
        if not len(self.rowids):
            return [self.rowids[:0] for _ in queries]
        scores = queries @ self.vectors.T
        k = min(k, len(self.rowids))
        best = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        return [self.rowids[row] for row in best]


@dataclass(frozen=True)
class Snapshot:
    """What a shard answers from: one table version (its own handle, pinned there), its indexes, its
    row count, and whether it is small enough to be searched in memory (its group holds the rows)."""

    version: int
    table: Any
    indexes: ShardIndexes
    rows: int
    in_memory: bool
    codes: ShardCodes | None = None  # the in-memory codes it is searched through (pipelines.codes)
    fresh: FreshRows | None = None  # rows committed after its codes were built (read once per version)

    @property
    def new_rows(self) -> int:
        return len(self.fresh.rowids) if self.fresh is not None else 0


class Shard:
    """One shard table held open for repeated searches, moved to the newest version at most every
    ``refresh_s``.

    Each table version is searched through its own table handle, pinned to it, so every answer is
    computed on exactly the version it reports, even while a refresh moves on to the next one. A
    shard without a vector index and with at most ``memory_rows`` rows is searched in memory by its
    group (``MemoryShard``: LanceDB's exact rows and order); an indexed shard's unfiltered queries go
    through the in-memory codes `embedpipe index` stored (``pipelines.codes``; ``_codes_query``); a
    filtered query, or any other shard, goes through LanceDB: through the ANN index `embedpipe index`
    built and stored in the table (prewarmed into LanceDB's index cache when a version brings a new one
    and no codes serve it), rows added since it was built found by LanceDB's scan of them. Safe to use
    from many threads.

    Args:
        conn: an open LanceDB connection to the db.
        name: the table name (``shard_000``...).
        refresh_s: how often to look for a newer table version (0: before every search).
        index: index settings (ANN query parameters).
        memory_rows: the largest unindexed shard held in memory (0: never).
        codes_at: where the generation's tables are, to load the shard's in-memory codes from (None:
            searched through LanceDB's index only).
    """

    def __init__(
        self,
        conn: Any,
        name: str,
        *,
        refresh_s: float = 1.0,
        index: IndexSettings | None = None,
        memory_rows: int = 0,
        codes_at: store.Location | None = None,
    ):
        self.name = name
        self.conn = conn
        self.codes_at = codes_at
        self.probe = conn.open_table(name)  # only asks for the latest version
        self.refresh_s = refresh_s
        self.memory_rows = memory_rows
        self.index_settings = index or IndexSettings()
        self._snapshot: Snapshot | None = None
        self._checked_at = 0.0
        self._refresh_failed_since: float | None = None  # a refresh failing since then (monotonic)
        self._refresh_error = ""
        self._lock = threading.Lock()

    @property
    def fresh(self) -> bool:
        return self._snapshot is not None and time.monotonic() - self._checked_at < self.refresh_s

    def current(self) -> Snapshot:
        """The snapshot to answer from, moved to the newest table version at most every refresh_s.
        A failing refresh keeps the last good version serving (``stats`` says so)."""
        if self.fresh:
            return self._snapshot
        with self._lock:
            if self.fresh:
                return self._snapshot  # another thread refreshed meanwhile
            try:
                self._snapshot = self._load_latest()
                self._refresh_failed_since = None
            except Exception as exc:
                if self._snapshot is None:
                    raise
                if self._refresh_failed_since is None:
                    self._refresh_failed_since = time.monotonic()
                self._refresh_error = type(exc).__name__
                logger.exception("%s: refresh failed; serving version %d", self.name, self._snapshot.version)
            self._checked_at = time.monotonic()
            return self._snapshot

    def expire(self) -> None:
        """Look for a new version before the next search, whatever refresh_s says."""
        self._checked_at = float("-inf")

    def _load_latest(self) -> Snapshot:
        self.probe.checkout_latest()
        version = self.probe.version
        held = self._snapshot
        if held is not None and held.version == version:
            if not self._codes_wanted(held.indexes):
                return held
            # `embedpipe index` may store codes without a commit (the table was already compacted).
            pointer = shard_codes.pointer(self.codes_at, self.name)
            if (pointer and pointer["file"]) == (held.codes.file if held.codes else None):
                return held
            codes, fresh = self._codes_for(held.table, version, held.rows)
            return Snapshot(version, held.table, held.indexes, held.rows, held.in_memory, codes, fresh)
        table = self.conn.open_table(self.name)
        table.checkout(version)
        indexes = read_indexes(table)
        rows = table.count_rows()
        # Only shards without an ANN index are held (small ones: `embedpipe index` leaves shards under
        # index.exact_below_rows exact); an indexed shard is searched through its index on disk.
        in_memory = indexes.vector_kind == "exact" and 0 < rows <= self.memory_rows
        codes, fresh = None, None
        if self._codes_wanted(indexes):
            codes, fresh = self._codes_for(table, version, rows)
        if (
            codes is None
            and indexes.vector_index_name
            and (
                self._snapshot is None
                or self._snapshot.indexes.vector_index_name != indexes.vector_index_name
            )
        ):
            # Its partitions into LanceDB's index cache now, not on the first queries. The index was
            # built by `embedpipe index` and is only read here, never built.
            table.prewarm_index(indexes.vector_index_name)
        if indexes.vector_kind == "exact" and rows > max(self.memory_rows, SCAN_WARN_ROWS):
            logger.warning("%s: %d rows and no vector index: every query scans them; run `embedpipe index`",
                           self.name, rows)  # fmt: skip
        how = "in memory" if in_memory else f"codes v{codes.version}" if codes else indexes.vector_kind
        logger.info("%s: serving version %d (%s)", self.name, version, how)
        return Snapshot(version, table, indexes, rows, in_memory, codes, fresh)

    def _codes_wanted(self, indexes: ShardIndexes) -> bool:
        return self.codes_at is not None and indexes.vector_kind != "exact" and self.index_settings.codes

    def _codes_for(self, table: Any, version: int, rows: int) -> tuple[ShardCodes | None, FreshRows | None]:
        """The codes to search ``version`` through (read when `embedpipe index` stored new ones, else
        the ones held) and the rows committed after them (``FreshRows``, None when there are none);
        (None, None) when there are no codes that describe this version."""
        held = self._snapshot.codes if self._snapshot is not None else None
        pointer = shard_codes.pointer(self.codes_at, self.name)
        if pointer is None:
            return None, None
        codes = held
        if pointer["version"] <= version and (held is None or held.file != pointer["file"]):
            found = shard_codes.read(self.codes_at, self.name)
            codes = found[0] if found is not None else held
        if codes is None or codes.version > version:
            return None, None
        if version == codes.version:
            return codes, None
        most = CODES_NEW_ROWS_MAX  # a bound of its own: a share of a 10M-row db's shards would be GBs
        fresh = FreshRows.read(table, codes.new_from, limit=most + 1)
        if len(fresh.rowids) > most:
            logger.warning(
                "%s: more than %d of %d rows are newer than the in-memory codes (a compaction or a large "
                "ingest); LanceDB's index serves until `embedpipe index` updates them", self.name, most, rows
            )  # fmt: skip
            return None, None
        return codes, fresh if len(fresh.rowids) else None

    def stats(self) -> dict[str, Any]:
        """Rows, version and indexes served (as of the last refresh), and whether refreshes are
        failing (the shard then serves an old version)."""
        snap = self._snapshot or self.current()
        failing = self._refresh_failed_since is not None
        return {
            "shard": self.name,
            "rows": snap.rows,
            "version": snap.version,
            "vector_index": snap.indexes.vector_kind,
            "in_memory": snap.in_memory,
            "codes": None if snap.codes is None else {"version": snap.codes.version, "new": snap.new_rows},
            "fts": list(snap.indexes.fts_columns),
            "refresh_failing_s": round(time.monotonic() - self._refresh_failed_since, 1) if failing else None,
            "refresh_error": self._refresh_error if failing else None,
        }

    async def vector_query(
        self, snap: Snapshot, vectors: np.ndarray, ks: list[int], where: str | None, exact: bool = False
    ) -> list[pa.Table | Exception]:
        """Each query vector's top ``ks[i]`` through LanceDB, one call for them all, or the error it
        raised (see ``_guarded_async``). A call that fails for a reason of the shard's is tried again one
        query at a time, so that a query that breaks it fails alone."""
        vectors = np.atleast_2d(np.asarray(vectors, np.float32))

        async def run(rows: list[int]) -> list[pa.Table] | Exception:
            if snap.codes is not None and where is None and not exact:
                query = self._codes_query(snap, vectors[rows], [ks[i] for i in rows])
                return await self._guarded_async(query, None)
            k = max(ks[i] for i in rows)
            params = query_params(snap.indexes, k=k, settings=self.index_settings)
            found = await self._guarded_async(
                search_shard_async(
                    snap.table, vectors[rows], k=k, shard=self.name, where=where, params=params, exact=exact
                ),
                where,
            )
            if isinstance(found, Exception):
                return found
            return [hits.slice(0, ks[i]) for i, hits in zip(rows, found, strict=True)]

        together = await run(list(range(len(vectors))))
        if not isinstance(together, Exception):
            return together
        if len(vectors) == 1 or not isinstance(together, ShardError):
            return [together] * len(vectors)
        alone = [await run([i]) for i in range(len(vectors))]
        return [answer if isinstance(answer, Exception) else answer[0] for answer in alone]

    async def _codes_query(self, snap: Snapshot, vectors: np.ndarray, ks: list[int]) -> list[pa.Table]:
        """Each query's top ``ks[i]`` through the shard's in-memory codes: ``refine_factor`` * k
        candidates from the codes (more from 2-bit codes: pipelines.codes.refine_for), and the best k
        of the rows committed after the codes were built (``FreshRows``, searched exactly in memory),
        all scored by exact cosine with their vectors read from the table (one take for the batch;
        rows deleted since are not returned), so that every score is computed alike."""
        codes, settings = snap.codes, self.index_settings
        top = max(ks)
        nprobe = shard_codes.nprobe_for(codes.partitions, settings)
        fresh = snap.fresh
        units = shard_codes.unit_rows(vectors)

        def probe() -> list[np.ndarray]:
            found = [
                row[row >= 0]
                for row in codes.search(vectors, top * shard_codes.refine_for(codes.bits, settings), nprobe)
            ]
            if fresh is None:
                return found
            newer = fresh.top(units, top)
            return [np.concatenate([row, new]) for row, new in zip(found, newer, strict=True)]

        candidates = await asyncio.to_thread(probe)
        wanted = np.unique(np.concatenate(candidates)) if candidates else np.zeros(0, np.int64)
        take = _async_table(snap.table).take_row_ids(wanted.tolist()).select(["chunk_id", "vector"])
        rows = await (take.with_row_id().to_arrow() if len(wanted) else _no_rows(snap.table))
        rowids = rows.column("_rowid").to_numpy()
        dim = vectors.shape[1]
        flat = rows.column("vector").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        matrix = np.asarray(flat, np.float32).reshape(-1, dim)
        norms = np.linalg.norm(matrix, axis=1)
        cosine = units @ matrix.T / np.where(norms > 0, norms, 1.0)
        order = np.argsort(rowids)
        ordered = rowids[order]
        chunk_ids = rows.column("chunk_id").combine_chunks() if rows.num_rows else pa.array([], pa.string())
        answers = []
        for i, k in enumerate(ks):
            mine = np.unique(candidates[i]).astype(np.uint64)
            at = np.minimum(np.searchsorted(ordered, mine), max(len(ordered) - 1, 0))
            present = at[ordered[at] == mine] if len(ordered) else at[:0]
            idx = order[present]
            score = (1.0 - (1.0 - cosine[i, idx])).astype(np.float32)  # as LanceDB: 1 - cosine distance
            hits = pa.table(
                [chunk_ids.take(pa.array(idx, pa.int64())), pa.array(score, pa.float32()),
                 pa.array([self.name] * len(idx), pa.string()), pa.array(rowids[idx], pa.uint64())],
                schema=KEY_SCHEMA,
            )  # fmt: skip
            answers.append(merge_topk([hits], k=k))
        return answers

    async def text_query(
        self, snap: Snapshot, text: str, k: int, where: str | None, ids: bool = True
    ) -> pa.Table | Exception:
        """One query's BM25 top-k with the shard's own statistics, or the error it raised."""
        columns = snap.indexes.fts_columns
        search = text_search_shard_async(
            snap.table, text, k=k, shard=self.name, where=where, columns=columns, ids=ids
        )
        return await self._guarded_async(search, where)

    async def _guarded_async(self, coroutine: Any, where: str | None) -> Any:
        """``await coroutine``, or the error it raised, as a value: one query's failure is not its
        batch's (see ``_blame``)."""
        try:
            return await coroutine
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a value for the caller, which answers for it
            return self._blame(exc, where)

    def _blame(self, exc: Exception, where: str | None) -> Exception:
        """Who a failed query's error is for.

        Hybrid search without full-text indexes is the user's (a 400). So is a predicate LanceDB
        rejects as invalid input (a ValueError; the filter check lets few through), told in words of
        our own: LanceDB's message names columns and types of the schema. The filter is never run a
        second time to tell who is to blame. Anything else is the shard's (ShardError, a 500),
        logged here with its details; the client sees none of them.
        """
        if isinstance(exc, NoTextIndexError):
            return exc
        if where and isinstance(exc, ValueError):  # LanceDB: "Invalid input, ..." for a bad predicate
            logger.info("%s: filter %r rejected by LanceDB: %s", self.name, where, exc)
            return FilterError("invalid filter: it cannot be applied to these columns' values")
        logger.error("%s: query failed", self.name, exc_info=exc)
        return ShardError(f"{self.name}: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
