"""How a run embeds: the precision and engine its actors run (quantizing to int8 and measuring the
candidates once per machine), the actor pool, the model files in Ray's object store and the embedding
cache's writer; the Ray Data stage that runs the actors; and the totals of their per-batch stats."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from pipelines import NOTICE, store
from pipelines.config import Config
from pipelines.embedding import autotune, backends
from pipelines.embedding import cache as embed_cache
from pipelines.embedding.actor import Embedder, actor_options, autoscaler_gpus

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Sample:
    """The first texts of a corpus as the model reads them: what int8 is calibrated on and the engines
    are measured on (ingest reads them from the source, reembed from the stored chunks)."""

    name: str  # where they come from, for the log
    texts: Callable[[int], list[str]]  # up to n of them


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
                texts = source.texts(cfg.embedding.calibration_chunks)[: cfg.embedding.calibration_chunks]
                if len(texts) < MIN_CALIBRATION:
                    return None, {
                        "reason": f"int8 needs {MIN_CALIBRATION} chunks to calibrate on and the source has "
                        f"{len(texts)}; using the torch backend for this run"
                    }
                logger.log(
                    NOTICE, "quantizing %s to int8 on %d chunks of %s (once)", model, len(texts),
                    source.name,
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
        texts=lambda: source.texts(256)[:256] if source else [],
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
        try:
            writes = ray.get(self.cache_writer.finish.remote(computed))
        except ray.exceptions.RayActorError as exc:  # its node went away: the cache is only a shortcut
            logger.warning(
                "the embedding cache's writer was lost (%s): this run's embeddings are not all cached, "
                "the next run computes those again",
                str(exc).splitlines()[0],
            )
            return None
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
        # On the driver's node: a run outlives the loss of any other node (Ray restarts its actors and
        # reruns its tasks), and this one writer holds state a restart would lose.
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        cache_writer = embed_cache.CacheWriter.options(scheduling_strategy=here).remote(
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
