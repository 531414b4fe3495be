"""ShardGroupSearcher: a Serve deployment holding a group of shards (``pipelines.search.ShardGroup``),
for layouts that spread the shards over a cluster's nodes. On one node the router holds every shard
itself and no group deployment runs."""

from __future__ import annotations

import asyncio
import functools
import threading
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

    Group ``group`` of ``groups`` holds shards group, group + groups, ... of whichever db generation a
    call names (the router passes the one it answers from): after ``embedpipe promote`` the group opens
    the new generation's shards on its first call, and keeps the previous one open for calls still
    naming it.

    Args:
        db: the db.
        group: this group's number.
        groups: how many groups the shards are dealt to.
        refresh_s: how often to look for newer table versions.
        index: index settings (ANN query parameters).
        memory_rows: the largest unindexed shard held in memory.
        threads: search threads (default: 2 per shard).
    """

    KEEP = 3  # generations held open

    def __init__(
        self,
        db: str | store.Location,
        group: int,
        groups: int,
        refresh_s: float = 1.0,
        index: dict[str, Any] | None = None,
        memory_rows: int = 0,
        threads: int | None = None,
    ):
        self.db, self.group, self.groups = store.location(db), group, groups
        self.options = {
            "refresh_s": refresh_s, "index": IndexSettings.model_validate(index or {}),
            "memory_rows": memory_rows, "threads": threads,
        }  # fmt: skip
        self._held: dict[int, ShardGroup] = {}  # by generation, the one used last at the end
        self._recent: int | None = None
        self._lock = threading.Lock()
        self._of(store.read_catalog(self.db).live)  # a db that cannot be read fails at start

    def _of(self, generation: int) -> ShardGroup:
        with self._lock:
            if generation not in self._held:
                manifest = store.read_manifest(self.db, generation)
                names = [store.shard_name(i) for i in range(manifest.shards)][self.group :: self.groups]
                self._held[generation] = ShardGroup(self.db, names, generation=generation, **self.options)
                # Closed: the one used longest ago (after a rollback that is not the oldest).
                while len(self._held) > self.KEEP:
                    self._held.pop(next(iter(self._held))).close()
            self._held[generation] = self._held.pop(generation)  # most recently used last
            self._recent = generation
            return self._held[generation]

    async def search(
        self,
        vectors: np.ndarray,
        ks: list[int],
        wheres: list[str | None],
        texts: list[str | None],
        timeout_s: float | None = None,
        generation: int | None = None,
        by_vector: list[bool] | None = None,
    ) -> tuple[list[tuple[bytes | None, bytes | None] | Exception], tuple[int, ...]]:
        """Each query's hits (ids, scores, row ids: ``pipelines.search.KEY_COLUMNS``; Arrow IPC bytes:
        Ray pickles an Arrow table in about a millisecond each way, its IPC bytes in microseconds) or
        its error, and the table versions searched (the router reads the final rows at them)."""
        group = await self._group(generation)
        search = functools.partial(group.search, timeout_s=timeout_s, by_vector=by_vector)
        found = await asyncio.to_thread(search, vectors, ks, wheres, texts)
        answers = [
            answer if isinstance(answer, Exception) else (encode(answer.vector), encode(answer.text))
            for answer in found.answers
        ]
        return answers, found.versions

    async def versions(self, generation: int | None = None) -> tuple[int, ...]:
        group = await self._group(generation)
        return group.versions() if group.fresh else await asyncio.to_thread(group.versions)

    async def stats(self, generation: int | None = None) -> dict[str, Any]:
        """Each shard's stats, and what the group holds in memory."""
        group = await self._group(generation)
        return await asyncio.to_thread(lambda: {"shards": group.stats(), "memory": group.memory()})

    async def _group(self, generation: int | None) -> ShardGroup:
        if generation is None:
            generation = (await asyncio.to_thread(store.read_catalog, self.db)).live
        held = self._held.get(generation)
        if held is not None and generation == self._recent:
            return held  # the usual case: the generation of the last call
        return await asyncio.to_thread(self._of, generation)


def encode(rows: pa.Table | None) -> bytes | None:
    if rows is None:
        return None
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, rows.schema) as writer:
        writer.write_table(rows)
    return sink.getvalue().to_pybytes()


def decode(answer: tuple[bytes | None, bytes | None] | Exception) -> Partial:
    """One query's Partial from a group deployment's answer; the error it holds is raised."""
    if isinstance(answer, Exception):
        raise answer
    vector, text = (pa.ipc.open_stream(b).read_all() if b is not None else None for b in answer)
    return Partial(vector, text)
