"""ShardGroup: several shard tables searched side by side in one process, each query's rows merged.

``embedpipe query`` searches one group holding every shard; a Serve router holds one the same way (or
calls group deployments spread over a cluster's nodes and merges their answers with ``combine``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa

from pipelines import store
from pipelines.config import IndexSettings
from pipelines.search.merge import merge_topk, rrf_fuse
from pipelines.search.shard import MemoryShard, QueryTimeout, Shard, ShardError, Snapshot

logger = logging.getLogger(__name__)

# Memory searches smaller than this (rows x queries) run in the calling thread; larger ones in the
# pool, beside the LanceDB queries (numpy releases the GIL).
INLINE_SCORES = 262_144


class Partial(NamedTuple):
    """One query's answer from a group: the vector top-k merged over its shards, and for a hybrid
    query the BM25 top-k too."""

    vector: pa.Table | None
    text: pa.Table | None


class GroupAnswer(NamedTuple):
    """Each query's Partial (or the error that ended it), and the table version of every shard."""

    answers: list[Partial | Exception]
    versions: tuple[int, ...]


class ShardGroup:
    """Shard tables of one db held open in this process and searched concurrently.

    The group's small exact shards are held in memory as one (``MemoryShard.combined``, rebuilt when
    one of them moves to a new version): a batch of queries costs one matrix product and one top-k
    per query for all of them. Other shards, and filtered queries, cost one LanceDB query per (query,
    shard), run in a thread pool (LanceDB and numpy release the GIL); each query's rows are merged
    over the group's shards before it is answered. Every answer reports the table versions it was
    computed on.

    Args:
        db: the db directory.
        shards: the shard tables this group holds (default: every shard of the db).
        refresh_s: how often each shard looks for a newer table version (0: before every search).
        index: index settings (ANN query parameters).
        memory_rows: shards up to this many rows are held in memory (0: never).
        exact_rows: held rows up to this many are scanned per query; above, an in-memory IVF index
            finds candidates that are then scored exactly (built in the background when the held
            shards change: the previous versions serve meanwhile).
        threads: the pool's threads (default: 2 per shard, at least 4, at most 32).
        generation: the db generation whose shards these are (default: the live one when opened).
    """

    def __init__(
        self,
        db: str | store.Location,
        shards: list[str] | None = None,
        *,
        refresh_s: float = 1.0,
        index: IndexSettings | None = None,
        memory_rows: int = 0,
        exact_rows: int = 200_000,
        threads: int | None = None,
        generation: int | None = None,
    ):
        loc = store.location(db)
        self.manifest = store.read_manifest(loc, generation)
        conn = store.tables_of(loc, self.manifest).connect()
        names = shards if shards is not None else [store.shard_name(i) for i in range(self.manifest.shards)]
        if not names:
            raise ValueError(f"{db}: a shard group needs at least one shard")
        self.shards = [
            Shard(conn, name, refresh_s=refresh_s, index=index, memory_rows=memory_rows) for name in names
        ]
        self.names = names
        self.exact_rows = exact_rows
        # (key: held shards and versions, the memory, the snapshots it holds by shard)
        self._memory: tuple[tuple[tuple[int, int], ...], MemoryShard | None, dict[int, Snapshot]] = (
            (),
            None,
            {},
        )
        self._memory_lock = threading.Lock()
        self._building: Future | None = None
        self._builder = ThreadPoolExecutor(1, "memory-build")
        self.pool = ThreadPoolExecutor(threads or min(32, max(4, 2 * len(names))), "shard-search")
        # Open every table (a db that cannot be read fails at start, not per query) and load the rows
        # held in memory before the first query.
        self._memory_for(self.snapshots())

    @property
    def fresh(self) -> bool:
        return all(shard.fresh for shard in self.shards)

    def snapshots(self) -> list[Snapshot]:
        """Every shard's current snapshot (stale ones refreshed side by side)."""
        if self.fresh:
            return [shard.current() for shard in self.shards]
        return list(self.pool.map(Shard.current, self.shards))

    def versions(self) -> tuple[int, ...]:
        return tuple(snap.version for snap in self.snapshots())

    def stats(self) -> list[dict[str, Any]]:
        """Each shard's rows, version, indexes and refresh state, refreshed at most every refresh_s."""
        self.snapshots()
        return [shard.stats() for shard in self.shards]

    def search(
        self,
        vectors: np.ndarray | None,
        ks: list[int],
        wheres: list[str | None] | None = None,
        texts: list[str | None] | None = None,
        *,
        exact: bool = False,
        timeout_s: float | None = None,
    ) -> GroupAnswer:
        """Each query's top ``ks[i]`` over the group's shards.

        Args:
            vectors: unit query vectors, one row per query (None: BM25 searches only).
            ks: rows to return per query.
            wheres: an optional SQL predicate per query (``pipelines.filters.compile_filter``'s
                output), applied before the search.
            texts: per query, the text of a BM25 search to run beside the vector search (hybrid
                mode), or None.
            exact: scan every row even where an ANN index exists.
            timeout_s: a query whose LanceDB searches are not all done by then gets QueryTimeout (the
                other queries of the batch are answered; a LanceDB query cannot be stopped, so its
                thread finishes on its own and its rows are dropped).

        Returns:
            Per query a Partial or the error that ended it (a bad filter, a shard's fault, the
            deadline), and the table versions searched.
        """
        started = time.monotonic()
        n = len(ks)
        if vectors is not None:
            vectors = np.atleast_2d(np.asarray(vectors, np.float32))
        wheres = wheres or [None] * n
        texts = texts or [None] * n
        current = self.snapshots()
        memory, held = self._memory_for(current)
        # Held shards answer from the versions their memory holds, filtered queries included.
        snaps = [held.get(s, snap) for s, snap in enumerate(current)]
        # found[i][s]: query i's rows from shard s (None: answered by the memory part); texts likewise.
        found: list[list[Any]] = [[None] * len(snaps) for _ in range(n)]
        found_text: list[list[Any]] = [[None] * len(snaps) for _ in range(n)]
        from_memory: list[Any] = [None] * n
        # future -> (who answers, the queries it answers, where each query's rows go)
        pending: dict[Future, tuple[str, list[int], Callable[[int, Any], None]]] = {}
        searched = range(n) if vectors is not None else range(0)
        plain = [i for i in searched if not wheres[i]] if memory is not None else []
        if plain:
            if memory.num_rows * len(plain) <= INLINE_SCORES:
                for i, hits in zip(plain, _memory(memory, vectors, ks, plain), strict=True):
                    from_memory[i] = hits
            else:
                future = self.pool.submit(_memory, memory, vectors, ks, plain)
                pending[future] = ("memory", plain, from_memory.__setitem__)
        for s, (shard, snap) in enumerate(zip(self.shards, snaps, strict=True)):
            skip = set(plain) if s in held else set()
            for i in (i for i in searched if i not in skip):
                future = self.pool.submit(shard.vector_query, snap, vectors[i], ks[i], wheres[i], exact)
                pending[future] = (shard.name, [i], lambda i, hits, s=s: found[i].__setitem__(s, hits))
            for i in (i for i in range(n) if texts[i] is not None):
                future = self.pool.submit(shard.text_query, snap, texts[i], ks[i], wheres[i])
                pending[future] = (shard.name, [i], lambda i, hits, s=s: found_text[i].__setitem__(s, hits))
        remaining = None if timeout_s is None else max(0.0, timeout_s - (time.monotonic() - started))
        done, late = wait(pending, timeout=remaining)
        for future in done:
            name, rows, place = pending[future]
            try:
                answer = future.result()
            except Exception as exc:  # noqa: BLE001 - a memory search; LanceDB's come back as values
                logger.exception("%s: search failed", name)
                answer = ShardError(f"{name}: {type(exc).__name__}")
            for i, hits in zip(
                rows, answer if isinstance(answer, list) else [answer] * len(rows), strict=True
            ):
                place(i, hits)
        for future in late:
            name, rows, place = pending[future]
            logger.warning("%s: a query ran past its deadline of %.3g s", name, timeout_s)
            for i in rows:
                place(i, QueryTimeout(f"{name}: no answer within {timeout_s:g} s"))
        answers: list[Partial | Exception] = []
        for i in range(n):
            vector_parts = [p for p in [*found[i], from_memory[i]] if p is not None]
            vector_parts = vector_parts if vectors is not None else []
            text_parts = found_text[i] if texts[i] is not None else []
            error = next((p for p in [*vector_parts, *text_parts] if isinstance(p, Exception)), None)
            if error is not None:
                answers.append(error)
                continue
            text = merge_topk(text_parts, k=ks[i]) if texts[i] is not None else None
            vector = None
            if vectors is not None:
                vector = vector_parts[0] if len(vector_parts) == 1 else merge_topk(vector_parts, k=ks[i])
            answers.append(Partial(vector, text))
        return GroupAnswer(answers, tuple(snap.version for snap in snaps))

    def _memory_for(self, snaps: list[Snapshot]) -> tuple[MemoryShard | None, dict[int, Snapshot]]:
        """The group's held shards as one in memory, and the snapshot of each shard it holds.

        Rebuilt (reading those tables) when one of them has moved to a new version: at once while
        the held rows are few enough to scan; in the background when an IVF index must be built,
        the previous versions answering meanwhile.
        """
        key = tuple((s, snap.version) for s, snap in enumerate(snaps) if snap.in_memory)
        current_key, memory, held = self._memory
        if current_key == key:
            return memory, held
        small = sum(snaps[s].rows for s, _ in key) <= self.exact_rows
        if small or memory is None:
            with self._memory_lock:
                if self._memory[0] != key:
                    self._memory = self._build(key, snaps)
            return self._memory[1], self._memory[2]
        if self._building is None or self._building.done():
            self._building = self._builder.submit(self._build_later, key, snaps)
        return memory, held

    def _build(self, key: tuple[tuple[int, int], ...], snaps: list[Snapshot]):
        parts = [(self.names[s], snaps[s].table) for s, _ in key]
        started = time.monotonic()
        memory = MemoryShard.combined(parts, exact_rows=self.exact_rows) if parts else None
        if memory is not None:
            logger.info("holding %d rows of %d shards in memory (%s), built in %.1f s", memory.num_rows,
                        len(parts), "IVF" if memory.ivf else "exact", time.monotonic() - started)  # fmt: skip
        return key, memory, {s: snaps[s] for s, _ in key}

    def _build_later(self, key: tuple[tuple[int, int], ...], snaps: list[Snapshot]) -> None:
        try:
            built = self._build(key, snaps)
        except Exception:
            logger.exception("rebuilding the rows held in memory failed; the previous versions serve on")
            return
        with self._memory_lock:
            self._memory = built

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self._builder.shutdown(wait=False, cancel_futures=True)


def _memory(memory: MemoryShard, vectors: np.ndarray, ks: list[int], rows: list[int]) -> list[pa.Table]:
    return memory.search(vectors[rows], [ks[i] for i in rows])


def combine(parts: list[Partial], *, k: int, depth: int | None = None, rrf_k: int = 60) -> pa.Table:
    """One query's global top-k from its answers of every group: the merged vector rows, or for a
    hybrid query the vector and BM25 rankings (each merged over the groups first) fused by
    reciprocal rank.

    Args:
        parts: the query's Partial from each group.
        k: rows to return.
        depth: hybrid only: the rows each ranking was searched to (the candidates fused); default k.
        rrf_k: hybrid only: the fusion constant.
    """
    depth = max(k, depth or k)
    vectors = [p.vector for p in parts]
    if parts[0].text is None:
        return vectors[0].slice(0, k) if len(parts) == 1 else merge_topk(vectors, k=k)
    texts = [p.text for p in parts]
    vector = vectors[0] if len(parts) == 1 else merge_topk(vectors, k=depth)
    text = texts[0] if len(parts) == 1 else merge_topk(texts, k=depth)
    return rrf_fuse([vector, text], k=k, rrf_k=rrf_k)
