"""ShardGroup: several shard tables searched side by side in one process, each query's rows merged.

``embedpipe query`` searches one group holding every shard; a Serve router holds one the same way (or
calls group deployments spread over a cluster's nodes and merges their answers with ``combine``).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import lancedb
import numpy as np
import pyarrow as pa

from pipelines import bm25, store
from pipelines.config import IndexSettings
from pipelines.search.merge import convex_fuse, merge_topk, rrf_fuse
from pipelines.search.shard import (
    HELD_COLUMNS,
    MemoryShard,
    Pinned,
    QueryTimeout,
    Shard,
    ShardError,
    Snapshot,
    fetch_rows,
    run_async,
    search_loop,
    terms_key,
)

logger = logging.getLogger(__name__)


class Partial(NamedTuple):
    """One query's answer from a group: the vector top-k merged over its shards, and for a hybrid
    query the BM25 top-k too."""

    vector: pa.Table | None
    text: pa.Table | None


class GroupAnswer(NamedTuple):
    """Each query's Partial (or the error that ended it), the table version of every shard, and every
    shard's table at that version (``fetch_rows`` reads the answers' rows from them)."""

    answers: list[Partial | Exception]
    versions: tuple[int, ...]
    tables: dict[str, Any] = {}


class ShardGroup:
    """Shard tables of one db held open in this process and searched concurrently.

    The group's small unindexed shards are held in memory as one (``MemoryShard.combined``: vectors,
    row ids and the columns an answer shows; loaded again when one of them moves to a new version): a
    batch of queries costs one matrix product and one top-k per query for all of them. Every other
    shard is searched through LanceDB, its ANN index read from the db (never built here): one LanceDB
    query per shard for a batch's unfiltered queries, one per filtered query, all awaited side by side
    on the search loop (BM25 queries in the thread pool); each query's hits are merged over the group's
    shards before it is answered. Keyword queries of the held shards are scored from their postings
    (``bm25.HeldTerms``, built in a thread when they are loaded) with the same scores LanceDB's full-text
    index and the rescoring give, without a LanceDB query. Hits carry ids, scores and row ids only:
    ``fetch_rows`` reads the text of an answer's rows (from memory for held shards). Every answer
    reports the table versions it was computed on. What the group holds is ``memory()``.

    Args:
        db: the db directory.
        shards: the shard tables this group holds (default: every shard of the db).
        refresh_s: how often each shard looks for a newer table version (0: before every search).
        index: index settings (ANN query parameters).
        memory_rows: unindexed shards up to this many rows are held in memory (0: never).
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
        threads: int | None = None,
        generation: int | None = None,
    ):
        loc = store.location(db)
        self.manifest = store.read_manifest(loc, generation)
        # One LanceDB session (index and metadata caches) for the group: what it holds is measured.
        self.session = lancedb.Session()
        tables = store.tables_of(loc, self.manifest)
        conn = tables.connect(session=self.session)
        names = shards if shards is not None else [store.shard_name(i) for i in range(self.manifest.shards)]
        if not names:
            raise ValueError(f"{db}: a shard group needs at least one shard")
        self.shards = [
            Shard(conn, name, refresh_s=refresh_s, index=index, memory_rows=memory_rows, codes_at=tables)
            for name in names
        ]
        self.names = names
        # The BM25 statistics of every shard of the generation, not only the group's.
        self.tables_at = tables
        self.all_names = [store.shard_name(i) for i in range(self.manifest.shards)]
        self.refresh_s = refresh_s
        self.index = index or IndexSettings()
        self._stats: bm25.GenerationStats | None = None
        self._stats_files: dict[str, str | None] | None = None
        self._stats_checked = float("-inf")
        self._stats_lock = threading.Lock()
        self.term_cache = bm25.TermCache(int((index or IndexSettings()).bm25_cache_mb * 2**20))
        # (key: held shards and versions, the memory, the snapshots it holds by shard)
        self._memory: tuple[tuple[tuple[int, int], ...], MemoryShard | None, dict[int, Snapshot]] = (
            (),
            None,
            {},
        )
        self._memory_lock = threading.Lock()
        self._terms_lock = threading.Lock()
        self.pool = ThreadPoolExecutor(threads or min(32, max(4, 2 * len(names))), "shard-search")
        # Open every table (a db that cannot be read fails at start, not per query), prewarm the ANN
        # indexes and load the small shards held in memory before the first query.
        self._memory_for(self.snapshots())
        self.wait_for_terms()

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
        """Each shard's rows, version, indexes and refresh state, refreshed at most every refresh_s, and
        the table version its BM25 statistics describe (None: keyword scores are the shard's own)."""
        self.snapshots()
        terms = self.text_stats()
        found = [shard.stats() for shard in self.shards]
        for stats in found:
            held = terms.shards.get(stats["shard"]) if terms is not None else None
            stats["bm25_version"] = held.version if held is not None else None
        return found

    def memory(self) -> dict[str, Any]:
        """What this group holds in memory for searching: LanceDB's index and metadata caches (the ANN
        indexes' codes and row ids) and the small shards held exactly (with their rows' keyword
        postings), per row of its shards; apart, the BM25 statistics and the term counts of rows
        rescored lately (``bm25_bytes``: they grow with the vocabulary and ``index.bm25_cache_mb``, not
        with the rows)."""
        snaps = self.snapshots()
        _, memory, _ = self._memory
        codes = {id(snap.codes): snap.codes.nbytes for snap in snaps if snap.codes is not None}
        codes.update({id(snap.fresh): snap.fresh.nbytes for snap in snaps if snap.fresh is not None})
        held = self.session.size_bytes + (memory.nbytes if memory is not None else 0) + sum(codes.values())
        if memory is not None and memory.terms is not None:
            held += memory.terms[1].nbytes
        rows = sum(snap.rows for snap in snaps)
        terms = self.term_cache.nbytes + (self._stats.nbytes if self._stats is not None else 0)
        return {
            "rows": rows, "bytes_held": held, "bytes_per_row": round(held / rows, 1) if rows else None,
            "bm25_bytes": terms,
        }  # fmt: skip

    def search(
        self,
        vectors: np.ndarray | None,
        ks: list[int],
        wheres: list[str | None] | None = None,
        texts: list[str | None] | None = None,
        *,
        exact: bool = False,
        timeout_s: float | None = None,
        by_vector: list[bool] | None = None,
    ) -> GroupAnswer:
        """Each query's top ``ks[i]`` hits (``pipelines.search.KEY_COLUMNS``) over the group's shards.

        Args:
            vectors: unit query vectors, one row per query (None: BM25 searches only).
            ks: rows to return per query.
            wheres: an optional SQL predicate per query (``pipelines.filters.compile_filter``'s
                output), applied before the search.
            texts: per query, the text of a BM25 search to run beside the vector search (hybrid
                mode), or None.
            exact: scan every row even where an ANN index exists.
            by_vector: which queries search by vector (default: all, when ``vectors`` is given); a
                query with a text only searches by BM25 (``text`` mode).
            timeout_s: a query whose LanceDB searches are not all done by then gets QueryTimeout (the
                other queries of the batch are answered; a LanceDB query cannot be stopped, so its
                thread finishes on its own and its rows are dropped).

        Returns:
            Per query a Partial or the error that ended it (a bad filter, a shard's fault, the
            deadline), the table versions searched and the tables at those versions.
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
        found_text: list[Any] = [None] * n  # query i's BM25 rows over the group (or its error)
        from_memory: list[Any] = [None] * n
        # (who answers, the queries it answers, where each query's rows go, what to await)
        calls: list[tuple[str, list[int], Callable[[int, Any], None], Any]] = []
        searched = [i for i in range(n) if vectors is not None and (by_vector is None or by_vector[i])]
        plain = [i for i in searched if not wheres[i]] if memory is not None else []
        loop = search_loop()
        for s, (shard, snap) in enumerate(zip(self.shards, snaps, strict=True)):
            skip = set(plain) if s in held else set()
            place = lambda i, hits, s=s: found[i].__setitem__(s, hits)  # noqa: E731
            # A batch's unfiltered queries in one LanceDB query (each cut to its own k after); each
            # filtered query alone.
            together = [i for i in searched if i not in skip and not wheres[i]]
            if together:
                tks = [ks[i] for i in together]
                calls.append(
                    (
                        shard.name,
                        together,
                        place,
                        shard.vector_query(snap, vectors[together], tks, None, exact),
                    )
                )
            for i in (i for i in searched if i not in skip and wheres[i]):
                call = shard.vector_query(snap, vectors[i : i + 1], [ks[i]], wheres[i], exact)
                calls.append((shard.name, [i], place, call))
        # BM25 over the group's shards with the generation's statistics (pipelines.bm25): held shards
        # score an unfiltered query here from their postings, the others through LanceDB.
        keyword = [i for i in range(n) if texts[i] is not None]
        stats = self.text_stats() if keyword else None
        terms = self._held_terms(memory, snaps, stats) if keyword else None
        held_text: list[Any] = [None] * n
        for i in keyword:
            others = snaps
            if terms is not None and not wheres[i]:
                held_text[i] = _held_text(memory, texts[i], stats, ks[i], terms)
                others = [snap if s not in held else None for s, snap in enumerate(snaps)]
            if any(snap is not None for snap in others):
                call = self._text_search(others, memory, texts[i], ks[i], wheres[i], stats)
                calls.append(("bm25", [i], found_text.__setitem__, call))
        # The LanceDB searches run on the search loop while the held shards are scanned here.
        running = None
        if calls:  # none when held shards answer every query: no hop to the loop
            running = asyncio.run_coroutine_threadsafe(_gather([call for *_, call in calls], timeout_s), loop)
        if plain:
            try:
                for i, hits in zip(plain, _memory(memory, vectors, ks, plain), strict=True):
                    from_memory[i] = hits
            except Exception as exc:  # noqa: BLE001 - these queries get it; the others are answered
                logger.exception("memory: search failed")
                for i in plain:
                    from_memory[i] = ShardError(f"memory: {type(exc).__name__}")
        remaining = None if timeout_s is None else max(0.0, timeout_s - (time.monotonic() - started))
        outcomes = running.result(None if remaining is None else remaining + 5.0) if running else []
        for (name, rows, place, _), outcome in zip(calls, outcomes, strict=True):
            if outcome is _LATE:
                logger.warning("%s: a query ran past its deadline of %.3g s", name, timeout_s)
                answer = QueryTimeout(f"{name}: no answer within {timeout_s:g} s")
            elif isinstance(outcome, _Raised):
                logger.error("%s: search failed", name, exc_info=outcome.error)
                answer = ShardError(f"{name}: {type(outcome.error).__name__}")
            else:
                answer = outcome
            for i, hits in zip(
                rows, answer if isinstance(answer, list) else [answer] * len(rows), strict=True
            ):
                place(i, hits)
        answers: list[Partial | Exception] = []
        for i in range(n):
            vector_parts = [p for p in [*found[i], from_memory[i]] if p is not None]
            vector_parts = vector_parts if i in searched else []
            text_parts = [p for p in (found_text[i], held_text[i]) if p is not None]
            error = next((p for p in [*vector_parts, *text_parts] if isinstance(p, Exception)), None)
            if error is not None:
                answers.append(error)
                continue
            text = None
            if texts[i] is not None:
                text = text_parts[0] if len(text_parts) == 1 else merge_topk(text_parts, k=ks[i])
            vector = None
            if vectors is not None:
                vector = vector_parts[0] if len(vector_parts) == 1 else merge_topk(vector_parts, k=ks[i])
            answers.append(Partial(vector, text))
        tables = {
            name: Pinned(snap.version, snap.table, memory if s in held else None)
            for s, (name, snap) in enumerate(zip(self.names, snaps, strict=True))
        }
        return GroupAnswer(answers, tuple(snap.version for snap in snaps), tables)

    async def _text_search(
        self,
        snaps: list[Snapshot | None],
        memory: MemoryShard | None,
        text: str,
        k: int,
        where: str | None,
        stats: bm25.GenerationStats | None,
    ) -> Any:
        """One query's BM25 top-k over the group's shards (those whose snapshot is not None), scored
        with the statistics of the whole generation (``pipelines.bm25``), or the error that ended it:
        each shard's LanceDB top-k side by side on the search loop, then the rescoring (and any deeper
        asks) in a pool thread, the rows' text read from the group's memory for held shards and by row
        id (the shards side by side) for the others."""
        shards = {
            name: (shard, snap)
            for name, shard, snap in zip(self.names, self.shards, snaps, strict=True)
            if snap is not None
        }
        # Without statistics (`embedpipe index` stores them), each shard's own scores, merged by chunk id.
        ids = stats is None
        local = await asyncio.gather(
            *(shard.text_query(snap, text, k, where, ids) for shard, snap in shards.values())
        )
        error = next((hits for hits in local if isinstance(hits, Exception)), None)
        if error is not None:
            return error
        if stats is None:
            return merge_topk(local, k=k)

        def search(name: str, depth: int) -> pa.Table:
            shard, snap = shards[name]
            hits = run_async(shard.text_query(snap, text, depth, where, False))
            if isinstance(hits, Exception):
                raise hits
            return hits

        tables = {
            name: Pinned(snap.version, snap.table, memory if snap.in_memory else None)
            for name, (_, snap) in shards.items()
        }

        def read(wanted: dict[str, list[int]], columns: list[str]) -> dict[str, dict[int, dict[str, Any]]]:
            # As an answer's rows are read (from memory for held shards, else by row id side by side).
            n = sum(map(len, wanted.values()))
            keys = pa.table(
                {
                    "chunk_id": pa.array([""] * n, pa.string()),
                    "score": pa.array([0.0] * n, pa.float32()),
                    "shard": pa.array([name for name, ids in wanted.items() for _ in ids], pa.string()),
                    "_rowid": pa.array([r for ids in wanted.values() for r in ids], pa.uint64()),
                }
            )
            (rows,) = fetch_rows([keys], tables, columns)
            found: dict[str, dict[int, dict[str, Any]]] = {name: {} for name in wanted}
            places = zip(keys.column("shard").to_pylist(), keys.column("_rowid").to_pylist(), strict=True)
            for (name, rowid), row in zip(places, rows.select(columns).to_pylist(), strict=True):
                found[name][rowid] = row
            return found

        columns = next(iter(shards.values()))[1].indexes.fts_columns
        run = lambda: bm25.global_top(  # noqa: E731
            text,
            depth=k,
            stats=stats,
            first=dict(zip(shards, local, strict=True)),
            columns=columns,
            search=search,
            read=read,
            cache=self.term_cache,
            versions={name: snap.version for name, (_, snap) in shards.items()},
        )
        try:
            return await asyncio.get_running_loop().run_in_executor(self.pool, run)
        except Exception as exc:  # noqa: BLE001 - this query's answer
            logger.error("bm25: search failed", exc_info=exc)
            return ShardError(f"bm25: {type(exc).__name__}")

    def text_stats(self) -> bm25.GenerationStats | None:
        """The generation's BM25 statistics, read again when `embedpipe index` stored new ones (looked
        for at most every refresh_s, at least 2 s apart); None while a shard has none."""
        now = time.monotonic()
        if now - self._stats_checked < max(2.0, self.refresh_s):
            return self._stats
        with self._stats_lock:
            if now - self._stats_checked < max(2.0, self.refresh_s):
                return self._stats
            files = {}
            for name in self.all_names:
                found = bm25.pointer(self.tables_at, name)
                files[name] = found["file"] if found else None
            if files != self._stats_files:
                try:
                    self._stats = bm25.GenerationStats.load(self.tables_at, self.all_names)
                except Exception:  # the last good ones keep serving
                    logger.exception("bm25: statistics could not be read")
                else:
                    self._stats_files = files
                    if self._stats is None:
                        logger.warning("bm25: a shard has no term statistics; keyword scores are each "
                                       "shard's own until `embedpipe index` runs")  # fmt: skip
            self._stats_checked = time.monotonic()
            return self._stats

    def _held_terms(
        self, memory: MemoryShard | None, snaps: list[Snapshot], stats: bm25.GenerationStats | None
    ) -> tuple[tuple, bm25.HeldTerms] | None:
        """(key, the held rows' keyword postings) when they are built for the shards' full-text columns and
        the statistics' tokenizer (their key), else None, and their build started in a thread (keyword
        queries of held shards go through LanceDB until it is done: the same scores, slower)."""
        if memory is None or stats is None or not self.index.bm25_postings:
            return None
        columns = next((snap.indexes.fts_columns for snap in snaps if snap.in_memory), ())
        if not columns or not set(columns) <= set(HELD_COLUMNS):
            return None
        key = terms_key(columns, stats.options)
        built = memory.terms
        if built is not None and built[0] == key:
            return built
        with self._terms_lock:
            if memory.terms_started != key:
                memory.terms_started = key
                memory.terms_thread = threading.Thread(
                    target=self._build_terms, args=(memory, list(columns), stats.options),
                    name="held-terms", daemon=True,
                )  # fmt: skip
                memory.terms_thread.start()
        return None

    def _build_terms(self, memory: MemoryShard, columns: list[str], options: dict[str, Any]) -> None:
        started = time.monotonic()
        try:
            memory.index_terms(columns, options)
        except Exception:  # keyword queries of held shards keep going through LanceDB
            logger.exception("bm25: the held rows' postings could not be built")
            return
        logger.info("keyword postings of %d held rows built in %.2f s (%.1f MB)", memory.num_rows,
                    time.monotonic() - started, memory.terms[1].nbytes / 1e6)  # fmt: skip

    def wait_for_terms(self, timeout_s: float = 300.0) -> bool:
        """Wait until the held rows' keyword postings are built (or their build failed): what a
        process that has just opened the group does before it answers. False: none are due (no held
        rows, no statistics), their build failed, or the wait ran out."""
        snaps = self.snapshots()
        memory, _ = self._memory_for(snaps)
        if self._held_terms(memory, snaps, self.text_stats()) is not None:
            return True
        if memory is None or memory.terms_thread is None:
            return False
        memory.terms_thread.join(timeout_s)
        return memory.terms is not None

    def _memory_for(self, snaps: list[Snapshot]) -> tuple[MemoryShard | None, dict[int, Snapshot]]:
        """The group's held shards as one in memory, and the snapshot of each shard it holds; loaded
        again (their vectors and ids only) when one of them has moved to a new version."""
        key = tuple((s, snap.version) for s, snap in enumerate(snaps) if snap.in_memory)
        current_key, memory, held = self._memory
        if current_key == key:
            return memory, held
        with self._memory_lock:
            if self._memory[0] != key:
                parts = [(self.names[s], snaps[s].table) for s, _ in key]
                started = time.monotonic()
                memory = MemoryShard.combined(parts) if parts else None
                if memory is not None:
                    logger.info("holding %d rows of %d shards in memory (%.1f MB), loaded in %.2f s",
                                memory.num_rows, len(parts), memory.nbytes / 1e6,
                                time.monotonic() - started)  # fmt: skip
                self._memory = key, memory, {s: snaps[s] for s, _ in key}
        return self._memory[1], self._memory[2]

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


class PinnedTables:
    """Shard tables of one generation at named versions, opened on first use and kept for the next
    answers (the latest ``keep`` versions of each shard): where a router that merges shard groups'
    answers reads the final rows, as the groups report the versions they searched.

    Args:
        db: the db.
        manifest: the generation's manifest.
        keep: versions kept open per shard.
    """

    def __init__(self, db: str | store.Location, manifest: store.Manifest, *, keep: int = 3):
        self.conn = store.tables_of(store.location(db), manifest).connect()
        self.keep = keep
        self._open: dict[tuple[str, int], Any] = {}
        self._lock = threading.Lock()

    def at(self, versions: dict[str, int]) -> dict[str, Pinned]:
        """Each named shard's table at its version."""
        out = {}
        for name, version in versions.items():
            with self._lock:
                table = self._open.get((name, version))
            if table is None:
                table = self.conn.open_table(name)
                table.checkout(version)
                with self._lock:
                    self._open[(name, version)] = table
                    mine = sorted(v for n, v in self._open if n == name)
                    for old in mine[: -self.keep]:
                        self._open.pop((name, old), None)
            out[name] = Pinned(version, table)
        return out


