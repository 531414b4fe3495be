"""The batch pipeline: read -> skip unchanged -> chunk -> embed -> write, then commit per shard."""

from __future__ import annotations

import contextlib
import dataclasses
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

from pipelines import NOTICE, chunking, models, sources, store
from pipelines.config import Config
from pipelines.embedding import Embedder, actor_options, autoscaler_gpus, autotune, backends, embedding_dim
from pipelines.embedding import cache as embed_cache
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


# What a model is calibrated and measured on: a corpus to read, or a function that gives up to n texts
# as the model reads them (reembed takes them from the stored chunks).
Sample = str | Callable[[int], list[str]]


def calibration_texts(source: Sample, cfg: Config, n: int) -> list[str]:
    """Up to ``n`` chunk texts from the start of the source, as the model will read them."""
    if callable(source):
        return source(n)[:n]
    ds = sources.read_source(
        source, docs_per_block=cfg.read.docs_per_block, max_doc_mb=cfg.read.max_doc_mb, storage=cfg.storage
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


MIN_CALIBRATION = 64  # fewer chunks calibrate int8 poorly, and a corpus that small is embedded in seconds


def int8_model(source: Sample | None, cfg: Config) -> tuple[Path | None, dict[str, Any]]:
    """The cached int8 model of the configured embedding model, quantized first if there is none.

    It is calibrated on the first source quantized with; ``embedpipe quantize --force`` redoes it.

    Returns:
        Its directory and its meta.json (how it was made, and in how many seconds); or None and the
        reason, when no model is cached and the source has too few chunks to calibrate one.
    """
    model = cfg.embedding.model
    root = backends.cache_root(cfg.embedding.model_cache)
    target = backends.int8_dir(root, model)
    if not (target / "meta.json").exists():
        if source is None:
            raise ValueError(f"No int8 model in {target}; quantize with a source first")
        root.mkdir(parents=True, exist_ok=True)
        with store.machine_lock(root, "quantize"):  # two runs on one machine quantize once
            if not (target / "meta.json").exists():
                texts = calibration_texts(source, cfg, cfg.embedding.calibration_chunks)
                if len(texts) < MIN_CALIBRATION:
                    return None, {
                        "reason": f"int8 needs {MIN_CALIBRATION} chunks to calibrate on and the source has "
                        f"{len(texts)}; using the torch backend for this run"
                    }
                logger.log(
                    NOTICE, "quantizing %s to int8 on %d chunks of %s (once)", model, len(texts),
                    "the stored chunks" if callable(source) else source,
                )  # fmt: skip
                backends.quantize(model, texts, target)
    return target, json.loads((target / "meta.json").read_text())


def embedding_dtype(cfg: Config, *, on_gpu: bool, stored: str | None = None) -> str:
    """The dtype the actors get, decided here for the device they reserve (int8 on a CPU: the
    driver quantizes first).

    Args:
        cfg: the config (embedding.dtype, embedding.allow_mixed_dtypes).
        on_gpu: whether the actors reserve GPUs.
        stored: the format of the vectors the db holds (Manifest.vectors). ``auto`` keeps it where
            the device can run it; a run that would add another format is an error unless
            ``allow_mixed_dtypes``: vectors of two formats differ by ~1e-3 and rank slightly apart.

    Raises:
        ValueError: the run would mix formats in one db.
    """
    device = "cuda" if on_gpu else "cpu"
    wanted = cfg.embedding.dtype
    if wanted == "auto" and stored in backends.DTYPES and _runs_on(stored, device):
        return stored
    dtype = backends.resolve_dtype(wanted, device, int8_ok=not on_gpu)
    if stored in backends.DTYPES and dtype != stored and not cfg.embedding.allow_mixed_dtypes:
        raise ValueError(
            f"The db holds {stored} vectors, and this run would add {dtype} ones ({device}): one db would "
            f"mix them. Set embedding.dtype: {stored}"
            + (" (int8 runs on CPU actors: embedding.device: cpu)" if stored == "int8" else "")
            + ", use a new --db, or set embedding.allow_mixed_dtypes: true."
        )
    return dtype


def choose_backend(source: Sample | None, cfg: Config, *, device: str, stored: str | None) -> dict[str, Any]:
    """What the actors run: dtype, engine and device, the models' paths and how they were chosen.

    On a CPU this may quantize the model (int8, once per machine) and measure the candidates
    (autotune, once per machine); both are cached.

    Args:
        source: the corpus (calibration and measurement sample).
        cfg: the config.
        device: what the actors reserve: cpu or cuda.
        stored: the format of the vectors the db holds (Manifest.vectors), if any.
    """
    dtype = embedding_dtype(cfg, on_gpu=device == "cuda", stored=stored)
    backend: dict[str, Any] = {"dtype": dtype, "device": device, "engine": "torch"}
    if dtype == "int8":
        path, backend["int8_meta"] = int8_model(source, cfg)
        if path is None:
            if stored == "int8" and not cfg.embedding.allow_mixed_dtypes:
                raise ValueError(
                    f"The db holds int8 vectors, but no int8 model is cached here and "
                    f"{backend['int8_meta']['reason'].split(';')[0]}: run `embedpipe quantize` on a "
                    "larger sample of the corpus first."
                )
            dtype = backends.resolve_dtype("auto", "cpu")
        else:
            backend["int8_model"] = str(path)
    if device == "cpu":
        dtype, engine, backend["autotune"] = cpu_engine(
            source,
            cfg,
            dtype=dtype,
            int8_path=backend.get("int8_model"),
            free=cfg.embedding.dtype == "auto" and stored is None,
        )
        backend.update(engine=engine)
        if engine == "openvino" and dtype != "int8":
            root = backends.cache_root(cfg.embedding.model_cache)
            backend["openvino_model"] = str(backends.openvino_fp32_model(cfg.embedding.model, root))
    backend["dtype"] = dtype
    return backend


def cpu_engine(
    source: Sample | None, cfg: Config, *, dtype: str, int8_path: str | None, free: bool
) -> tuple[str, str, dict[str, Any] | None]:
    """The (dtype, engine) CPU actors run, and the measurement behind it (None if none was needed).

    Args:
        source: the corpus; its first chunks are the measurement's sample.
        cfg: embedding.dtype/engine say what is fixed.
        dtype: the dtype decided so far (embedding_dtype; int8 when its model is at hand).
        int8_path: the int8 model, if one is at hand.
        free: whether the precision may change (dtype auto, and the db holds no vectors yet).
    """
    engine = cfg.embedding.engine
    if dtype == "int8" and not free:
        return "int8", "openvino", None
    if engine != "auto" and not free:
        return dtype, engine, None
    if not backends.openvino_available() and not free:
        return dtype, "torch", None
    choice = autotune.cached_choice(
        cfg.embedding.model,
        texts=lambda: calibration_texts(source, cfg, 256) if source else [],
        int8_files=int8_path,
        threads=cfg.embedding.cpu_threads,
        streams=cfg.embedding.openvino_streams,
        dtypes=None if free else (dtype,),
        engines=None if engine == "auto" else (engine,),
        root=backends.cache_root(cfg.embedding.model_cache),
    )
    if choice is None:  # too little text to measure on; the CPU's flags decide
        return dtype, ("openvino" if dtype == "int8" else "torch"), None
    summary = {k: choice[k] for k in ("dtype", "engine", "tokens_per_s", "results", "signature")}
    return choice["dtype"], choice["engine"], summary


def _runs_on(dtype: str, device: str) -> bool:
    if dtype == "fp16":
        return device == "cuda"
    if dtype == "int8":
        return device == "cpu" and backends.openvino_available()
    return True


@dataclasses.dataclass
class EmbeddingSetup:
    """What the embedding stage of a run needs, decided once by the driver (``setup_embedding``)."""

    cfg: Config
    pool: dict[str, Any]  # actor_options: pool sizes and what each actor reserves
    device: str
    backend: dict[str, Any]  # choose_backend's answer
    int8_files: Any  # ObjectRefs of the model files actors load, or None
    openvino_files: Any
    cache_at: store.Location | None  # where the embedding cache table is (None: no cache)
    cache_writer: Any

    @property
    def dtype(self) -> str:
        return self.backend["dtype"]

    def finish_cache(self, computed: int) -> dict[str, Any] | None:
        """Wait for the cache writer's last append and compact the cache; its counts (None: no cache)."""
        if self.cache_writer is None:
            return None
        writes = ray.get(self.cache_writer.finish.remote(computed))
        if writes["written"]:
            embed_cache.compact(self.cache_at)
        return writes


def setup_embedding(
    source: Sample | None, cfg: Config, *, tables: store.Location, manifest: store.Manifest
) -> EmbeddingSetup:
    """Decide the actors' pool, device and backend (quantizing or measuring once per machine), put the
    model files in Ray's object store and start the embedding cache's writer. Call inside a Ray session.

    Args:
        source: what to calibrate and measure on (a corpus, or a function giving texts).
        cfg: the config; embedding.model is the model to run.
        tables: the generation's tables, beside which its embedding cache lives.
        manifest: the generation written (its dim, and the format of the vectors it holds).
    """
    pool = actor_options(
        cluster_gpus=ray.cluster_resources().get("GPU", 0),
        possible_gpus=autoscaler_gpus(),
        device=cfg.embedding.device,
        dtype=cfg.embedding.dtype,
        gpus_per_actor=cfg.embedding.gpus_per_actor,
        min_actors=cfg.embedding.min_actors,
        max_actors=cfg.embedding.max_actors,
    )
    # The device follows from what the actors reserve: a GPU actor runs on its GPU (or fails
    # saying why), a CPU actor never touches one.
    device = "cuda" if pool["num_gpus"] else "cpu"
    backend = choose_backend(source, cfg, device=device, stored=manifest.vectors)
    dtype = backend["dtype"]
    # Actors on any node load the models from Ray's object store.
    int8_files = ray.put(backends.read_int8(backend["int8_model"])) if dtype == "int8" else None
    openvino_files = None
    if backend["engine"] == "openvino" and dtype != "int8":
        openvino_files = ray.put(backends.read_int8(backend["openvino_model"]))
    cache_writer = None
    if cfg.embedding.cache:
        embed_cache.create(tables, manifest.dim)
        cache_writer = embed_cache.CacheWriter.remote(
            tables,
            manifest.dim,
            flush_rows=cfg.embedding.cache_flush_rows,
            flush_s=cfg.embedding.cache_flush_s,
        )
    return EmbeddingSetup(
        cfg=cfg, pool=pool, device=device, backend=backend, int8_files=int8_files,
        openvino_files=openvino_files, cache_at=tables if cfg.embedding.cache else None,
        cache_writer=cache_writer,
    )  # fmt: skip


def embed_chunks(
    ds: ray.data.Dataset, setup: EmbeddingSetup, cfg: Config, *, batch_size: int | None
) -> ray.data.Dataset:
    """``ds`` (chunk rows) through the embedding actors: adds ``vector`` and ``embed_stats``."""
    pool = setup.pool
    return ds.map_batches(
        Embedder,
        fn_constructor_kwargs={
            "model": cfg.embedding.model,
            "dtype": setup.dtype,
            "device": setup.device,
            "cpu_threads": cfg.embedding.cpu_threads,
            "int8_model": setup.int8_files,
            "openvino_model": setup.openvino_files,
            "openvino_streams": cfg.embedding.openvino_streams,
            "preload": True,  # the model loads while the first batch is read and chunked
            "batch_tokens": cfg.embedding.batch_tokens,
            "min_batch_tokens": cfg.embedding.min_batch_tokens,
            "max_batch_tokens": cfg.embedding.max_batch_tokens,
            "adapt_batch": cfg.embedding.adapt_batch,
            "cache_db": setup.cache_at,
            "cache_writer": setup.cache_writer,
        },
        batch_format="pyarrow",
        batch_size=batch_size,
        compute=ray.data.ActorPoolStrategy(min_size=pool["min_size"], max_size=pool["max_size"]),
        num_gpus=pool["num_gpus"] or None,
        num_cpus=pool.get("num_cpus"),
        # Ray Data restarts a dead actor and retries its batches by default
        # (max_restarts=-1, max_task_retries=-1); embedding has no side effects to repeat.
        **({"resources": cfg.embedding.resources} if cfg.embedding.resources else {}),
    )


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
        embedding = setup_embedding(source, cfg, tables=tables, manifest=manifest)
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
        for summary in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            for row in summary.to_pylist():
                attempts.add(row["attempt"])
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
        dropped, counts["chunks"] = _commit(staging, failed, attempts, lock=lock)
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


class EmbedTotals:
    """Sums the embedding stage's per-batch stats; keeps the token budget's decisions over time."""

    KEYS = ("rows", "computed", "cache_hits", "tokens_computed", "passes", "padded_tokens", "oom_splits")

    def __init__(self, started: float):
        self.started = started
        self.totals = dict.fromkeys(self.KEYS, 0)
        self.batches = 0
        self.timeline: list[dict[str, Any]] = []
        self.actors: set[int] = set()
        self.devices: dict[str, dict[str, Any]] = {}  # actor pid -> its device and visible GPUs
        self.busy: dict[str, list[float]] = {}  # actor pid -> [busy s, first call, last return]

    def add(self, stats: list[dict[str, Any]]) -> None:
        for batch in stats:
            self.batches += 1
            for key in self.KEYS:
                self.totals[key] += int(batch.get(key, 0))
            self.actors.add(batch.get("actor", 0))
            if "called_at" in batch:
                actor = str(batch.get("actor", 0))
                busy = self.busy.setdefault(actor, [0.0, batch["called_at"], batch["returned_at"]])
                busy[0] += float(batch.get("busy_s", 0.0))
                busy[1] = min(busy[1], batch["called_at"])
                busy[2] = max(busy[2], batch["returned_at"])
            if "device" in batch:
                self.devices[str(batch.get("actor", 0))] = {
                    "device": batch["device"],
                    "dtype": batch.get("dtype"),
                    # a logical GPU (EMBEDPIPE_LOGICAL_GPUS, tests) held, while the CPU computed
                    "logical_gpu": bool(batch.get("logical_gpu")),
                    "cuda_visible_devices": batch.get("cuda_visible_devices"),
                }
            for event in batch.get("events", []):
                point = {"t": round(event["at"] - self.started, 2), "token_budget": event["token_budget"]}
                if "tokens_per_s" in event:
                    point["tokens_per_s"] = event["tokens_per_s"]
                self.timeline.append({**point, "reason": event["reason"]})
        self.timeline.sort(key=lambda p: p["t"])

    def summary(self) -> dict[str, Any]:
        totals = dict(self.totals)
        tokens = totals["tokens_computed"]
        totals["padding_overhead"] = round(totals["padded_tokens"] / tokens - 1, 4) if tokens else 0.0
        totals["actors"] = len(self.actors)
        totals["batches"] = self.batches
        totals["actor_devices"] = self.devices
        # The share of each actor's active time (first batch in to last batch out) spent in forward
        # passes: device time from CUDA events on a GPU, the passes' wall time on a CPU.
        busy = sum(b[0] for b in self.busy.values())
        span = sum(b[2] - b[1] for b in self.busy.values())
        totals["busy_s"] = round(busy, 2)
        totals["busy_fraction"] = round(busy / span, 3) if span > 0 else None
        return totals


def _commit(
    staging: store.Staging, failed: list[list[str]], attempts: set[str], *, lock: store.WriterLock
) -> tuple[int, int]:
    """Commit every shard; a doc_id seen more than once in the source fails (all its copies).

    Rows staged by write attempts not in ``attempts`` (a task Ray ran again) are dropped first.
    Before each shard's commit the run checks that it still holds the db's writer lock.

    Returns:
        How many staged documents were failed here instead of ingested, and how many rows were
        committed (the embedded chunks of failed copies are not written).
    """
    dropped = committed = 0
    shards = store.open_shards(staging.db)
    for shard in range(staging.manifest.shards):
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
