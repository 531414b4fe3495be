"""The ingress: validates a request, embeds the query (batched), searches the shards, merges.

On one node the router holds every shard itself (``pipelines.search.ShardGroup``) and a query costs no
deployment-handle call at all; on a cluster it calls the shard-group deployments (``serve/group.py``)
and merges their answers.

The ``app`` object is the FastAPI application Serve wraps; its OpenAPI document is at /openapi.json.
No ``from __future__ import annotations`` here: FastAPI must see the real request and response types.
"""

import asyncio
import functools
import json
import logging
import re
import time
from typing import Any, Literal, NamedTuple

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.handle import DeploymentHandle

from pipelines import store
from pipelines.config import IndexSettings, ServeSettings
from pipelines.embedding.query import query_embedder
from pipelines.filters import FilterError, allowed_columns, compile_filter
from pipelines.search import (
    NoTextIndexError,
    PinnedTables,
    QueryTimeout,
    RowCache,
    ShardError,
    ShardGroup,
    collapse_docs,
    combine,
    fetch_rows,
)
from serve import ui
from serve.cache import QueryCache
from serve.group import decode

logger = logging.getLogger(__name__)

VERSION = "0.1.0"
_RETRY_WAIT_S = 0.25  # between tries of a shard call whose replica died


class SearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    query: str = Field(..., min_length=1, description="Text to search for.")
    k: int = Field(10, ge=1, le=1000, description="How many chunks to return.")
    filter: str | None = Field(
        None,
        max_length=2000,
        description="A predicate over doc_id, chunk_id, title, text, chunk_index (and the columns "
        "serve.filter_columns adds): comparisons, BETWEEN, IN (values), LIKE/ILIKE, IS [NOT] NULL, "
        "AND/OR/NOT. No function calls.",
    )
    mode: Literal["vector", "text", "hybrid"] | None = Field(
        None,
        description="vector (cosine), text (BM25 with the whole db's term statistics) or hybrid (both, "
        "fused); default from config (serve.default_mode).",
    )
    fusion: Literal["convex", "rrf"] | None = Field(
        None,
        description="hybrid: convex (weight x vector + (1 - weight) x BM25, each normalized) or rrf "
        "(reciprocal rank); default from config (serve.fusion).",
    )
    weight: float | None = Field(
        None, ge=0.0, le=1.0, description="convex: the vector ranking's weight; default serve.fusion_weight."
    )
    collapse: Literal["doc_id"] | None = Field(
        None, description="doc_id: one result per document (its best chunk), k documents."
    )
    generation: int | None = Field(
        None,
        ge=1,
        le=1_000_000,
        description="Search this generation of the db (embedpipe generations) instead of the live one, "
        "e.g. to compare a new model's answers before promoting it.",
    )


class Hit(BaseModel):
    chunk_id: str
    doc_id: str
    title: str
    text: str
    score: float = Field(
        ..., description="Cosine similarity (vector), BM25 (text) or the fused score (hybrid)."
    )
    shard: str


# What a hit returns besides its score and shard: the columns read from the tables for an answer.
HIT_COLUMNS = ["chunk_id", "doc_id", "title", "text"]


class SearchResponse(BaseModel):
    results: list[Hit]
    took_ms: float
    generation: int = Field(
        ..., description="The db generation that answered (its model embedded the query)."
    )


class ShardHealth(BaseModel):
    shard: str
    rows: int
    version: int
    vector_index: str = Field(..., description="exact, or the ANN index type.")
    in_memory: bool = Field(..., description="Searched from rows held in memory (small exact shards).")
    fts: list[str] = Field(
        ..., description="Columns with a full-text index (text and hybrid modes need them)."
    )
    bm25_version: int | None = Field(
        None,
        description="The table version the shard's BM25 term statistics describe (`embedpipe index` stores "
        "them; keyword scores then use the whole generation's). None: the shard's own statistics.",
    )
    refresh_failing_s: float | None = Field(
        None, description="Seconds for which looking for new table versions has failed (old data served)."
    )
    refresh_error: str | None = None


