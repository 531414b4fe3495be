"""One shard table: exact or ANN search through LanceDB, BM25, or exact search of rows held in memory;
and ``Shard``, which keeps a table open at one version at a time and follows new commits.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from lancedb.query import MatchQuery, MultiMatchQuery

from pipelines.config import IndexSettings
from pipelines.filters import FilterError
from pipelines.index import ShardIndexes, query_params, read_indexes

logger = logging.getLogger(__name__)

RESULT_COLUMNS = ["chunk_id", "doc_id", "chunk_index", "title", "text", "source", "metadata"]


def search_shard(
    table: Any,
    vector: np.ndarray,
    *,
    k: int,
    shard: str,
    where: str | None = None,
    params: dict[str, int] | None = None,
    exact: bool = False,
) -> pa.Table:
    """Cosine search of one shard table: exact, or through its ANN index.

    Args:
        table: an open LanceDB table.
        vector: the unit-length query vector.
        k: rows to return from this shard.
        shard: the shard's name, added as a column.
        where: an optional SQL predicate applied before the search.
        params: ANN query parameters (``nprobes``, ``ef``, ``refine_factor``; see pipelines.index).
        exact: scan every row even when the table has an ANN index.

    Returns:
        RESULT_COLUMNS plus ``score`` (cosine similarity, higher is better) and ``shard``.
    """
    query = table.search(vector).distance_type("cosine").select([*RESULT_COLUMNS, "_distance"]).limit(k)
    if exact:
        query = query.bypass_vector_index()
    else:
        for name, value in (params or {}).items():
            query = getattr(query, name)(value)
    if where:
        query = query.where(where, prefilter=True)
    hits = query.to_arrow()
    score = pc.subtract(pa.scalar(1.0, pa.float32()), hits.column("_distance").cast(pa.float32()))
    return _finish(hits.drop_columns(["_distance"]), score, shard)


def text_search_shard(
    table: Any, text: str, *, k: int, shard: str, columns: tuple[str, ...], where: str | None = None
) -> pa.Table:
    """BM25 full-text search of one shard over ``columns`` (each needs an FTS index).

    Returns:
        RESULT_COLUMNS plus ``score`` (BM25, higher is better) and ``shard``.
    """
    if not columns:
        raise NoTextIndexError(f"{shard} has no full-text index; run `embedpipe index --db DIR` first.")
    match = MatchQuery(text, columns[0]) if len(columns) == 1 else MultiMatchQuery(text, list(columns))
    query = table.search(match, query_type="fts").select([*RESULT_COLUMNS, "_score"]).limit(k)
    if where:
        query = query.where(where, prefilter=True)
    hits = query.to_arrow()
    return _finish(hits.drop_columns(["_score"]), hits.column("_score").cast(pa.float32()), shard)


def _finish(hits: pa.Table, score: Any, shard: str) -> pa.Table:
    hits = hits.select(RESULT_COLUMNS).append_column("score", score)
    return hits.append_column("shard", pa.array([shard] * hits.num_rows, pa.string()))


class NoTextIndexError(ValueError):
    """Hybrid search on a shard without full-text indexes."""


class ShardError(RuntimeError):
    """A query that failed inside a shard for a reason of the shard's own (not the user's input)."""


class QueryTimeout(TimeoutError):
    """A query that a shard did not answer within its deadline."""


class MemoryShard:
    """Exact cosine search over shard tables held in memory: their vectors and result columns.

    A LanceDB query costs a few milliseconds of planning even on a tiny table; small shards searched
    many times (Serve) answer from memory instead, many queries in one matrix product. Several shards
    of a group are held as one (``combined``), so a query costs one product and one top-k for all of
    them. The rows, scores and order equal ``search_shard(..., exact=True)`` merged with
    ``merge_topk``: score is 1 - cosine distance, and rows tied with the k-th best are kept or cut by
    chunk_id, as the merge orders them.

    Args:
        table: an open LanceDB table, at the version to hold.
        shard: the shard's name, added as a column.
    """

    def __init__(self, table: Any, *, shard: str):
        self._load([(shard, table)])

    @classmethod
    def combined(cls, parts: list[tuple[str, Any]], *, exact_rows: int | None = None) -> MemoryShard:
        """One MemoryShard over several (shard name, table) parts.

        Args:
            parts: (shard name, table at the version to hold).
            exact_rows: above this many rows, searches go through an IVF index (``ivf_search``)
                instead of scanning every row; None: always scan.
        """
        memory = cls.__new__(cls)
        memory._load(parts)
        if exact_rows is not None and memory.num_rows > exact_rows:
            memory.ivf = IvfSearch(memory.vectors / memory.norms[:, None])
            memory.vectors = None  # the index holds them: its scores are exact inner products
        return memory

    def _load(self, parts: list[tuple[str, Any]]) -> None:
        # Only the columns it needs are read (a scan with a projection), not whole tables.
        columns = [*RESULT_COLUMNS, "vector"]
        tables = [table.search().select(columns).limit(None).to_arrow().select(columns) for _, table in parts]
        data = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
        vectors = data.column("vector").combine_chunks()
        dim = vectors.type.list_size
        flat = vectors.flatten()  # respects the array's offset, unlike .values
        self.vectors = np.asarray(flat.to_numpy(zero_copy_only=False), dtype=np.float32).reshape(-1, dim)
        norms = np.linalg.norm(self.vectors, axis=1)
        self.norms = np.where(norms > 0, norms, 1.0).astype(np.float32)
        self.rows = data.drop_columns(["vector"]).combine_chunks()  # one chunk: cheaper take per query
        # Each row's shard, as dictionary indices into the names.
        names = pa.array([name for name, _ in parts], pa.string())
        owner = np.repeat(np.arange(len(parts), dtype=np.int32), [t.num_rows for t in tables])
        self.shards = pa.DictionaryArray.from_arrays(pa.array(owner), names)
        # Position of each row in chunk_id order: ties in score are cut by it, as merge_topk does.
        chunk_ids = np.asarray(self.rows.column("chunk_id").to_pylist(), dtype=object)
        self.id_rank = np.argsort(np.argsort(chunk_ids))
        self.ivf: IvfSearch | None = None

    @property
    def num_rows(self) -> int:
        return self.rows.num_rows

    @property
    def nbytes(self) -> int:
        vectors = self.vectors.nbytes if self.vectors is not None else self.ivf.nbytes
        return vectors + self.rows.nbytes

    def search(self, vectors: np.ndarray, ks: list[int]) -> list[pa.Table]:
        """The top ``ks[i]`` rows for each query vector ``vectors[i]``, best first."""
        queries = np.atleast_2d(np.asarray(vectors, dtype=np.float32))
        qnorms = np.linalg.norm(queries, axis=1, keepdims=True)
        queries = queries / np.where(qnorms > 0, qnorms, 1.0)
        if self.ivf is not None:
            return [
                self._top_of(*self.ivf.candidates(query, k), k) for query, k in zip(queries, ks, strict=True)
            ]
        cosine = (queries @ self.vectors.T) / self.norms
        scores = (1.0 - (1.0 - cosine)).astype(np.float32)  # as LanceDB: 1 - cosine distance
        return [self._top(row, k) for row, k in zip(scores, ks, strict=True)]

    def _top_of(self, rows: np.ndarray, cosine: np.ndarray, k: int) -> pa.Table:
        """The top k among candidate rows and their exact cosines, ties cut by chunk_id."""
        scores = (1.0 - (1.0 - cosine)).astype(np.float32)
        order = np.lexsort((self.id_rank[rows], -scores))[:k]
        return self._rows(rows[order], scores[order])

    def _top(self, scores: np.ndarray, k: int) -> pa.Table:
        n = min(k, scores.size)
        if n == 0:
            idx = np.zeros(0, dtype=np.int64)
        else:
            if n < scores.size:
                cutoff = scores[np.argpartition(-scores, n - 1)[:n]].min()
                idx = np.flatnonzero(scores >= cutoff)  # every row tied with the k-th
            else:
                idx = np.arange(scores.size)
            idx = idx[np.lexsort((self.id_rank[idx], -scores[idx]))][:n]
        return self._rows(idx, scores[idx])

    def _rows(self, idx: np.ndarray, scores: np.ndarray) -> pa.Table:
        hits = self.rows.take(idx).append_column("score", pa.array(scores, pa.float32()))
        return hits.append_column("shard", self.shards.take(pa.array(idx)).cast(pa.string()))


class IvfSearch:
    """An inverted-file index over unit vectors held in memory (faiss ``IndexIVFFlat``, inner product),
    for groups too large to scan per query. ~2 * sqrt(rows) lists; a query probes 1/64 of them (at
    least 16) and takes 2 x k candidates with their exact inner products (the cosines: the vectors
    are unit). On 1M SciFact-like rows (``benchmarks/ann_recall.py``) that gave recall@10 0.98 against
    an exact scan in ~1.5 ms (62 probes: 0.989 in ~2.9 ms).
    """

    def __init__(self, unit: np.ndarray, *, probe_fraction: float = 1 / 64, refine: int = 2, seed: int = 0):
        import faiss

        rows, dim = unit.shape
        self.nlist = max(1, min(rows // 39, int(2 * np.sqrt(rows))))
        self.refine = refine
        self.index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, self.nlist, faiss.METRIC_INNER_PRODUCT)
        sample = np.random.default_rng(seed).choice(rows, min(rows, self.nlist * 64), replace=False)
        self.index.train(np.ascontiguousarray(unit[np.sort(sample)]))
        self.index.add(np.ascontiguousarray(unit))
        self.index.nprobe = min(self.nlist, max(16, int(self.nlist * probe_fraction)))
        self.nbytes = rows * dim * 4

    def candidates(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Candidate rows for the query's top k, and their cosines."""
        found, rows = self.index.search(np.ascontiguousarray(query[None], dtype=np.float32), k * self.refine)
        keep = rows[0] >= 0
        return rows[0][keep], found[0][keep]


