"""The batch pipeline: read -> skip unchanged -> chunk -> embed -> write, then commit per shard."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import secrets
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import ray

from pipelines import chunking, models, sources, store
from pipelines.config import Config
from pipelines.embedding import embedding_dim
from pipelines.embedding.setup import EmbedTotals, Sample, embed_chunks, setup_embedding
from pipelines.models import embed_input
from pipelines.ray_session import ray_session
from pipelines.reporting import report

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def run_log(db: store.Location, run_id: str) -> Iterator[str]:
    """Everything logged in this process while the run lasts (INFO and up: embedpipe, Ray, Ray Data,
    the libraries) goes to ``_runs/<run_id>.log`` in the db, next to the run report, whatever the
    console shows. In an object store the log is written locally and uploaded when the run ends."""
    name = f"{store.RUNS_DIR}/{run_id}.log"
    if db.local:
        path = db.path / name
        path.parent.mkdir(parents=True, exist_ok=True)
    else:
        path = Path(tempfile.mkdtemp(prefix="embedpipe-log-")) / f"{run_id}.log"
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root, ray_data = logging.getLogger(), logging.getLogger("ray.data")  # ray.data does not propagate
    level = root.level
    root.setLevel(min(level, logging.INFO) if level else logging.NOTSET)
    root.addHandler(handler)
    ray_data.addHandler(handler)
    try:
        with contextlib.suppress(Exception):  # a cluster's driver has no local session dir
            logger.info("Ray session logs: %s", ray._private.worker._global_node.get_session_dir_path())
        yield db.join(name).uri
    finally:
        ray_data.removeHandler(handler)
        root.removeHandler(handler)
        root.setLevel(level)
        handler.close()
        if not db.local:
            with contextlib.suppress(Exception):  # the run's outcome matters more than its log
                db.write_bytes(name, path.read_bytes())
            shutil.rmtree(path.parent, ignore_errors=True)


def new_run_id() -> str:
    return f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


def calibration_texts(source: str, cfg: Config, n: int) -> list[str]:
    """Up to ``n`` chunk texts from the start of the source, as the model will read them."""
    ds = sources.read_source(
        source,
        docs_per_block=cfg.read.docs_per_block,
        max_doc_mb=cfg.read.max_doc_mb,
        parse_limits=cfg.read.parse_limits(),
        storage=cfg.storage,
    )
    docs = [t for t in ray.get(ds.limit(n).to_arrow_refs()) if t.num_rows]
    if not docs:
        return []
    chunks = chunking.chunk_docs(
        pa.concat_tables(docs),
        model=cfg.embedding.model,
        max_tokens=cfg.chunking.max_tokens,
        overlap_tokens=cfg.chunking.overlap_tokens,
    ).to_pylist()
    return [embed_input(c["title"], c["text"]) for c in chunks if c["status"] == "ok"][:n]


def sample(source: str, cfg: Config) -> Sample:
    """The start of ``source`` as the model reads it: what int8 is calibrated on and engines measured on."""
    return Sample(name=source, texts=functools.partial(calibration_texts, source, cfg))


def build(
    *,
    source: str | Path,
    db: str | Path,
    cfg: Config,
    report_path: Path | None = None,
    prune: bool = False,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Ingest ``source`` into the sharded tables under ``db`` and return the run report.

    Args:
        source: a directory of files, a .jsonl file or a .parquet file.
        db: the db directory (created if missing).
        cfg: validated settings; every resource number comes from here.
        report_path: an extra place to write the report (it always goes to db/_runs/).
        prune: delete stored documents of this source that the source no longer has.
        progress: called after each written batch with the counts so far (docs, chunks, tokens,
            elapsed_s) and total_docs, about how many the source holds (None if unknown).

    Returns:
        The run report (see report.build_report).
    """
    run_id, started = new_run_id(), time.time()
    db = store.location(db, cfg.storage)
    db.check()  # an unreachable bucket is one clear error before anything is written
    source = sources.resolve(source, cfg.storage)
    sources.check_exists(source, cfg.storage)
    with store.writer_lock(
        db, run_id=run_id, lease_s=cfg.storage.lock_lease_s, wait_s=cfg.storage.lock_wait_s
    ) as lock:
        store.clean_staging(db, keep=run_id)  # what killed runs staged; only the lock's holder stages
        return _build(
            run_id=run_id, started=started, source=source, db=db, cfg=cfg, lock=lock,
            report_path=report_path, prune=prune, progress=progress,
        )  # fmt: skip