class Memory(BaseModel):
    rows: int = Field(..., description="Rows of the shards searched by the processes counted.")
    bytes_held: int = Field(
        ...,
        description="Bytes the searching processes hold for their shards: LanceDB's index and metadata "
        "caches (the ANN indexes' codes and row ids) and the vectors and ids of small shards searched in "
        "memory. Never the text: an answer's rows are read from the tables.",
    )
    bytes_per_row: float | None = None
    row_cache_bytes: int = Field(
        0, description="Rows of recent answers kept by the router (serve.row_cache_mb bounds it)."
    )
    bm25_bytes: int = Field(
        0,
        description="BM25 term statistics of the generation (per distinct term) and the term counts of "
        "rows keyword search rescored lately (index.bm25_cache_mb bounds those), in the searching processes.",
    )


class Health(BaseModel):
    status: Literal["ok", "degraded"] = Field(
        ..., description="degraded: a shard does not answer, or serves an old version it cannot refresh."
    )
    model: str | None = Field(None, description="Details below come only with the API key, if one is set.")
    generation: int | None = Field(None, description="The live generation of the db, which answers queries.")
    shards: list[ShardHealth] | None = None
    rows: int | None = None
    memory: Memory | None = Field(None, description="What the searching processes hold, in all and per row.")
    unavailable: list[str] | None = Field(None, description="Shard groups that did not answer in time.")


class _Job(NamedTuple):
    """One query as the batch sees it."""

    query: str
    k: int
    filter: str | None
    mode: str
    generation: int
    fusion: str = "convex"
    weight: float = 0.8
    collapse: str | None = None


class _View:
    """One generation of the db as the router serves it: its manifest, the query embedder of its model
    and, on one node, its shards held open. A query batch takes one view for its embedding and its
    search, so an answer never mixes generations."""

    def __init__(
        self, manifest: store.Manifest, embedder: Any, local: ShardGroup | None, pinned: PinnedTables | None
    ):
        self.manifest, self.embedder, self.local, self.pinned = manifest, embedder, local, pinned
        self.generation = manifest.generation
        # (versions, when asked, the ask in flight) of the shard-group deployments' tables
        self.versions: tuple[int, ...] | None = None
        self.versions_at = 0.0
        self.versions_task: asyncio.Task | None = None

    def close(self) -> None:
        if self.local is not None:
            self.local.close()


# A query's hits, and the table version of every shard they came from.
_Answer = tuple[list[Hit], tuple[int, ...]]


class ErrorBody(BaseModel):
    # A message, or FastAPI's list of field errors for a 422.
    detail: str | list[dict[str, Any]]


app = FastAPI(
    title="embedpipe search",
    version=VERSION,
    description="Semantic search over embedpipe's sharded LanceDB tables.",
)


@app.middleware("http")
async def _guard_requests(request: Request, call_next):
    from serve import guard, metrics  # imported here: see serve/guard.py

    started = time.perf_counter()
    response = await guard.check(request)
    if response is None and request.url.path == "/openapi.json":
        _document_limits(request.app)
    if response is None:
        response = await call_next(request)
    metrics.observe(request.url.path, response.status_code, time.perf_counter() - started)
    return response


# An absolute path in an error message: a Unix path of two or more parts, or a Windows drive path.
_ABS_PATH = re.compile(r"(?<![\w.:/])(?:/[^\s'\"/]+){2,}/?|[A-Za-z]:\\[^\s'\"]+")


def scrub(message: str) -> str:
    """An error message fit for a client: no absolute paths of the server's."""
    return _ABS_PATH.sub("<path>", message)


def _document_limits(served: FastAPI) -> None:
    """Write the replica's configured limits into the OpenAPI document it serves, so that what it
    says a request may hold is what it accepts (k up to max_k, queries up to max_query_chars). The
    app Serve runs is its own copy of ``app``, reached through the request."""
    from serve import guard

    limits = guard.limits()
    if not limits:
        return
    fields = served.openapi()["components"]["schemas"]["SearchRequest"]["properties"]
    fields["k"]["maximum"] = limits["max_k"]
    fields["query"]["maxLength"] = limits["max_query_chars"]


@app.exception_handler(HTTPException)
async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if exc.status_code == 401 else None
    detail = scrub(exc.detail) if isinstance(exc.detail, str) else exc.detail
    return JSONResponse({"detail": detail}, status_code=exc.status_code, headers=headers)