@dataclass(frozen=True)
class Snapshot:
    """What a shard answers from: one table version (its own handle, pinned there), its indexes, its
    row count, and whether it is small enough to be searched in memory (its group holds the rows)."""

    version: int
    table: Any
    indexes: ShardIndexes
    rows: int
    in_memory: bool


class Shard:
    """One shard table held open for repeated searches, moved to the newest version at most every
    ``refresh_s``.

    Each table version is searched through its own table handle, pinned to it, so every answer is
    computed on exactly the version it reports, even while a refresh moves on to the next one. A
    shard with at most ``memory_rows`` rows is searched in memory by its group (``MemoryShard``:
    LanceDB's exact rows and order, or an in-memory IVF index for a large group); a filtered query,
    or a larger shard, goes through LanceDB (through its ANN index, if it has one). Safe to use from
    many threads.

    Args:
        conn: an open LanceDB connection to the db.
        name: the table name (``shard_000``...).
        refresh_s: how often to look for a newer table version (0: before every search).
        index: index settings (ANN query parameters).
        memory_rows: the largest shard held in memory (0: never).
    """

    def __init__(
        self,
        conn: Any,
        name: str,
        *,
        refresh_s: float = 1.0,
        index: IndexSettings | None = None,
        memory_rows: int = 0,
    ):
        self.name = name
        self.conn = conn
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
        if self._snapshot is not None and self._snapshot.version == version:
            return self._snapshot
        table = self.conn.open_table(self.name)
        table.checkout(version)
        indexes = read_indexes(table)
        rows = table.count_rows()
        in_memory = 0 < rows <= self.memory_rows
        logger.info("%s: serving version %d (%s)", self.name, version,
                    "in memory" if in_memory else indexes.vector_kind)  # fmt: skip
        return Snapshot(version, table, indexes, rows, in_memory)

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
            "fts": list(snap.indexes.fts_columns),
            "refresh_failing_s": round(time.monotonic() - self._refresh_failed_since, 1) if failing else None,
            "refresh_error": self._refresh_error if failing else None,
        }

    def vector_query(
        self, snap: Snapshot, vector: np.ndarray, k: int, where: str | None, exact: bool = False
    ) -> pa.Table | Exception:
        """One query's top-k through LanceDB, or the error it raised (see ``_guarded``)."""
        params = query_params(snap.indexes, k=k, settings=self.index_settings)
        run = lambda: search_shard(  # noqa: E731
            snap.table, np.asarray(vector, np.float32), k=k, shard=self.name, where=where, params=params,
            exact=exact,
        )  # fmt: skip
        return self._guarded(run, where)

    def text_query(self, snap: Snapshot, text: str, k: int, where: str | None) -> pa.Table | Exception:
        """One query's BM25 top-k, or the error it raised."""
        run = lambda: text_search_shard(  # noqa: E731
            snap.table, text, k=k, shard=self.name, where=where, columns=snap.indexes.fts_columns
        )
        return self._guarded(run, where)

    def _guarded(self, run: Callable[[], pa.Table], where: str | None) -> pa.Table | Exception:
        """``run()``, or the error it raised, as a value: one query's failure is not its batch's.

        Hybrid search without full-text indexes is the user's (a 400). So is a predicate LanceDB
        rejects as invalid input (a ValueError; the filter check lets few through), told in words of
        our own: LanceDB's message names columns and types of the schema. The filter is never run a
        second time to tell who is to blame. Anything else is the shard's (ShardError, a 500),
        logged here with its details; the client sees none of them.
        """
        try:
            return run()
        except NoTextIndexError as exc:
            return exc
        except Exception as exc:  # noqa: BLE001 - a value for the caller, which answers for it
            if where and isinstance(exc, ValueError):  # LanceDB: "Invalid input, ..." for a bad predicate
                logger.info("%s: filter %r rejected by LanceDB: %s", self.name, where, exc)
                return FilterError("invalid filter: it cannot be applied to these columns' values")
            logger.exception("%s: query failed", self.name)
            return ShardError(f"{self.name}: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