def _build(
    *,
    run_id: str,
    started: float,
    source: str,
    db: store.Location,
    cfg: Config,
    lock: store.WriterLock,
    report_path: Path | None,
    prune: bool,
    progress: Callable[[dict[str, Any]], None] | None,
) -> dict[str, Any]:
    model = cfg.embedding.model
    counts: dict[str, Any] = {"started_at": started, "chunks": 0, "tokens": 0, "ingested": 0, "unchanged": 0}
    failed: list[list[str]] = []
    timeline: list[dict[str, Any]] = []
    embedded = EmbedTotals(started)
    seen_ids: set[str] = set()
    total_docs = sources.count_docs(source, storage=cfg.storage) if progress else None
    if cfg.read.quick_check_s and store.is_db(db):
        quick = _unchanged_run(
            source=source, db=db, cfg=cfg, run_id=run_id, started=started, report_path=report_path,
            prune=prune, progress=progress, total_docs=total_docs, lock=lock,
        )  # fmt: skip
        if quick is not None:
            return quick
    with contextlib.ExitStack() as stack:
        stack.enter_context(ray_session(cfg.ray))
        sampler = stack.enter_context(report.ResourceSampler())
        ray.data.DataContext.get_current().enable_progress_bars = cfg.ray.progress_bars
        # After ray.init: lancedb warns when its runtime is forked, and Ray forks while starting.
        manifest = _open_db(db, cfg)
        tables = store.tables_of(db, manifest)  # the live generation's
        log_path = stack.enter_context(run_log(db, run_id))
        staging = store.Staging(db, run_id, manifest)
        staging.create()
        stack.callback(staging.discard)  # staged rows of a failed run are never committed
        embedding = setup_embedding(sample(source, cfg), cfg, tables=tables, manifest=manifest)
        pool, backend, dtype = embedding.pool, embedding.backend, embedding.dtype
        if cfg.ray.data_object_store_limit_mb:
            options = ray.data.DataContext.get_current().execution_options
            options.resource_limits = options.resource_limits.copy(
                object_store_memory=cfg.ray.data_object_store_limit_mb * 2**20
            )
        # Chunking in tasks of its own (a CPU reservation unlike the actors' keeps Ray Data from fusing
        # it into them): the actors then run passes back to back while the next rows are chunked.
        chunk_cpus = {"num_cpus": cfg.chunking.num_cpus} if cfg.chunking.num_cpus else {}
        ds = (
            sources.read_source(
                source,
                docs_per_block=cfg.read.docs_per_block,
                max_doc_mb=cfg.read.max_doc_mb,
                parse_limits=cfg.read.parse_limits(),
                storage=cfg.storage,
            )
            .map_batches(
                store.mark_unchanged,
                batch_format="pyarrow",
                batch_size=cfg.chunking.docs_per_batch,
                fn_kwargs={"db": tables, "shards": manifest.shards},
                **chunk_cpus,
            )
            .map_batches(
                chunking.chunk_docs,
                batch_format="pyarrow",
                batch_size=cfg.chunking.docs_per_batch,
                fn_kwargs={
                    "model": model,
                    "max_tokens": cfg.chunking.max_tokens,
                    "overlap_tokens": cfg.chunking.overlap_tokens,
                },
                **chunk_cpus,
            )
        )
        ds = embed_chunks(ds, embedding, cfg, batch_size=cfg.embedding.batch_size).map_batches(
            store.write_chunks,
            batch_format="pyarrow",
            batch_size=None,
            fn_kwargs={"staging": staging, "model": manifest.model, "report_ids": prune},
        )
        attempts: set[str] = set()  # write attempts whose results arrived; retried ones staged too
        fragments: dict[str, list[str]] = {}  # per shard, the staged fragments of those attempts
        for summary in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            for row in summary.to_pylist():
                attempts.add(row["attempt"])
                for name, made in json.loads(row["fragments"]).items():
                    fragments.setdefault(name, []).extend(made)
                for key in ("chunks", "tokens", "ingested", "unchanged"):
                    counts[key] += row[key]
                failed.extend(json.loads(row["failed"]))
                seen_ids.update(json.loads(row["doc_ids"]))
                embedded.add(json.loads(row["embed_stats"]))
                timeline.append(
                    {
                        "t": round(row["finished_at"] - started, 2),
                        "chunks": counts["chunks"],
                        "docs": counts["ingested"] + counts["unchanged"] + len(failed),
                        "tokens": counts["tokens"],
                    }
                )
            if progress is not None and timeline:
                progress({**timeline[-1], "elapsed_s": time.time() - started, "total_docs": total_docs})
        stages = report.stage_times(ds.get_stats_summary())
        finishing = time.time()
        dropped, counts["chunks"] = _commit(staging, failed, attempts, fragments, lock=lock)
        counts["ingested"] -= dropped
        lock.check()
        store.record_failures(db, run_id=run_id, failed=failed, at=time.time())
        lock.check()
        pruned = store.prune(db, source=source, keep=seen_ids) if prune else []
        committed = time.time()
        cache_writes = embedding.finish_cache(embedded.totals["computed"])
        if embedded.totals["computed"]:
            lock.check()
            manifest = store.record_vectors(db, dtype)
        logger.info(
            "after the last batch: commit %.2f s, embedding cache %.2f s",
            committed - finishing,
            time.time() - committed,
        )
    indexes = None
    if cfg.index.after_ingest:
        from pipelines import index

        lock.check()
        indexes = index.build(db, settings=cfg.index)
    counts["failed"] = failed
    return _finish(
        run_id=run_id, started=started, source=source, db=db, cfg=cfg, counts=counts, embedded=embedded,
        resources={**sampler.summary(), "embed_actors": pool, "timeline": sampler.timeline},
        stages=stages, timeline=timeline, backend=backend, manifest=manifest, log_path=log_path,
        report_path=report_path, pruned=pruned if prune else None, indexes=indexes,
        cache_appends=cache_writes["appends"] if cache_writes is not None else None,
    )  # fmt: skip