def _query_embedder(model: str, dtype: str, settings: ServeSettings, vectors: str | None = None):
    """The query embedder (``pipelines.embedding.query``, as ``embedpipe query`` uses it): on
    the GPU the replica reserved (serve.router_gpus), else on the CPU. A replica that reserved no GPU
    never uses one, even on a GPU node: another process may own it."""
    from pipelines.embedding import backends

    device = "cuda" if settings.router_gpus > 0 else "cpu"
    if device == "cuda":
        backends.require_cuda("this router replica reserved a GPU (serve.router_gpus)")
    return query_embedder(
        model, vectors=vectors, device=device, dtype=dtype, engine=settings.query_engine,
        threads=settings.router_threads,
    )  # fmt: skip


def _settle(items: list[tuple[_Job, Any, asyncio.Future]], answers: list[Any]) -> None:
    for (_, _, future), answer in zip(items, answers, strict=True):
        if not future.done():
            future.set_result(answer)


def _entry_bytes(key: tuple[_Job, tuple[int, ...]], value: bytes) -> int:
    # The results' JSON, the query and filter in the key, and a few hundred bytes of Python objects.
    job = key[0]
    return len(value) + len(job.query) + len(job.filter or "") + 512


def _memory_total(groups: list[dict[str, Any]], row_cache: int) -> Memory | None:
    if not groups:
        return None
    rows = sum(g["rows"] for g in groups)
    held = sum(g["bytes_held"] for g in groups)
    per_row = round(held / rows, 1) if rows else None
    bm25 = sum(g.get("bm25_bytes", 0) for g in groups)
    return Memory(
        rows=rows, bytes_held=held, bytes_per_row=per_row, row_cache_bytes=row_cache, bm25_bytes=bm25
    )


def _user_message(exc: Exception, kind: type[Exception]) -> str:
    # A shard's exception arrives wrapped by Ray; its last line is "<Kind>: <message>".
    return str(exc).splitlines()[-1].split(f"{kind.__name__}: ")[-1]


