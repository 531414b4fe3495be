"""reshard and reembed: a new generation of a db, built from the chunks its live generation stores.

Neither reads the sources again. ``reshard`` copies every chunk with its vector into N new shard tables
(no model runs); ``reembed`` runs the stored chunk texts through another model with the same embedding
stage as ingest (actors, token budget, embedding cache), re-chunking only the documents whose chunks
the new model cannot read whole. Both stream through Ray Data:

    documents to build -> load their chunks from the live tables -> [fit to the model -> embed] -> stage

and the driver commits what was staged into the new generation every ``commit_every_s``, whole
documents at a time, so a run that dies keeps what it committed: the same command again builds only
the documents the generation lacks. Documents that ingest changed or removed in the live generation
meanwhile are caught up at the end under the db's writer lock (and again by ``promote`` if ingests
came after), so the generation ends up holding exactly the live documents; a check then counts that
every chunk landed once before the generation is marked ready. ``promote`` makes it live.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import ray

from pipelines import chunking, ingest, models, store
from pipelines.chunking import CHUNK_SCHEMA
from pipelines.config import Config
from pipelines.embedding import embedding_dim, setup
from pipelines.models import embed_input
from pipelines.ray_session import ray_session
from pipelines.reporting import report
from pipelines.sources import DOC_SCHEMA

logger = logging.getLogger(__name__)

_LOADED = [f for f in store.table_schema(1).names if f not in ("vector", "model", "run_id")]


class RebuildError(ValueError):
    """A generation that cannot be built or switched to as asked (nothing was changed)."""


def reshard(
    *,
    db: str,
    shards: int,
    cfg: Config,
    commit_every_s: float = 30.0,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Build a generation of ``shards`` shards holding the live generation's chunks and vectors.

    Args:
        db: the db (a folder or an object-store URI).
        shards: the new shard count.
        cfg: the config (storage, ray, index settings).
        commit_every_s: how often staged rows are committed (what a crash keeps).
        progress: called with the counts so far after each block.

    Returns:
        The build's report (also written to the generation's folder as build.json).
    """
    loc = store.location(db, cfg.storage)
    loc.check()
    live = store.read_manifest(loc)
    if shards < 1:
        raise RebuildError(f"--shards must be at least 1, not {shards}. Nothing was changed.")
    if shards == live.shards:
        raise RebuildError(f"{loc.uri!r} has {shards} shards already (generation {live.generation}).")
    target = {"shards": shards, "model": live.model, "dim": live.dim}
    return _rebuild(loc, cfg, kind="reshard", target=target, commit_every_s=commit_every_s, progress=progress)


