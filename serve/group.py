"""ShardGroupSearcher: a Serve deployment holding a group of shards (``pipelines.search.ShardGroup``),
for layouts that spread the shards over a cluster's nodes. On one node the router holds every shard
itself and no group deployment runs."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pyarrow as pa
from ray import serve

from pipelines import store
from pipelines.config import IndexSettings
from pipelines.search import Partial, ShardGroup


@serve.deployment(max_ongoing_requests=32)
class ShardGroupSearcher:
    """Searches its shards side by side and answers each query with its group's merged rows.

    Args:
        db: the db directory.
        shards: the shard tables of this group.
        refresh_s: how often to look for newer table versions.
        index: index settings (ANN query parameters).
        memory_rows: the largest shard held in memory.
        exact_rows: held rows scanned per query; more go through an in-memory IVF index.
        threads: search threads (default: 2 per shard).
    """

    def __init__(
        self,
        db: str | store.Location,
        shards: list[str],
        refresh_s: float = 1.0,
        index: dict[str, Any] | None = None,
        memory_rows: int = 0,
        threads: int | None = None,
        exact_rows: int = 200_000,
    ):
        self.group = ShardGroup(
            db, shards, refresh_s=refresh_s, index=IndexSettings.model_validate(index or {}),
            memory_rows=memory_rows, threads=threads, exact_rows=exact_rows,
        )  # fmt: skip

    async def search(
        self,
        vectors: np.ndarray,
        ks: list[int],
        wheres: list[str | None],
        texts: list[str | None],
        timeout_s: float | None = None,
    ) -> tuple[list[tuple[bytes, bytes | None] | Exception], tuple[int, ...]]:
        """Each query's rows (Arrow IPC bytes: Ray pickles an Arrow table in about a millisecond each
        way, its IPC bytes in microseconds) or its error, and the table versions searched."""
        found = await asyncio.to_thread(self.group.search, vectors, ks, wheres, texts, timeout_s=timeout_s)
        answers = [
            answer if isinstance(answer, Exception) else (encode(answer.vector), encode(answer.text))
            for answer in found.answers
        ]
        return answers, found.versions

    async def versions(self) -> tuple[int, ...]:
        return self.group.versions() if self.group.fresh else await asyncio.to_thread(self.group.versions)

    async def stats(self) -> list[dict[str, Any]]:
        return await asyncio.to_thread(self.group.stats)


def encode(rows: pa.Table | None) -> bytes | None:
    if rows is None:
        return None
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, rows.schema) as writer:
        writer.write_table(rows)
    return sink.getvalue().to_pybytes()


def decode(answer: tuple[bytes, bytes | None] | Exception) -> Partial:
    """One query's Partial from a group deployment's answer; the error it holds is raised."""
    if isinstance(answer, Exception):
        raise answer
    vector, text = (pa.ipc.open_stream(b).read_all() if b is not None else None for b in answer)
    return Partial(vector, text)