@serve.deployment
@serve.ingress(app)
class Router:
    """Ingress deployment.

    The router serves the db's live generation and follows ``embedpipe promote``: it reads the
    manifest every ``generation_poll_s``, and when another generation is live it opens that one (its
    query embedder, its shards) beside the old one, then answers new queries from it. A request may
    also name a generation.

    Args:
        groups: handles of the ShardGroupSearcher deployments; none: the router holds every shard of
            ``db`` itself (one node: no handle call per query).
        settings: serve settings (limits, batching, cache, hybrid fusion).
        api_key: when set, every endpoint but /healthz and the pages' HTML shells needs
            ``Authorization: Bearer <key>``.
        dtype: the query embedder's precision (auto: ``pipelines.embedding.query.query_precision``).
        db: the db: its generations, and the run reports the /runs pages show.
        index: index settings (ANN query parameters), for the shards held here.
    """

    def __init__(
        self,
        groups: list[DeploymentHandle],
        *,
        settings: dict[str, Any],
        db: str | store.Location,
        api_key: str | None = None,
        dtype: str = "auto",
        index: dict[str, Any] | None = None,
    ):
        from serve import guard, metrics

        self.groups = groups
        self.db = store.location(db)
        self.dtype = dtype
        self.index = IndexSettings.model_validate(index or {})
        self.auth = bool(api_key)
        self.settings = ServeSettings.model_validate(settings)
        # The guard middleware runs before FastAPI validates a body, so a request without the key is a
        # 401 whatever it holds. One replica per process: module state is this replica's.
        guard.configure(
            api_key=api_key,
            max_body_bytes=self.settings.max_body_bytes,
            allowed_hosts=guard.allowed_hosts(self.settings.host, self.settings.allowed_hosts),
            limits={"max_k": self.settings.max_k, "max_query_chars": self.settings.max_query_chars},
        )
        self.guard = guard
        self.metrics = metrics
        self.filter_columns = allowed_columns(self.settings.filter_columns)
        self.cache = QueryCache(
            self.settings.cache_size,
            self.settings.cache_ttl_s,
            max_bytes=int(self.settings.cache_mb * 2**20),
            sizeof=_entry_bytes,
        )
        self.rows = RowCache(int(self.settings.row_cache_mb * 2**20))
        self._stats: list[dict[str, Any] | None] = [None] * len(groups)
        self._stats_at = float("-inf")
        self._stats_task: asyncio.Task | None = None
        self._embed_lock = asyncio.Lock()
        self._queue: asyncio.Queue[tuple[_Job, _View, asyncio.Future]] | None = None
        self._workers: list[asyncio.Task] = []
        catalog = store.read_catalog(self.db)
        self.live = self._open_view(catalog.live_manifest)
        self._others: dict[int, _View] = {}  # generations asked for by name, most recent last
        self._opening: dict[int, asyncio.Task] = {}
        self._watcher: asyncio.Task | None = None
        self._switch_error: str | None = None

    @property
    def model(self) -> str:
        return self.live.manifest.model

    def _open_view(self, manifest: store.Manifest) -> _View:
        """A generation ready to answer: its query embedder loaded and warmed up (the first pass
        compiles kernels: not on a user's query), and on one node its shards open."""
        embedder = _query_embedder(manifest.model, self.dtype, self.settings, manifest.vectors)
        embedder.warm_up()
        local = pinned = None
        if not self.groups:
            local = ShardGroup(
                self.db, refresh_s=self.settings.refresh_s, index=self.index,
                memory_rows=self.settings.memory_rows, threads=self.settings.search_threads,
                generation=manifest.generation,
            )  # fmt: skip
        else:
            pinned = PinnedTables(self.db, manifest)
        logger.info(
            "generation %d open (%s, %d shards)", manifest.generation, manifest.model, manifest.shards
        )
        return _View(manifest, embedder, local, pinned)

    def _watch_generations(self) -> None:
        if self._watcher is None or self._watcher.done():
            self._watcher = asyncio.ensure_future(self._watch())

    async def _watch(self) -> None:
        """Follow the db's live generation: open a newly promoted one beside the old, then switch.
        Queries keep being answered by the old one until the new one is ready; a failure to open it
        is logged, shown in /healthz, and tried again."""
        while True:
            await asyncio.sleep(self.settings.generation_poll_s)
            try:
                catalog = await asyncio.to_thread(store.read_catalog, self.db)
                if catalog.live == self.live.generation:
                    self._switch_error = None
                    continue
                manifest = catalog.live_manifest
                view = self._others.pop(manifest.generation, None)
                if view is None:
                    view = await asyncio.to_thread(self._open_view, manifest)
                old, self.live = self.live, view
                self._switch_error = None
                logger.warning("now serving generation %d (%s); was %d", view.generation, view.manifest.model,
                               old.generation)  # fmt: skip
                self._keep(old)
            except Exception as exc:  # noqa: BLE001 - the old generation serves on
                self._switch_error = f"{type(exc).__name__}: {exc}"
                logger.exception("following the db's live generation failed; serving generation %d",
                                 self.live.generation)  # fmt: skip

    def _keep(self, view: _View) -> None:
        """Keep a generation that is not live open for queries that name it (the latest few)."""
        self._others[view.generation] = view
        while len(self._others) > self.settings.other_generations:
            oldest = self._others.pop(next(iter(self._others)))
            # Batches still in flight on it finish first: closed once the longest query is over.
            asyncio.get_running_loop().call_later(2 * self.settings.query_timeout_s + 1, oldest.close)

    async def _view(self, generation: int | None) -> _View:
        """The live generation, or the one a request names (opened on first use)."""
        if generation is None or generation == self.live.generation:
            return self.live
        if self.settings.other_generations == 0:
            raise store.StoreError(
                f"this service answers from the live generation ({self.live.generation}) only "
                "(serve.other_generations: 0)"
            )
        if generation in self._others:
            view = self._others.pop(generation)
            self._others[generation] = view  # most recent last
            return view
        if generation not in self._opening or self._opening[generation].done():
            catalog = await asyncio.to_thread(store.read_catalog, self.db)
            manifest = catalog.get(generation)  # StoreError: no such generation
            manifest.require_ready()  # or an unfinished one
            self._opening[generation] = asyncio.ensure_future(asyncio.to_thread(self._open_view, manifest))
        view = await self._opening[generation]
        if generation == self.live.generation:
            return self.live
        if generation not in self._others:
            self._keep(view)
        return view

    async def _answer(self, job: _Job, view: _View) -> _Answer | Exception:
        """The job's answer from ``view``, computed in a batch with the queries that queued beside it."""
        if self._queue is None:
            self._queue = asyncio.Queue()
            self._workers = [asyncio.create_task(self._batch_worker()) for _ in range(2)]
        future = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((job, view, future))
        return await future

    async def _batch_worker(self) -> None:
        """Batches queries as they queue: one forward pass, one search of the shards for all.

        A worker takes its batch when the model is free, so a batch holds every query that queued
        while the last one was embedded (up to max_batch_size): batches grow with the load and a lone
        query is never held back. Two workers run, so that one batch is embedded while the other is
        searched. (Serve's @serve.batch forms a batch as soon as its wait ends, free model or not; with
        no wait it queued batches of one or two under load here.)
        """
        while True:
            first = await self._queue.get()
            batch = [first]
            # One forward pass at a time (a model is not for two threads at once), in a thread so that
            # the event loop serves other requests meanwhile.
            async with self._embed_lock:
                await self._fill(batch)
                batch = [item for item in batch if not item[2].done()]  # timed out
                if not batch:
                    continue
                self.metrics.EMBED_BATCH.observe(len(batch))
                # Each generation's queries are embedded by its model and searched in its shards.
                by_view: dict[int, list[tuple[_Job, _View, asyncio.Future]]] = {}
                for item in batch:
                    by_view.setdefault(id(item[1]), []).append(item)
                embedded = []
                for items in by_view.values():
                    view = items[0][1]
                    try:
                        embedded.append((items, await self._embed([job for job, _, _ in items], view)))
                    except Exception as exc:  # noqa: BLE001 - these queries get it; the worker lives on
                        logger.exception("embedding a query batch failed")
                        _settle(items, [exc] * len(items))
            for items, vectors in embedded:
                try:
                    answers = await self._run_batch([job for job, _, _ in items], vectors, items[0][1])
                except Exception as exc:  # noqa: BLE001 - every query of the batch gets it
                    logger.exception("a query batch failed")
                    answers = [exc] * len(items)
                _settle(items, answers)

    async def _embed(self, jobs: list[_Job], view: _View) -> np.ndarray | None:
        """The batch's query vectors (zeros for text-mode queries, which are not embedded), or None
        when every query is text-mode."""
        wanted = [i for i, job in enumerate(jobs) if job.mode != "text"]
        if not wanted:
            return None
        found = await asyncio.to_thread(view.embedder.encode, [jobs[i].query for i in wanted])
        if len(wanted) == len(jobs):
            return found
        vectors = np.zeros((len(jobs), found.shape[1]), found.dtype)
        vectors[wanted] = found
        return vectors

    async def _fill(self, batch: list[tuple[_Job, _View, asyncio.Future]]) -> None:
        limit = self.settings.max_batch_size
        deadline = time.monotonic() + self.settings.batch_wait_timeout_s
        while len(batch) < limit:
            if self._queue.empty():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), remaining))
                except TimeoutError:
                    return
            else:
                batch.append(self._queue.get_nowait())

    async def _run_batch(self, jobs: list[_Job], vectors: Any, view: _View) -> list[_Answer | Exception]:
        """Answer the queries that were embedded together: one search of ``view``'s shards for all.

        Batching the search matters as much as batching the model: each deployment-handle call costs
        milliseconds of CPU, so per-query calls to shard groups would cap throughput long before the
        searches do. A job's own error (a bad filter, a failed shard query, its deadline) comes back
        as its answer, not the batch's.
        """
        started = time.perf_counter()
        candidates = self.settings.hybrid_candidates
        depth = [max(job.k, candidates) if job.mode == "hybrid" or job.collapse else job.k for job in jobs]
        wheres = [job.filter for job in jobs]
        texts = [job.query if job.mode != "vector" else None for job in jobs]
        by_vector = [job.mode != "text" for job in jobs]
        timeout = self.settings.query_timeout_s
        if view.local is not None:
            search = functools.partial(view.local.search, timeout_s=timeout, by_vector=by_vector)
            found = await asyncio.to_thread(search, vectors, depth, wheres, texts)
            per_group, versions = [found.answers], found.versions
        else:
            deadline = time.monotonic() + timeout
            calls = [
                self._call_group(
                    deadline, group.search, vectors, depth, wheres, texts, timeout, view.generation, by_vector
                )
                for group in self._groups_of(view)
            ]
            answers = await asyncio.gather(*calls)
            per_group = [group_answers for group_answers, _ in answers]
            versions = tuple(v for _, group_versions in answers for v in group_versions)
        results: list[_Answer | Exception] = []
        merged: dict[int, Any] = {}
        for i, job in enumerate(jobs):
            try:
                parts = [a[i] if view.local is not None else decode(a[i]) for a in per_group]
                error = next((p for p in parts if isinstance(p, Exception)), None)
                if error is not None:
                    raise error
            except (FilterError, NoTextIndexError, ShardError, QueryTimeout) as error:
                results.append(error)
                continue
            merged[i] = combine(
                parts, k=depth[i] if job.collapse else job.k, depth=depth[i], fusion=job.fusion,
                weight=job.weight, rrf_k=self.settings.rrf_k,
            )  # fmt: skip
            results.append(None)
        if merged:
            # The text of the answers' rows only, one read per shard for the whole batch, from the
            # table versions that were searched.
            if view.local is not None:
                tables = found.tables
            else:
                names = [store.shard_name(s) for s in range(view.manifest.shards)]
                groups = len(per_group)
                pinned = {
                    name: version
                    for g, (_, group_versions) in enumerate(answers)
                    for name, version in zip(names[g::groups], group_versions, strict=True)
                }
                tables = await asyncio.to_thread(view.pinned.at, pinned)
            try:
                for i in [i for i in merged if jobs[i].collapse]:  # one row per document
                    merged[i] = await asyncio.to_thread(collapse_docs, merged[i], tables, k=jobs[i].k)
                hits = list(merged.values())
                if all(pinned.held is not None for pinned in tables.values()):
                    rows = fetch_rows(hits, tables, HIT_COLUMNS, self.rows)  # all in memory: no I/O
                else:
                    rows = await asyncio.to_thread(fetch_rows, hits, tables, HIT_COLUMNS, self.rows)
            except ShardError as error:
                rows = [error] * len(merged)
            for i, hits in zip(merged, rows, strict=True):
                if isinstance(hits, Exception):
                    results[i] = hits
                    continue
                # The response's results, serialized once: the cache keeps these bytes (their size is
                # what it bounds) and a hit is sent without serializing again.
                found_hits = hits.select(list(Hit.model_fields)).to_pylist()
                results[i] = (json.dumps(found_hits, ensure_ascii=False).encode(), versions)
        self.metrics.SHARD_FANOUT.observe(time.perf_counter() - started)
        return results

    async def _call_group(self, deadline: float, method: Any, *args: Any) -> Any:
        """``method.remote(*args)``, tried again while its replica is dead or unreachable and the
        deadline allows: Serve starts a new replica within ``health_check_period_s``, so a killed
        group costs its queries time, not an error."""
        while True:
            try:
                return await method.remote(*args)
            except RayActorError:
                if time.monotonic() + _RETRY_WAIT_S >= deadline:
                    raise
                logger.warning("a shard-group replica is unavailable; trying again")
                await asyncio.sleep(_RETRY_WAIT_S)

    def _groups_of(self, view: _View) -> list[DeploymentHandle]:
        # Group g holds shards g, g + G, ...: a generation of fewer shards than groups leaves some idle.
        return self.groups[: view.manifest.shards]

    async def _table_versions(self, view: _View) -> tuple[int, ...]:
        """Every shard's table version: the router's own shards' (refreshed at most every refresh_s,
        off the event loop), or asked of the groups at most every refresh_s (requests share one ask)."""
        if view.local is not None:
            if view.local.fresh:
                return view.local.versions()
            return await asyncio.to_thread(view.local.versions)
        if view.versions is None or time.monotonic() - view.versions_at >= self.settings.refresh_s:
            if view.versions_task is None or view.versions_task.done():
                deadline = time.monotonic() + self.settings.query_timeout_s
                asks = [
                    self._call_group(deadline, g.versions, view.generation) for g in self._groups_of(view)
                ]
                view.versions_task = asyncio.ensure_future(asyncio.gather(*asks))
            versions = tuple(v for group_versions in await view.versions_task for v in group_versions)
            view.versions, view.versions_at = versions, time.monotonic()
        return view.versions

    async def _shard_stats(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[str]]:
        """Every shard's stats, what each group holds in memory, and the groups that did not answer,
        from what the router last learnt: its own shards' snapshots, or the groups' answers, asked at
        most every refresh_s (at least 1 s apart) in the background, so a health check never waits on
        a shard."""
        live = self.live
        if live.local is not None:
            local = live.local
            if local.fresh:
                return local.stats(), [local.memory()], []
            return (*await asyncio.to_thread(lambda: (local.stats(), [local.memory()])), [])
        due = time.monotonic() - self._stats_at >= max(1.0, self.settings.refresh_s)
        if due and (self._stats_task is None or self._stats_task.done()):
            self._stats_task = asyncio.ensure_future(self._ask_stats())
        if all(s is None for s in self._stats):
            await asyncio.wait({self._stats_task}, timeout=2.0)  # the first check: wait a little
        answered = [s for s in self._stats if s is not None]
        stats = [s for group_stats in answered for s in group_stats["shards"]]
        unavailable = [f"group {i}" for i, s in enumerate(self._stats) if s is None]
        return stats, [group_stats["memory"] for group_stats in answered], unavailable

    async def _ask_stats(self) -> None:
        live = self.live
        answers = await asyncio.gather(
            *(asyncio.wait_for(group.stats.remote(live.generation), 2.0) for group in self._groups_of(live)),
            return_exceptions=True,
        )
        self._stats = [a if isinstance(a, dict) else None for a in answers]
        self._stats_at = time.monotonic()

    async def _search(self, job: _Job, view: _View, key_versions: tuple[int, ...]) -> tuple[bytes, bool]:
        """The merged hits as JSON, and whether they may be cached: computed on exactly
        ``key_versions``, and k small enough. Past ``query_timeout_s`` a QueryTimeout is raised (the
        batch goes on for the queries that came with it)."""
        try:
            answer = await asyncio.wait_for(self._answer(job, view), self.settings.query_timeout_s)
        except TimeoutError:
            raise QueryTimeout(
                f"no answer within query_timeout_s={self.settings.query_timeout_s:g}"
            ) from None
        if isinstance(answer, Exception):
            raise answer
        hits, versions = answer
        return hits, versions == key_versions and job.k <= self.settings.cache_max_k

    @app.post(
        "/search",
        response_model=SearchResponse,
        responses={400: {"model": ErrorBody}, 401: {"model": ErrorBody}, 413: {"model": ErrorBody},
                   422: {"model": ErrorBody}, 504: {"model": ErrorBody}},
    )  # fmt: skip
    async def search(self, body: SearchRequest) -> SearchResponse:
        """Embed the query, search every shard concurrently, and return the global top-k.

        ``mode: vector`` ranks by cosine similarity; ``mode: hybrid`` fuses the vector ranking with a
        BM25 full-text ranking by reciprocal rank (``score`` is then the fused score).
        """
        started = time.perf_counter()
        if len(body.query) > self.settings.max_query_chars:
            raise HTTPException(422, f"query is {len(body.query)} characters, over max_query_chars="
                                     f"{self.settings.max_query_chars}")  # fmt: skip
        if body.k > self.settings.max_k:
            raise HTTPException(422, f"k={body.k} is over max_k={self.settings.max_k}")
        mode = body.mode or self.settings.default_mode
        try:
            # Checked and written anew from its parse tree: the client's text never reaches LanceDB.
            where = compile_filter(body.filter, columns=self.filter_columns) if body.filter else None
        except FilterError as exc:
            raise HTTPException(400, str(exc)) from None
        self._watch_generations()
        try:
            view = await self._view(body.generation)
        except store.StoreError as exc:
            raise HTTPException(404, str(exc)) from None
        versions = await self._table_versions(view)
        job = _Job(
            body.query, body.k, where, mode, view.generation,
            body.fusion or self.settings.fusion,
            self.settings.fusion_weight if body.weight is None else body.weight, body.collapse,
        )  # fmt: skip
        try:
            hits, outcome = await self.cache.get_or_compute(
                (job, versions), lambda: self._search(job, view, versions)
            )
        except FilterError as exc:
            raise HTTPException(400, _user_message(exc, FilterError)) from None
        except NoTextIndexError as exc:
            raise HTTPException(400, _user_message(exc, NoTextIndexError)) from None
        except QueryTimeout:
            raise HTTPException(
                504, f"the query took over query_timeout_s={self.settings.query_timeout_s:g}"
            ) from None
        self.metrics.CACHE.labels(outcome=outcome).inc()
        took_ms = round((time.perf_counter() - started) * 1000, 3)
        return Response(b'{"results":%s,"took_ms":%s,"generation":%d}' % (hits, repr(took_ms).encode(),
                        view.generation), media_type="application/json")  # fmt: skip

    @app.get("/healthz", response_model=Health, response_model_exclude_none=True)
    async def healthz(self, request: Request) -> Health:
        """ok or degraded; with the API key (or when none is set) also the shards, their rows,
        indexes and table versions, and the model.

        degraded: a shard group did not answer its last stats request within 2 s, or a shard's
        refreshes keep failing (it serves an old table version). Answered from the stats the router
        holds, refreshed at most every refresh_s: a health check costs no shard call.
        """
        self._watch_generations()
        stats, memory, unavailable = await self._shard_stats()
        failing = (
            unavailable or self._switch_error or any(s.get("refresh_failing_s") is not None for s in stats)
        )
        status = "degraded" if failing else "ok"
        if not self.guard.authorized(request):
            return Health(status=status)
        return Health(
            status=status,
            model=self.model,
            generation=self.live.generation,
            shards=[ShardHealth(**s) for s in stats],
            rows=sum(s["rows"] for s in stats),
            memory=_memory_total(memory, self.rows.nbytes),
            unavailable=unavailable or None,
        )

    @app.get("/metrics", response_class=PlainTextResponse, responses={401: {"model": ErrorBody}})
    async def prometheus(self) -> PlainTextResponse:
        """Prometheus text format: requests, latency, cache lookups, embedding batch sizes."""
        body, content_type = self.metrics.render()
        return PlainTextResponse(body, media_type=content_type)

    # The web pages (serve/ui.py): HTML shells open to all, data behind the key at /api/runs...
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def search_page(self) -> HTMLResponse:
        return ui.search_page(
            auth=self.auth, default_mode=self.settings.default_mode, max_k=self.settings.max_k
        )

    @app.get("/runs", response_class=HTMLResponse, include_in_schema=False)
    async def runs_page(self) -> HTMLResponse:
        return ui.runs_page(auth=self.auth)

    @app.get("/runs/{run_id}", response_class=HTMLResponse, include_in_schema=False)
    async def run_page(self, run_id: str) -> HTMLResponse:
        return ui.run_page(run_id=run_id, auth=self.auth)

    @app.get("/api/generations", responses={401: {"model": ErrorBody}})
    async def list_generations(self) -> dict[str, Any]:
        """The db's generations (model, shards, state) and the one this service answers from."""
        catalog = await asyncio.to_thread(store.read_catalog, self.db)
        generations = [
            {**catalog.generations[g].to_dict(), "live": g == self.live.generation}
            for g in sorted(catalog.generations)
        ]
        for g in generations:
            g.pop("path")  # where the tables are is the server's business
        return {"live": self.live.generation, "generations": generations}

    @app.get("/api/runs", responses={401: {"model": ErrorBody}})
    async def list_runs(self) -> dict[str, Any]:
        """Every ingest run of the db, newest first (headline numbers), and the same as an HTML table."""
        return await asyncio.to_thread(ui.runs_data, db=self.db)

    @app.get("/api/runs/{run_id}", responses={401: {"model": ErrorBody}, 404: {"model": ErrorBody}})
    async def get_run(self, run_id: str) -> dict[str, Any]:
        """One run's report, and its dashboard (SVG charts, failed documents) as an HTML fragment."""
        return await asyncio.to_thread(ui.run_data, db=self.db, run_id=run_id)
