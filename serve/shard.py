"""ShardSearcher: one Serve deployment per shard table, running the same search code as the CLI."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import lancedb
import numpy as np
import pyarrow as pa
from ray import serve

from pipelines.config import IndexSettings
from pipelines.filters import FilterError
from pipelines.index import ShardIndexes, query_params, read_indexes
from pipelines.search import MemoryShard, NoTextIndexError, search_shard, text_search_shard

logger = logging.getLogger(__name__)

# Memory searches smaller than this (rows x queries) run on the replica's event loop; larger ones,
# like every LanceDB query, in a thread.
INLINE_SCORES = 262_144


class ShardError(RuntimeError):
    """A query that failed inside a shard for a reason of the shard's own (not the user's input)."""


class QueryTimeout(TimeoutError):
    """A query that a shard did not answer within its deadline."""


@dataclass(frozen=True)
class _Snapshot:
    """What the shard serves from: one table version (its own handle, pinned there), its indexes,
    and its rows in memory if small."""

    version: int
    table: Any
    indexes: ShardIndexes
    memory: MemoryShard | None


@serve.deployment(max_ongoing_requests=32)
class ShardSearcher:
    """Holds one shard table open and answers searches on it, many queries per call.

    Each table version is served through its own table handle, pinned to it, so every answer is
    computed on exactly the version it reports, even while a refresh moves on to the next one; the
    router never caches a result under newer versions than the data behind it. A shard without a
    vector index and with at most ``memory_rows`` rows is searched in memory
    (``pipelines.search.MemoryShard``: the same rows and order as LanceDB's exact search); a filtered
    query, or a larger or indexed shard, goes through LanceDB.

    Args:
        db: the db directory.
        shard: the table name (``shard_000``...).
        refresh_s: how often to look for a newer table version (0: before every query).
        index: index settings (ANN query parameters).
        memory_rows: the largest exact shard held in memory (0: never).
    """

    def __init__(
        self,
        db: str,
        shard: str,
        refresh_s: float = 1.0,
        index: dict[str, Any] | None = None,
        memory_rows: int = 0,
    ):
        self.shard = shard
        self.conn = lancedb.connect(db)
        self.probe = self.conn.open_table(shard)  # only asks for the latest version
        self.refresh_s = refresh_s
        self.memory_rows = memory_rows
        self.index_settings = IndexSettings.model_validate(index or {})
        self._snapshot: _Snapshot | None = None
        self._checked_at = 0.0
        self._refresh_failed_since: float | None = None  # a refresh failing since then (monotonic)
        self._refresh_error = ""
        self._lock = threading.Lock()  # refreshes run in threads

    def _fresh(self) -> bool:
        return self._snapshot is not None and time.monotonic() - self._checked_at < self.refresh_s

    def _current(self) -> _Snapshot:
        """The snapshot to answer from, moved to the newest table version at most every refresh_s."""
        return self._snapshot if self._fresh() else self._refresh()

    async def _current_async(self) -> _Snapshot:
        # A refresh reads the table (all of it, for a shard held in memory): not on the event loop.
        return self._snapshot if self._fresh() else await asyncio.to_thread(self._refresh)

    def _refresh(self) -> _Snapshot:
        with self._lock:
            if self._fresh():
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
                logger.exception("%s: refresh failed; serving version %d", self.shard, self._snapshot.version)
            self._checked_at = time.monotonic()
            return self._snapshot

    def _load_latest(self) -> _Snapshot:
        self.probe.checkout_latest()
        version = self.probe.version
        if self._snapshot is not None and self._snapshot.version == version:
            return self._snapshot
        table = self.conn.open_table(self.shard)
        table.checkout(version)
        indexes = read_indexes(table)
        memory = None
        if indexes.vector_kind == "exact" and 0 < table.count_rows() <= self.memory_rows:
            memory = MemoryShard(table, shard=self.shard)
        logger.info("%s: serving version %d (%s)", self.shard, version,
                    "in memory" if memory else indexes.vector_kind)  # fmt: skip
        return _Snapshot(version, table, indexes, memory)

    async def search_many(
        self,
        vectors: np.ndarray,
        ks: list[int],
        wheres: list[str | None],
        timeout_s: float | None = None,
    ) -> tuple[list[bytes | Exception], int]:
        """Each query's top-k rows (or the error it raised), and the table version searched.

        Rows travel as Arrow IPC bytes (``decode`` reads them): Ray pickles an Arrow table in about a
        millisecond each way, the IPC bytes in a few microseconds. Small memory searches run on the
        replica's event loop; the rest in threads, LanceDB queries side by side.

        Args:
            vectors: unit query vectors, one row per query.
            ks: rows to return per query.
            wheres: an optional predicate per query (``pipelines.filters.compile_filter``'s output),
                applied before the search.
            timeout_s: a LanceDB query not done by then answers QueryTimeout (its thread runs on).
        """
        snap = await self._current_async()
        plain = [i for i, where in enumerate(wheres) if not where] if snap.memory else []
        answers: list[bytes | Exception | None] = [None] * len(ks)
        if plain:
            if snap.memory.num_rows * len(plain) <= INLINE_SCORES:
                found = self._memory_rows(snap, vectors, ks, plain)
            else:
                found = await asyncio.to_thread(self._memory_rows, snap, vectors, ks, plain)
            for i, hits in zip(plain, found, strict=True):
                answers[i] = hits
        pending = [i for i, answer in enumerate(answers) if answer is None]
        found = await asyncio.gather(
            *(
                _within(timeout_s, self.shard, self._lancedb_rows, snap, vectors[i], ks[i], wheres[i])
                for i in pending
            )
        )
        for i, hits in zip(pending, found, strict=True):
            answers[i] = hits
        return answers, snap.version

    async def text_search_many(
        self,
        texts: list[str],
        ks: list[int],
        wheres: list[str | None],
        timeout_s: float | None = None,
    ) -> tuple[list[bytes | Exception], int]:
        """Each query's BM25 top-k rows (or its error) as in ``search_many``, and the version searched."""
        snap = await self._current_async()
        found = await asyncio.gather(
            *(
                _within(timeout_s, self.shard, self._text_rows, snap, t, k, w)
                for t, k, w in zip(texts, ks, wheres, strict=True)
            )
        )
        return list(found), snap.version

    def search(
        self, vector: list[float] | np.ndarray, k: int, where: str | None = None
    ) -> tuple[pa.Table, int]:
        """One query's top-k rows and the table version searched; a bad filter raises FilterError."""
        snap = self._current()
        vectors = np.atleast_2d(np.asarray(vector, np.float32))
        if snap.memory is not None and not where:
            (hits,) = self._memory_rows(snap, vectors, [k], [0])
        else:
            hits = self._lancedb_rows(snap, vectors[0], k, where)
        return decode(hits), snap.version

    def text_search(self, text: str, k: int, where: str | None = None) -> tuple[pa.Table, int]:
        """One query's BM25 top-k rows and the table version searched."""
        snap = self._current()
        return decode(self._text_rows(snap, text, k, where)), snap.version

    async def version(self) -> int:
        return (await self._current_async()).version

    def stats(self) -> dict[str, Any]:
        """Rows, version and indexes served, and whether refreshes are failing (the shard then serves
        an old version: /healthz says degraded)."""
        snap = self._current()
        failing = self._refresh_failed_since is not None
        return {
            "shard": self.shard,
            "rows": snap.table.count_rows(),
            "version": snap.version,
            "vector_index": snap.indexes.vector_kind,
            "in_memory": snap.memory is not None,
            "fts": list(snap.indexes.fts_columns),
            "refresh_failing_s": round(time.monotonic() - self._refresh_failed_since, 1) if failing else None,
            "refresh_error": self._refresh_error if failing else None,
        }

    def _memory_rows(
        self, snap: _Snapshot, vectors: np.ndarray, ks: list[int], rows: list[int]
    ) -> list[bytes]:
        return [_encode(hits) for hits in snap.memory.search(vectors[rows], [ks[i] for i in rows])]

    def _lancedb_rows(
        self, snap: _Snapshot, vector: np.ndarray, k: int, where: str | None
    ) -> bytes | Exception:
        params = query_params(snap.indexes, k=k, settings=self.index_settings)
        run = lambda: search_shard(  # noqa: E731
            snap.table,
            np.asarray(vector, dtype=np.float32),
            k=k,
            shard=self.shard,
            where=where,
            params=params,
        )
        return _encode(self._guarded(run, where))

    def _text_rows(self, snap: _Snapshot, text: str, k: int, where: str | None) -> bytes | Exception:
        run = lambda: text_search_shard(  # noqa: E731
            snap.table, text, k=k, shard=self.shard, where=where, columns=snap.indexes.fts_columns
        )
        return _encode(self._guarded(run, where))

    def _guarded(self, run: Callable[[], pa.Table], where: str | None) -> pa.Table | Exception:
        """``run()``, or the error it raised, as a value: one query's failure is not its batch's.

        Hybrid search without full-text indexes is the user's (a 400). So is a predicate LanceDB
        rejects as invalid input (a ValueError; the router's filter check lets few through), told in
        words of our own: LanceDB's message names columns and types of the schema. The filter is never
        run a second time to tell who is to blame. Anything else is the shard's (ShardError, a 500),
        logged here with its details; the client sees none of them.
        """
        try:
            return run()
        except NoTextIndexError as exc:
            return exc
        except Exception as exc:  # noqa: BLE001 - returned to the router, which answers for it
            if where and isinstance(exc, ValueError):  # LanceDB: "Invalid input, ..." for a bad predicate
                logger.info("%s: filter %r rejected by LanceDB: %s", self.shard, where, exc)
                return FilterError("invalid filter: it cannot be applied to these columns' values")
            logger.exception("%s: query failed", self.shard)
            return ShardError(f"{self.shard}: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}")


def _encode(answer: pa.Table | Exception) -> bytes | Exception:
    if isinstance(answer, Exception):
        return answer
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, answer.schema) as writer:
        writer.write_table(answer)
    return sink.getvalue().to_pybytes()


def decode(answer: bytes | Exception) -> pa.Table:
    """One query's rows from a shard's answer; the error it holds is raised."""
    if isinstance(answer, Exception):
        raise answer
    return pa.ipc.open_stream(answer).read_all()


async def _within(timeout_s: float | None, shard: str, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` in a thread, or QueryTimeout as the answer once ``timeout_s`` has passed (a
    LanceDB query cannot be stopped; its thread finishes on its own and its answer is dropped)."""
    try:
        return await asyncio.wait_for(asyncio.to_thread(fn, *args), timeout_s)
    except TimeoutError:
        logger.warning("%s: a query ran past its deadline of %.3g s", shard, timeout_s)
        return QueryTimeout(f"{shard}: no answer within {timeout_s:g} s")