_LATE = object()  # a search still running at the deadline


class _Raised(NamedTuple):
    """A search that raised (its errors as values are answers)."""

    error: BaseException


async def _gather(calls: list[Any], timeout_s: float | None) -> list[Any]:
    """Each call's result or exception; ``_LATE`` for those not done within ``timeout_s`` (cancelled:
    a LanceDB query stops when its future is dropped; a thread's goes on and its rows are dropped)."""
    if not calls:
        return []
    tasks = [asyncio.ensure_future(call) for call in calls]
    _, late = await asyncio.wait(tasks, timeout=timeout_s)
    for task in late:
        task.cancel()
    return [
        _LATE if task in late else _Raised(task.exception()) if task.exception() else task.result()
        for task in tasks
    ]


def _held_text(
    memory: MemoryShard, text: str, stats: bm25.GenerationStats, k: int, terms: tuple[tuple, bm25.HeldTerms]
) -> Any:
    """One query's BM25 top-k of the held rows, or the error that ended it."""
    key, postings = terms
    try:
        return memory.text_search(bm25.make_query(text, stats, list(key[0])), stats, k, postings)
    except Exception as exc:  # noqa: BLE001 - this query's answer
        logger.error("bm25: held rows search failed", exc_info=exc)
        return ShardError(f"bm25: {type(exc).__name__}")