def _finish(
    *,
    run_id: str,
    started: float,
    source: str,
    db: store.Location,
    cfg: Config,
    counts: dict[str, Any],
    embedded: EmbedTotals,
    resources: dict[str, Any],
    stages: dict[str, Any],
    timeline: list[dict[str, Any]],
    backend: dict[str, Any],
    manifest: store.Manifest,
    log_path: str,
    report_path: Path | None,
    pruned: list[str] | None,
    indexes: dict[str, Any] | None,
    cache_appends: int | None = None,
) -> dict[str, Any]:
    """Build the run report, write it to db/_runs/ (and ``report_path``) and return it."""
    wall_s = time.time() - started
    result = report.build_report(
        run_id=run_id,
        source=source,
        db=db.uri,
        model=manifest.model,
        wall_s=wall_s,
        counts=counts,
        resources=resources,
        stages=stages,
        shards=store.shard_rows(db),
        config=cfg.model_dump(),
        hourly_usd=cfg.cost.hourly_usd,
        timeline=timeline,
    )
    result["throughput"]["embeddings_per_s"] = round(embedded.totals["computed"] / max(wall_s, 1e-9), 2)
    result["embeddings"] = embedded.summary()
    if cache_appends is not None:
        result["embeddings"]["cache_appends"] = cache_appends
    result["batching"] = {
        "initial_token_budget": cfg.embedding.batch_tokens,
        "adaptive": cfg.embedding.adapt_batch,
        "timeline": embedded.timeline,
    }
    result["backend"] = {k: v for k, v in backend.items() if k != "int8_meta"}
    result["backend"]["db_vectors"] = manifest.vectors  # the db's format after this run ("mixed"?)
    if "int8_meta" in backend:
        result["backend"]["int8"] = backend["int8_meta"]
    if pruned is not None:
        result["docs"]["pruned"] = len(pruned)
    if indexes is not None:
        result["indexes"] = indexes
    result["log"] = log_path
    db.write_bytes(f"{store.RUNS_DIR}/{run_id}.json", report.dumps(result).encode())
    if report_path is not None:
        report.write_report(result, Path(report_path))
    return result


def _open_db(db: store.Location, cfg: Config) -> store.Manifest:
    """The live generation's manifest; a new db is created for the configured model and shard count.

    An existing db keeps its shard count (``embedpipe reshard`` changes it) unless ``shards`` was set
    explicitly (the config file or --shards), which must then match; its model must match the
    configured one (``embedpipe reembed`` moves a db to another model).
    """
    model = cfg.embedding.model
    shards = cfg.shards
    if "shards" not in cfg.model_fields_set and store.is_db(db):
        shards = store.read_manifest(db).shards
    return store.init_db(
        db, store.Manifest(shards=shards, model=models.model_id(model), dim=embedding_dim(model))
    )


