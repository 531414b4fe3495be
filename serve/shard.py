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
from pipelines.index import ShardIndexes, query_params, read_indexes
from pipelines.search import MemoryShard, NoTextIndexError, search_shard, text_search_shard

logger = logging.getLogger(__name__)


class FilterError(ValueError):
    """A filter predicate that LanceDB cannot run (bad syntax, unknown column)."""


@dataclass(frozen=True)
class _Snapshot:
    """What the shard serves from: one table version, its indexes, and its rows in memory if small."""

    version: int
    indexes: ShardIndexes
    memory: MemoryShard | None


@serve.deployment(max_ongoing_requests=32)
class ShardSearcher:
    """Holds one shard table open and answers searches on it, many queries per call.

    The table stays at one version between refreshes, so every answer is computed on exactly the
    version it reports; the router never caches a result under newer versions than the data behind it.
    A shard without a vector index and with at most ``memory_rows`` rows is searched in memory
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
        self.table = lancedb.connect(db).open_table(shard)
        self.refresh_s = refresh_s
        self.memory_rows = memory_rows
        self.index_settings = IndexSettings.model_validate(index or {})
        self._snapshot: _Snapshot | None = None
        self._checked_at = 0.0
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
            return self._refresh_locked()

    def _refresh_locked(self) -> _Snapshot:
        now = time.monotonic()
        if self._snapshot is not None and now - self._checked_at < self.refresh_s:
            return self._snapshot  # another thread refreshed meanwhile
        self.table.checkout_latest()
        self._checked_at = now
        version = self.table.version
        self.table.checkout(version)  # pinned: concurrent commits are seen at the next refresh
        if self._snapshot is None or self._snapshot.version != version:
            indexes = read_indexes(self.table)
            memory = None
            if indexes.vector_kind == "exact" and 0 < self.table.count_rows() <= self.memory_rows:
                memory = MemoryShard(self.table, shard=self.shard)
            self._snapshot = _Snapshot(version, indexes, memory)
            logger.info("%s: serving version %d (%s)", self.shard, version,
                        "in memory" if memory else indexes.vector_kind)  # fmt: skip
        return self._snapshot

    async def search_many(
        self, vectors: np.ndarray, ks: list[int], wheres: list[str | None]
    ) -> tuple[list[bytes | Exception], int]:
        """Each query's top-k rows (or the error its filter raised), and the table version searched.

        Rows travel as Arrow IPC bytes (``decode`` reads them): Ray pickles an Arrow table in about a
        millisecond each way, the IPC bytes in a few microseconds. Searches from memory run on the
        replica's event loop (well under a millisecond a query); LanceDB searches in a thread.

        Args:
            vectors: unit query vectors, one row per query.
            ks: rows to return per query.
            wheres: an optional SQL predicate per query, applied before the search.
        """
        snap = await self._current_async()
        if snap.memory is not None and not any(wheres):
            return self._vector_rows(snap, vectors, ks, wheres), snap.version
        return await asyncio.to_thread(self._vector_rows, snap, vectors, ks, wheres), snap.version

    async def text_search_many(
        self, texts: list[str], ks: list[int], wheres: list[str | None]
    ) -> tuple[list[bytes | Exception], int]:
        """Each query's BM25 top-k rows (or its error) as in ``search_many``, and the version searched."""
        snap = await self._current_async()
        return await asyncio.to_thread(self._text_rows, snap, texts, ks, wheres), snap.version

    def search(
        self, vector: list[float] | np.ndarray, k: int, where: str | None = None
    ) -> tuple[pa.Table, int]:
        """One query's top-k rows and the table version searched; a bad filter raises FilterError."""
        snap = self._current()
        (hits,) = self._vector_rows(snap, np.atleast_2d(np.asarray(vector, np.float32)), [k], [where])
        return decode(hits), snap.version

    def text_search(self, text: str, k: int, where: str | None = None) -> tuple[pa.Table, int]:
        """One query's BM25 top-k rows and the table version searched."""
        snap = self._current()
        (hits,) = self._text_rows(snap, [text], [k], [where])
        return decode(hits), snap.version

    async def version(self) -> int:
        return (await self._current_async()).version

    def _vector_rows(
        self, snap: _Snapshot, vectors: np.ndarray, ks: list[int], wheres: list[str | None]
    ) -> list[bytes | Exception]:
        answers: list[pa.Table | Exception | None] = [None] * len(ks)
        plain = [i for i, where in enumerate(wheres) if not where] if snap.memory else []
        if plain:
            found = snap.memory.search(vectors[plain], [ks[i] for i in plain])
            for i, hits in zip(plain, found, strict=True):
                answers[i] = hits
        for i, answer in enumerate(answers):
            if answer is None:
                params = query_params(snap.indexes, k=ks[i], settings=self.index_settings)
                answers[i] = self._guarded(
                    lambda i=i, params=params: search_shard(
                        self.table, np.asarray(vectors[i], dtype=np.float32), k=ks[i], shard=self.shard,
                        where=wheres[i], params=params,
                    ),
                    wheres[i],
                )  # fmt: skip
        return [_encode(a) for a in answers]

    def _text_rows(
        self, snap: _Snapshot, texts: list[str], ks: list[int], wheres: list[str | None]
    ) -> list[bytes | Exception]:
        return [
            _encode(
                self._guarded(
                    lambda text=text, k=k, where=where: text_search_shard(
                        self.table,
                        text,
                        k=k,
                        shard=self.shard,
                        where=where,
                        columns=snap.indexes.fts_columns,
                    ),
                    where,
                )  # fmt: skip
            )
            for text, k, where in zip(texts, ks, wheres, strict=True)
        ]

    def stats(self) -> dict[str, Any]:
        snap = self._current()
        return {
            "shard": self.shard,
            "rows": self.table.count_rows(),
            "version": snap.version,
            "vector_index": snap.indexes.vector_kind,
            "in_memory": snap.memory is not None,
            "fts": list(snap.indexes.fts_columns),
        }

    def _guarded(self, run: Callable[[], pa.Table], where: str | None) -> pa.Table | Exception:
        """``run()``, or the user's error it raised: a bad filter or a missing full-text index.

        Some bad predicates only fail while the query executes, as a RuntimeError that could as well be
        a fault of the shard; the filter is then run alone, and blamed only if it fails alone too.
        """
        try:
            return run()
        except NoTextIndexError as exc:
            return exc
        except ValueError as exc:  # LanceDB: "Invalid input, ..." for a predicate it cannot parse
            if not where:
                raise
            return _filter_error(exc)
        except RuntimeError as exc:
            if not where:
                raise
            try:
                self.table.count_rows(where)
            except Exception as probe:  # noqa: BLE001 - any failure of the filter alone is the filter's
                return _filter_error(probe)
            raise exc from None


def _encode(answer: pa.Table | Exception) -> bytes | Exception:
    if isinstance(answer, Exception):
        return answer
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, answer.schema) as writer:
        writer.write_table(answer)
    return sink.getvalue().to_pybytes()


def decode(answer: bytes | Exception) -> pa.Table:
    """One query's rows from a shard's answer; the user's error it holds is raised."""
    if isinstance(answer, Exception):
        raise answer
    return pa.ipc.open_stream(answer).read_all()


def _filter_error(exc: Exception) -> FilterError:
    text = str(exc).removeprefix("Invalid input, ").removeprefix("lance error: ")
    return FilterError(f"invalid filter: {text.splitlines()[0][:500]}")