def _memory(memory: MemoryShard, vectors: np.ndarray, ks: list[int], rows: list[int]) -> list[pa.Table]:
    return memory.search(vectors[rows], [ks[i] for i in rows])


def combine(
    parts: list[Partial],
    *,
    k: int,
    depth: int | None = None,
    fusion: str = "convex",
    weight: float = 0.8,
    rrf_k: int = 60,
) -> pa.Table:
    """One query's global top-k from its answers of every group: the merged vector rows, the merged
    BM25 rows, or for a hybrid query both rankings (each merged over the groups first) fused.

    Args:
        parts: the query's Partial from each group.
        k: rows to return.
        depth: hybrid only: the rows each ranking was searched to (the candidates fused); default k.
        fusion: hybrid only: ``rrf`` (reciprocal rank) or ``convex`` (weighted normalized scores).
        weight: convex only: the vector ranking's weight in [0, 1].
        rrf_k: rrf only: the fusion constant.
    """
    searched = depth or k  # what each group's rankings were asked for
    depth = max(k, searched)
    vectors = [p.vector for p in parts if p.vector is not None]
    texts = [p.text for p in parts if p.text is not None]
    if not texts or not vectors:
        ranked = vectors or texts
        return ranked[0].slice(0, k) if len(ranked) == 1 else merge_topk(ranked, k=k)
    vector = vectors[0] if len(vectors) == 1 else merge_topk(vectors, k=depth)
    text = texts[0] if len(texts) == 1 else merge_topk(texts, k=depth)
    if fusion == "convex":
        return convex_fuse(vector, text, k=k, weight=weight, depth=searched)
    if fusion != "rrf":
        raise ValueError(f"Unsupported fusion: {fusion!r}. Supported: {', '.join(FUSIONS)}.")
    return rrf_fuse([vector, text], k=k, rrf_k=rrf_k)


MODES = ("vector", "text", "hybrid")
FUSIONS = ("convex", "rrf")