def reembed(
    *,
    db: str,
    model: str,
    cfg: Config,
    shards: int | None = None,
    commit_every_s: float = 30.0,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Build a generation embedded with ``model`` from the live generation's stored chunk texts.

    Args:
        db: the db.
        model: a model id, a sentence-transformers directory, or the bundled default's name.
        cfg: the config: the embedding section (dtype, actors, token budget, cache) applies to ``model``.
        shards: the new generation's shard count (default: the live one's).
        commit_every_s: how often staged rows are committed (what a crash keeps).
        progress: called with the counts so far after each block.
    """
    loc = store.location(db, cfg.storage)
    loc.check()
    live = store.read_manifest(loc)
    path = Path(model).expanduser()
    if path.exists():
        model = str(path.resolve())  # the manifest must name it for other processes
    elif model.startswith(("/", "./", "../", "~")):
        raise RebuildError(f"cannot load the model {model!r}: no such folder. Nothing was changed.")
    name = models.model_id(model)
    if name == live.model:
        raise RebuildError(f"generation {live.generation} of {loc.uri!r} is embedded with {name!r} already.")
    try:
        dim = embedding_dim(model)
    except Exception as exc:  # a hub id that is not cached here, a folder that holds no model...
        raise RebuildError(f"cannot load the model {model!r}: {type(exc).__name__}: {exc}") from exc
    if shards is not None and shards < 1:
        raise RebuildError(f"--shards must be at least 1, not {shards}. Nothing was changed.")
    cfg = cfg.model_copy(update={"embedding": cfg.embedding.model_copy(update={"model": model})})
    target = {"shards": shards or live.shards, "model": name, "dim": dim}
    return _rebuild(loc, cfg, kind="reembed", target=target, commit_every_s=commit_every_s, progress=progress)


def promote(*, db: str, generation: int, cfg: Config) -> dict[str, Any]:
    """Make ``generation`` live, first catching it up with documents ingested into the live one since
    it was built (under the db's writer lock, so no ingest runs between the catch-up and the switch).

    Returns:
        What was done: the generations before and after, and the catch-up's counts.
    """
    loc = store.location(db, cfg.storage)
    loc.check()
    catalog = store.read_catalog(loc)
    # A missing or unfinished generation fails before any lock.
    catalog.get(generation, uri=loc.uri).require_ready(repr(loc.uri))
    if generation == catalog.live:
        return {"live": generation, "previous": generation, "caught_up": None}
    run_id = ingest.new_run_id()
    lease = {"lease_s": cfg.storage.lock_lease_s, "wait_s": cfg.storage.lock_wait_s}
    with store.writer_lock(loc, run_id=run_id, **lease) as lock:
        catalog = store.read_catalog(loc)
        live, target = catalog.live_manifest, catalog.get(generation, uri=loc.uri)
        caught_up = None
        work, stale = plan_sync(loc, live, target)
        if work.num_rows or stale.num_rows:
            tables = store.tables_of(loc, target)
            with contextlib.ExitStack() as stack:
                locks = [lock]
                if tables != loc:  # a generation of its own folder: no build of it may run meanwhile
                    locks.append(stack.enter_context(store.writer_lock(tables, run_id=run_id, **lease)))
                stack.enter_context(ray_session(cfg.ray))
                builder = _Builder(loc, cfg, live=live, target=target, run_id=run_id)
                caught_up = builder.sync(locks=tuple(locks))
                builder.finish()
            check_generation(loc, live, target)
            if builder.embedding is not None:
                lock.check()
                store.record_vectors(loc, builder.embedding.dtype, generation)
        lock.check()
        store.promote(loc, generation)
    logger.info("generation %d is live (was %d)", generation, live.generation)
    return {"live": generation, "previous": live.generation, "caught_up": caught_up}


def drop(*, db: str, generation: int, cfg: Config) -> store.Manifest:
    """Remove a generation that is not live (its manifest entry, then its tables)."""
    loc = store.location(db, cfg.storage)
    loc.check()
    store.read_catalog(loc).get(generation, uri=loc.uri)  # a missing generation fails before any lock
    with store.writer_lock(
        loc, run_id=f"drop-{generation}", lease_s=cfg.storage.lock_lease_s, wait_s=cfg.storage.lock_wait_s
    ):
        manifest = store.read_catalog(loc).get(generation, uri=loc.uri)
        if manifest.state == store.BUILDING and manifest.path:
            try:  # a build that is running holds its generation's lock; a dead one's is taken over
                with store.writer_lock(
                    store.tables_of(loc, manifest), run_id="drop", lease_s=cfg.storage.lock_lease_s, wait_s=0
                ):
                    pass
            except store.LockTimeout as exc:
                raise RebuildError(
                    f"generation {generation} is being built right now ({exc}); stop that run first. "
                    "Nothing was changed."
                ) from None
        return store.drop(loc, generation)


def generations(db: str, cfg: Config) -> list[dict[str, Any]]:
    """Every generation of the db with its model, rows, shards, state and whether it is live."""
    loc = store.location(db, cfg.storage)
    loc.check()
    catalog = store.read_catalog(loc)
    listed = []
    for number, manifest in sorted(catalog.generations.items()):
        rows = None
        with contextlib.suppress(Exception):  # a generation whose tables are half made (building)
            rows = sum(store.shard_rows(loc, number).values())
        listed.append({**manifest.to_dict(), "rows": rows, "live": number == catalog.live})
    return listed


# --- the build ------------------------------------------------------------------------------------


def _rebuild(
    loc: store.Location,
    cfg: Config,
    *,
    kind: str,
    target: dict[str, Any],
    commit_every_s: float,
    progress: Callable[[dict[str, Any]], None] | None,
) -> dict[str, Any]:
    run_id, started = ingest.new_run_id(), time.time()
    lease = {"lease_s": cfg.storage.lock_lease_s, "wait_s": cfg.storage.lock_wait_s}
    with store.writer_lock(loc, run_id=run_id, **lease):
        live = store.read_manifest(loc)
        gen, resumed = _start_or_resume(loc, live, kind=kind, **target)
    tables = store.tables_of(loc, gen)
    with store.writer_lock(tables, run_id=run_id, **lease) as build_lock:  # one builder per generation
        for old in store.clean_staging(tables, keep=run_id):
            logger.info("resuming generation %d after run %s stopped", gen.generation, old)
        with contextlib.ExitStack() as stack:
            stack.enter_context(ray_session(cfg.ray))
            log_path = stack.enter_context(ingest.run_log(loc, run_id))
            sampler = stack.enter_context(report.ResourceSampler())
            builder = _Builder(
                loc,
                cfg,
                live=live,
                target=gen,
                run_id=run_id,
                commit_every_s=commit_every_s,
                progress=progress,
            )
            passes = [builder.sync(locks=(build_lock,))]
            indexes = None
            # Indexed as the live one is (or as index.after_ingest asks), before it is ready: no
            # generation goes live without the full-text index that hybrid queries need.
            if cfg.index.after_ingest or _searched_by_index(loc, live):
                from pipelines import index

                build_lock.check()
                indexes = index.build(loc, settings=cfg.index, generation=gen.generation)
            # Documents ingested meanwhile: caught up with the db locked, so none comes between this
            # pass and the check (rows added after the indexes are searched unindexed until the next).
            with store.writer_lock(loc, run_id=run_id, **lease) as lock:
                live = store.read_manifest(loc)
                builder.live = live
                passes.append(builder.sync(locks=(lock, build_lock)))
                builder.finish()
                check = check_generation(loc, live, gen)
                lock.check()
                vectors = builder.embedding.dtype if builder.embedding is not None else live.vectors
                gen = store.update_generation(loc, gen.generation, state=store.READY, vectors=vectors)
    result = {
        "run_id": run_id,
        "kind": kind,
        "db": loc.uri,
        "generation": gen.generation,
        "from_generation": live.generation,
        "model": gen.model,
        "dim": gen.dim,
        "shards": gen.shards,
        "resumed": resumed,
        "wall_s": round(time.time() - started, 2),
        "passes": passes,
        "check": check,
        "embeddings": builder.totals.summary() if builder.embedding is not None else {"computed": 0},
        "backend": builder.embedding.backend if builder.embedding is not None else None,
        "resources": sampler.summary(),
        "indexes": indexes,
        "log": log_path,
    }
    tables.write_bytes("build.json", report.dumps(result).encode())
    return result


def _searched_by_index(loc: store.Location, manifest: store.Manifest) -> bool:
    """Whether a generation has search indexes (vector or full text; the doc_id B-tree aside)."""
    tables = store.open_shards(loc, manifest.generation).values()
    return any(index.columns != ["doc_id"] for table in tables for index in table.list_indices())


def _start_or_resume(
    loc: store.Location, live: store.Manifest, *, kind: str, shards: int, model: str, dim: int
) -> tuple[store.Manifest, bool]:
    """The generation this command builds: an unfinished one made by the same command from the same
    live generation (a run that stopped), or a new one. Call holding the db's writer lock."""
    made_by = f"{kind} of {live.generation}"
    for manifest in store.read_catalog(loc).generations.values():
        same = (manifest.shards, manifest.model, manifest.dim, manifest.made_by) == (
            shards,
            model,
            dim,
            made_by,
        )
        if same and manifest.state == store.BUILDING:
            logger.info("resuming generation %d (%s)", manifest.generation, made_by)
            store.create_tables(loc, manifest)  # those a run that died early did not make
            return manifest, True
    manifest = store.new_generation(loc, shards=shards, model=model, dim=dim, made_by=made_by)
    store.create_tables(loc, manifest)
    logger.info("building generation %d (%s): %d shards of %s", manifest.generation, made_by, shards, model)
    return manifest, False


def _cfg_for(cfg: Config, target: store.Manifest) -> Config:
    """The config that embeds for ``target``: its model, at the precision its vectors have."""
    embedding = {"model": target.model}
    if target.vectors in ("fp32", "bf16", "fp16", "int8") and cfg.embedding.dtype == "auto":
        embedding["dtype"] = target.vectors
    return cfg.model_copy(update={"embedding": cfg.embedding.model_copy(update=embedding)})


class _Builder:
    """Brings a generation being built in line with the live one, pass by pass (``sync``)."""

    def __init__(
        self,
        loc: store.Location,
        cfg: Config,
        *,
        live: store.Manifest,
        target: store.Manifest,
        run_id: str,
        commit_every_s: float = 30.0,
        progress: Callable[[dict[str, Any]], None] | None = None,
    ):
        # The model that embeds is the target's, at the precision of the vectors it holds.
        self.loc, self.cfg, self.live, self.target, self.run_id = (
            loc,
            _cfg_for(cfg, target),
            live,
            target,
            run_id,
        )
        self.commit_every_s, self.progress = commit_every_s, progress
        self.embedding: setup.EmbeddingSetup | None = None
        self.totals = setup.EmbedTotals(time.time())
        self.passes = 0

    @property
    def copy(self) -> bool:
        """Whether the live generation's vectors serve the target as they are (same model): copied."""
        return (self.target.model, self.target.dim) == (self.live.model, self.live.dim)

    def sync(self, *, locks: tuple[store.WriterLock, ...]) -> dict[str, Any]:
        """One pass: delete the target's documents that the live generation no longer holds as they
        are, then build the live documents the target lacks. Returns the pass's counts."""
        started = time.time()
        self.passes += 1
        work, stale = plan_sync(self.loc, self.live, self.target)
        counts = {"docs": work.num_rows, "stale_docs": stale.num_rows, "chunks": 0, "failed": []}
        if stale.num_rows:
            _check(locks)
            _delete_docs(store.tables_of(self.loc, self.target), stale)
        if work.num_rows:
            counts.update(self._build(work, locks))
        counts["wall_s"] = round(time.time() - started, 2)
        logger.info("pass %d: %d documents built, %d stale ones removed", self.passes, work.num_rows,
                    stale.num_rows)  # fmt: skip
        if counts["failed"]:
            raise RebuildError(
                f"{len(counts['failed'])} documents could not be built into generation "
                f"{self.target.generation}, e.g. {counts['failed'][0]}; it stays unfinished."
            )
        return counts

    def finish(self) -> None:
        """Wait for the embedding cache's last writes."""
        if self.embedding is not None:
            self.embedding.finish_cache(self.totals.totals["computed"])

    def _build(self, work: pa.Table, locks: tuple[store.WriterLock, ...]) -> dict[str, Any]:
        cfg = self.cfg
        tables = store.tables_of(self.loc, self.target)
        # One pass at a time: each stages in the run's folder, removed when the pass ends.
        staging = store.Staging(self.loc, self.run_id, self.target, under=tables)
        staging.create()
        # A block of documents (chunking.docs_per_batch) is loaded, embedded and staged together.
        size = cfg.chunking.docs_per_batch
        blocks = [work.slice(i, size) for i in range(0, work.num_rows, size)]
        # Every stage takes whole blocks (batch_size=None), so each staged write holds whole documents
        # and a commit of some writes never holds part of one.
        ds = ray.data.from_arrow(blocks).map_batches(
            load_chunks,
            batch_format="pyarrow",
            batch_size=None,
            fn_kwargs={"at": store.tables_of(self.loc, self.live), "vectors": self.copy},
        )
        if not self.copy:
            if self.embedding is None:
                sample = setup.Sample(
                    name="the stored chunks",
                    texts=_sample_texts(store.tables_of(self.loc, self.live), self.live),
                )
                self.embedding = setup.setup_embedding(sample, cfg, tables=tables, manifest=self.target)
            ds = ds.map_batches(
                fit_chunks,
                batch_format="pyarrow",
                batch_size=None,
                fn_kwargs={
                    "model": cfg.embedding.model,
                    "max_tokens": cfg.chunking.max_tokens,
                    "overlap_tokens": cfg.chunking.overlap_tokens,
                },
            )
            ds = setup.embed_chunks(ds, self.embedding, cfg, batch_size=None)
        ds = ds.map_batches(
            store.write_chunks,
            batch_format="pyarrow",
            batch_size=None,
            fn_kwargs={"staging": staging, "model": self.target.model},
        )
        counts: dict[str, Any] = {"chunks": 0, "committed": 0, "failed": [], "commits": 0}
        pending: list[str] = []
        fragments: dict[str, list[str]] = {}  # staged by the pending attempts, not yet committed
        last_commit = time.monotonic()
        try:
            for summary in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                for row in summary.to_pylist():
                    pending.append(row["attempt"])
                    for name, made in json.loads(row["fragments"]).items():
                        fragments.setdefault(name, []).extend(made)
                    counts["chunks"] += row["chunks"]
                    counts["failed"].extend(json.loads(row["failed"]))
                    self.totals.add(json.loads(row["embed_stats"]))
                if time.monotonic() - last_commit >= self.commit_every_s:
                    counts["committed"] += self._commit(staging, pending, fragments, locks)
                    counts["commits"] += 1
                    pending, fragments, last_commit = [], {}, time.monotonic()
                if self.progress is not None:
                    self.progress({"chunks": counts["chunks"], "committed": counts["committed"]})
            counts["committed"] += self._commit(staging, pending, fragments, locks)
            counts["commits"] += 1
        finally:
            staging.discard()
        return counts

    def _commit(
        self,
        staging: store.Staging,
        attempts: list[str],
        fragments: dict[str, list[str]],
        locks: tuple[store.WriterLock, ...],
    ) -> int:
        committed = 0
        for shard in range(self.target.shards):
            _check(locks)
            staging.add(shard, fragments.get(store.shard_name(shard), []))
            committed += staging.commit_attempts(shard, attempts)
        logger.info("committed %d rows to generation %d", committed, self.target.generation)
        return committed


def _check(locks: tuple[store.WriterLock, ...]) -> None:
    for lock in locks:
        lock.check()


def _sample_texts(at: store.Location, live: store.Manifest) -> Callable[[int], list[str]]:
    """Texts to calibrate and measure a model on: the first stored chunks, as a model reads them."""

    def sample(n: int) -> list[str]:
        rows = []
        conn = at.connect()
        for i in range(live.shards):
            table = conn.open_table(store.shard_name(i))
            rows += table.search().select(["title", "text"]).limit(n).to_arrow().to_pylist()
            if len(rows) >= n:
                break
        return [embed_input(r["title"], r["text"]) for r in rows[:n]]

    return sample


# --- Ray Data stages -----------------------------------------------------------------------------


def load_chunks(batch: pa.Table, *, at: store.Location, vectors: bool) -> pa.Table:
    """The stored chunks of a block of documents (``doc_id``, ``shard``), whole documents in order,
    with their vectors when ``vectors``."""
    conn = at.connect()
    columns = _LOADED + (["vector"] if vectors else [])
    parts = []
    shards = batch.column("shard")
    for shard in pc.unique(shards).to_pylist():
        ids = batch.filter(pc.equal(shards, shard)).column("doc_id").to_pylist()
        table = conn.open_table(store.shard_name(shard))
        for start in range(0, len(ids), 500):
            where = f"doc_id IN ({store._sql_list(ids[start : start + 500])})"
            parts.append(table.search().where(where).select(columns).limit(None).to_arrow())
    rows = pa.concat_tables(parts).sort_by([("doc_id", "ascending"), ("chunk_index", "ascending")])
    ok = pa.array(["ok"] * rows.num_rows, pa.string())
    return rows.append_column("status", ok).append_column("error", pa.nulls(rows.num_rows, pa.string()))


def fit_chunks(batch: pa.Table, *, model: str, max_tokens: int | None, overlap_tokens: int) -> pa.Table:
    """Stored chunks as ``model`` reads them (CHUNK_SCHEMA, token ids included). A document whose
    chunks all fit the model's input keeps them as they are; one with a chunk the model would cut
    short is put together again from its chunks and chunked anew for this model."""
    limit = models.max_seq_length(model)
    counter = models.load_tokenizer(model)  # no truncation: the true length
    rows = batch.select([c for c in CHUNK_SCHEMA.names if c in batch.column_names]).to_pylist()
    encodings = counter.encode_batch(
        [embed_input(r["title"], r["text"]) for r in rows], add_special_tokens=True
    )
    too_long = {r["doc_id"] for r, enc in zip(rows, encodings, strict=True) if len(enc.ids) > limit}
    kept = [
        {**r, "n_tokens": len(enc.ids), "input_ids": enc.ids}
        for r, enc in zip(rows, encodings, strict=True)
        if r["doc_id"] not in too_long
    ]
    parts = [pa.Table.from_pylist(kept, schema=CHUNK_SCHEMA)]
    if too_long:
        docs = join_chunks([r for r in rows if r["doc_id"] in too_long])
        budget = min(max_tokens or limit, limit)
        parts.append(
            chunking.chunk_docs(
                docs, model=model, max_tokens=budget, overlap_tokens=min(overlap_tokens, budget // 4)
            )
        )
        logger.info("re-chunked %d documents whose chunks exceed %s's %d tokens", len(too_long), model, limit)
    return pa.concat_tables(parts)


def join_chunks(rows: list[dict[str, Any]]) -> pa.Table:
    """Documents (DOC_SCHEMA) put together from their chunks (each ``text`` is the document's
    characters ``char_start:char_end``; neighbours overlap; a gap the chunker trimmed becomes spaces)."""
    by_doc: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_doc.setdefault(row["doc_id"], []).append(row)
    docs = []
    for doc_id, chunks in by_doc.items():
        chunks.sort(key=lambda c: c["chunk_index"])
        text = ""
        for chunk in chunks:
            text = text[: chunk["char_start"]].ljust(chunk["char_start"]) + chunk["text"]
        first = chunks[0]
        docs.append(
            {
                "doc_id": doc_id, "title": first["title"], "text": text, "source": first["source"],
                "content_hash": first["content_hash"], "metadata": first["metadata"], "error": None,
            }
        )  # fmt: skip
    return pa.Table.from_pylist(docs, schema=DOC_SCHEMA)


# --- comparing generations -------------------------------------------------------------------------


def _documents(loc: store.Location, manifest: store.Manifest) -> pa.Table:
    """(doc_id, content_hash, shard) of every document a generation holds."""
    conn = store.tables_of(loc, manifest).connect()
    parts = []
    for i in range(manifest.shards):
        table = conn.open_table(store.shard_name(i))
        found = (
            table.search().where("chunk_index = 0").select(["doc_id", "content_hash"]).limit(None).to_arrow()
        )
        parts.append(found.append_column("shard", pa.array([i] * found.num_rows, pa.int32())))
    schema = pa.schema([("doc_id", pa.string()), ("content_hash", pa.string()), ("shard", pa.int32())])
    return pa.concat_tables([p.cast(schema) for p in parts]) if parts else schema.empty_table()


def plan_sync(loc: store.Location, live: store.Manifest, target: store.Manifest) -> tuple[pa.Table, pa.Table]:
    """What brings ``target`` in line with ``live``: the live documents it lacks or holds in another
    version (with their live shard), and the documents it holds that the live one does not hold so
    (with their target shard)."""
    have, want = _documents(loc, target), _documents(loc, live)
    keys = ["doc_id", "content_hash"]
    work = want.join(have.select(keys), keys=keys, join_type="left anti")
    stale = have.join(want.select(keys), keys=keys, join_type="left anti")
    return work.sort_by("doc_id"), stale


def _delete_docs(tables: store.Location, docs: pa.Table) -> None:
    conn = tables.connect()
    shards = docs.column("shard")
    for shard in pc.unique(shards).to_pylist():
        ids = docs.filter(pc.equal(shards, shard)).column("doc_id").to_pylist()
        table = conn.open_table(store.shard_name(shard))
        for start in range(0, len(ids), 1000):
            table.delete(f"doc_id IN ({store._sql_list(ids[start : start + 1000])})")


def check_generation(loc: store.Location, live: store.Manifest, target: store.Manifest) -> dict[str, Any]:
    """Check that ``target`` holds every live document once, each chunk once, in its shard.

    A generation of the same model must hold the very chunks of the live one (chunk_id and
    content_hash); one of another model may hold a re-chunked document's chunks instead of them.

    Raises:
        RebuildError: saying what is wrong.

    Returns:
        The counts checked.
    """
    columns = ["doc_id", "chunk_id", "chunk_index", "content_hash"]

    def rows(manifest: store.Manifest) -> pa.Table:
        conn = store.tables_of(loc, manifest).connect()
        parts = []
        for i in range(manifest.shards):
            found = conn.open_table(store.shard_name(i)).search().select(columns).limit(None).to_arrow()
            parts.append(
                found.select(columns).append_column("shard", pa.array([i] * found.num_rows, pa.int32()))
            )
        return pa.concat_tables(parts)

    built, source = rows(target), rows(live)
    problems = []
    duplicates = built.num_rows - len(pc.unique(built.column("chunk_id")))
    if duplicates:
        problems.append(f"{duplicates} chunks stored more than once")
    homes = pa.array(
        [store.shard_of(d, target.shards) for d in built.column("doc_id").to_pylist()], pa.int32()
    )
    misplaced = int(pc.sum(pc.not_equal(homes, built.column("shard"))).as_py() or 0)
    if misplaced:
        problems.append(f"{misplaced} chunks in another shard than their document's")
    per_doc = built.group_by("doc_id").aggregate([("chunk_index", "count"), ("chunk_index", "max")])
    holes = int(
        pc.sum(pc.not_equal(per_doc["chunk_index_count"], pc.add(per_doc["chunk_index_max"], 1))).as_py() or 0
    )
    if holes:
        problems.append(f"{holes} documents missing some of their chunks")
    keys = ["doc_id", "content_hash"]
    first = pc.equal(source.column("chunk_index"), 0)
    want = source.filter(first).select(keys)
    have = built.filter(pc.equal(built.column("chunk_index"), 0)).select(keys)
    missing = want.join(have, keys=keys, join_type="left anti").num_rows
    extra = have.join(want, keys=keys, join_type="left anti").num_rows
    if missing or extra:
        problems.append(f"{missing} live documents missing, {extra} documents the live generation lacks")
    if (target.model, target.dim) == (live.model, live.dim):
        chunk_keys = ["chunk_id", "content_hash"]
        lost = source.select(chunk_keys).join(
            built.select(chunk_keys), keys=chunk_keys, join_type="left anti"
        )
        if lost.num_rows:
            problems.append(f"{lost.num_rows} live chunks missing")
    checked = {
        "docs": want.num_rows,
        "chunks": built.num_rows,
        "live_chunks": source.num_rows,
        "duplicates": duplicates,
        "misplaced": misplaced,
    }
    if problems:
        raise RebuildError(f"generation {target.generation} is not complete: " + "; ".join(problems) + ".")
    logger.info("generation %d holds %d documents, %d chunks, each once", target.generation, want.num_rows,
                built.num_rows)  # fmt: skip
    return checked