def _unchanged_run(
    *,
    source: str,
    db: store.Location,
    cfg: Config,
    run_id: str,
    started: float,
    report_path: Path | None,
    prune: bool,
    progress: Callable[[dict[str, Any]], None] | None,
    total_docs: int | None,
    lock: store.WriterLock,
) -> dict[str, Any] | None:
    """The quick check: the run's report if every document of ``source`` is stored unchanged (or
    fails to read, for the reason the full run would give), found in this process without Ray or
    the model; None as soon as one document is new or changed, an id repeats, or
    ``read.quick_check_s`` has passed: the full run then does the work."""
    manifest = _open_db(db, cfg)  # checks the db takes this model and shard count, as the full run does
    deadline = started + cfg.read.quick_check_s
    counts: dict[str, Any] = {"started_at": started, "chunks": 0, "tokens": 0, "ingested": 0, "unchanged": 0}
    failed: list[list[str]] = []
    seen: set[str] = set()
    timeline: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        sampler = stack.enter_context(report.ResourceSampler())
        log_path = stack.enter_context(run_log(db, run_id))
        for docs in sources.iter_docs(
            source,
            docs_per_batch=cfg.read.docs_per_block,
            max_doc_mb=cfg.read.max_doc_mb,
            parse_limits=cfg.read.parse_limits(),
            storage=cfg.storage,
        ):
            checked = store.mark_unchanged(docs, db=store.tables_of(db, manifest), shards=manifest.shards)
            rows = checked.select(["doc_id", "source", "error", "status"]).to_pylist()
            for row in rows:
                if row["doc_id"] in seen:
                    return _gave_up(f"document id {row['doc_id']!r} repeats")
                seen.add(row["doc_id"])
                if row["error"]:
                    failed.append([row["doc_id"], row["source"], row["error"]])
                elif row["status"] == "unchanged":
                    counts["unchanged"] += 1
                else:
                    return _gave_up(f"{row['doc_id']!r} is new or changed")
            if time.time() > deadline:
                return _gave_up(
                    f"{len(seen)} documents checked in read.quick_check_s={cfg.read.quick_check_s}"
                )
            timeline.append(
                {"t": round(time.time() - started, 2), "chunks": 0, "docs": len(seen), "tokens": 0}
            )
            if progress is not None:
                progress({**timeline[-1], "elapsed_s": time.time() - started, "total_docs": total_docs})
        logger.info("quick check: all %d documents unchanged or failed; no Ray, no model", len(seen))
        lock.check()
        store.record_failures(db, run_id=run_id, failed=failed, at=time.time())
        lock.check()
        pruned = store.prune(db, source=source, keep=seen) if prune else None
    indexes = None
    if cfg.index.after_ingest:
        from pipelines import index

        lock.check()
        indexes = index.build(db, settings=cfg.index)
    counts["failed"] = failed
    return _finish(
        run_id=run_id, started=started, source=source, db=db, cfg=cfg, counts=counts,
        embedded=EmbedTotals(started), resources={**sampler.summary(), "timeline": sampler.timeline},
        stages={}, timeline=timeline, backend={"quick_check": True}, manifest=manifest,
        log_path=log_path, report_path=report_path, pruned=pruned, indexes=indexes,
    )  # fmt: skip


def _gave_up(reason: str) -> None:
    logger.info("quick check stopped (%s): running the full pipeline", reason)
    return None


def _commit(
    staging: store.Staging,
    failed: list[list[str]],
    attempts: set[str],
    fragments: dict[str, list[str]],
    *,
    lock: store.WriterLock,
) -> tuple[int, int]:
    """Commit every shard; a doc_id seen more than once in the source fails (all its copies).

    The write tasks' ``fragments`` are added to each staging table first, in one commit; rows staged by
    write attempts not in ``attempts`` (a task Ray ran again) are dropped.
    Before each shard's commit the run checks that it still holds the db's writer lock.

    Returns:
        How many staged documents were failed here instead of ingested, and how many rows were
        committed (the embedded chunks of failed copies are not written).
    """
    dropped = committed = 0
    shards = store.open_shards(staging.db)
    for shard in range(staging.manifest.shards):
        staging.add(shard, fragments.get(store.shard_name(shard), []))
        staging.drop_attempts(shard, keep=attempts)
        copies = Counter(staging.staged_doc_ids(shard))
        duplicates = [doc_id for doc_id, n in copies.items() if n > 1]
        staging.drop_docs(shard, duplicates)
        for doc_id in duplicates:
            dropped += copies[doc_id]
            reason = f"duplicate doc_id: {copies[doc_id]} documents in the source share it"
            failed.extend([[doc_id, "", reason]] * copies[doc_id])
        table = shards[store.shard_name(shard)]
        replaced: list[str] = []
        if table.count_rows() > 0:
            ids = [d for d in copies if copies[d] == 1]
            for start in range(0, len(ids), 1000):
                replaced.extend(store.stored_hashes(table, ids[start : start + 1000]))
        lock.check()
        committed += staging.commit(shard, replaced=replaced)
    return dropped, committed
