"""The embedding stage: a callable class that loads the model once per actor and embeds batches."""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pipelines import models
from pipelines.embedding import backends, batching
from pipelines.embedding.backends import resolve_device, resolve_dtype
from pipelines.models import embed_input

logger = logging.getLogger(__name__)


RECENT_ROWS = 32_768  # vectors an actor remembers (~50 MB at 384-d): more than a cache writer holds back


class Embedder:
    """Adds a normalized ``vector`` column to chunk rows whose status is "ok".

    Rows are looked up in the embedding cache first; the rest are sorted by length and embedded in
    forward passes of at most ``token_budget.value`` padded tokens. A pass that runs out of memory
    is split in halves and retried, and the budget shrinks. One ``embed_stats`` JSON value per
    batch (cache hits, rows computed, budget decisions) travels to the write stage for the report.

    Args:
        model: a model id or path (see models.resolve_model).
        dtype: auto, fp32, bf16, fp16 or int8 (int8 needs ``int8_model``).
        device: auto, cpu or cuda.
        cpu_threads: threads for the forward pass on a CPU; default all cores of the node.
        int8_model: directory of the quantized model (backends.quantize).
        openvino_model: an fp32 OpenVINO export (backends.openvino_fp32_model; a directory, its bytes
            or a Ray reference to them): fp32 or bf16 on a CPU then run on OpenVINO instead of torch.
        openvino_streams: more than 1 runs an OpenVINO model for throughput: the passes of a batch
            are spread over that many inference streams.
        batch_tokens: the starting token budget per forward pass.
        min_batch_tokens, max_batch_tokens: bounds of the budget (max None: the device's default,
            see batching.max_tokens).
        adapt_batch: grow/shrink the budget from measured throughput (else only OOM shrinks it).
        cache_db: db dir whose embedding cache to use; None for no cache.
        cache_writer: the run's embed_cache.CacheWriter handle, which appends in large batches;
            None to append each batch's new vectors here.
        encode_batch_size: rows per pass when ``encode`` is called directly (queries, benchmarks).
        preload: start loading the model at once, in a thread (the pipeline's actors do).
    """

    def __init__(
        self,
        *,
        model: str,
        dtype: str = "auto",
        device: str = "auto",
        cpu_threads: int | None = None,
        int8_model: str | None = None,
        openvino_model: Any = None,
        openvino_streams: int = 1,
        batch_tokens: int = 8192,
        min_batch_tokens: int = 256,
        max_batch_tokens: int | None = None,
        adapt_batch: bool = True,
        cache_db: str | None = None,
        cache_writer: Any = None,
        encode_batch_size: int = 32,
        preload: bool = False,
        static_lengths: tuple[int, ...] = (),
    ):
        # Set where a logical GPU stood in for a real one; the run report says so (actor_devices).
        self.logical_gpu = False
        if device == "cuda":
            if os.environ.get("EMBEDPIPE_LOGICAL_GPUS") == "1":
                # Tests on machines without GPUs: Ray's logical GPUs, CPU compute (fp16 needs a GPU).
                device, dtype = "cpu", "fp32" if dtype == "fp16" else dtype
                self.logical_gpu = True
            else:
                backends.require_cuda("this embedder was given a GPU (device cuda)")
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device, int8_ok=int8_model is not None)
        # Ray sets OMP_NUM_THREADS to the actor's logical CPUs (1); the forward pass is the one
        # stage that can use every core, and the others mostly wait on it.
        threads = (cpu_threads or os.cpu_count() or 1) if self.device == "cpu" else None
        # Loaded on first use (a batch of unchanged or cached rows never needs it), or with ``preload``
        # in a thread from the start, while the actor's first batch is read and chunked.
        self._load = functools.partial(
            backends.load_backend,
            model,
            device=self.device,
            dtype=self.dtype,
            threads=threads,
            int8_model=int8_model,
            openvino_model=openvino_model,
            streams=openvino_streams if self.device == "cpu" else 1,
            static_lengths=static_lengths,
        )
        self._backend: backends.TorchBackend | backends.OpenVINOBackend | None = None
        self._loading: Any = None
        if preload:
            from concurrent.futures import ThreadPoolExecutor

            self._loading = ThreadPoolExecutor(1, thread_name_prefix="embed-load").submit(self._load_compiled)
        self.dim = embedding_dim(model)
        self.encode_batch_size = encode_batch_size
        free = batching.cuda_free_fraction if self.device == "cuda" else batching.host_free_fraction
        self.budget = batching.TokenBudget(
            initial=batch_tokens,
            minimum=min_batch_tokens,
            maximum=batching.max_tokens(max_batch_tokens, device=self.device, initial=batch_tokens),
            adapt=adapt_batch,
            free_memory=free,
        )
        self.cache = None
        if cache_db:  # imported here: a process that embeds only queries needs neither Ray nor the table
            from pipelines.embedding import cache as embed_cache

            self.cache = embed_cache.EmbeddingCache(cache_db, self.dim)
        self.cache_writer = cache_writer  # an embed_cache.CacheWriter; None: write in place
        self._recent: dict[str, np.ndarray] = {}  # key -> vector, the last RECENT_ROWS computed here
        self.namespace = backends.model_key(model, self.dtype)
        self._events_sent = 0
        self._sized = False  # the budget sized from a measured pass (GPU only)
        self._preparer: Any = None  # the thread that pads the next pass while one runs

    @property
    def backend(self) -> backends.TorchBackend | backends.OpenVINOBackend:
        if self._backend is None:
            self._backend = self._loading.result() if self._loading is not None else self._load()
            if self._backend.dim != self.dim:
                raise ValueError(f"model gives {self._backend.dim}-d vectors, expected {self.dim}")
        return self._backend

    def _cache_keys(self, inputs: list[str]) -> list[str]:
        if self.cache is None:
            return []
        from pipelines.embedding.cache import keys

        return keys(self.namespace, inputs)

    def _load_compiled(self) -> backends.TorchBackend | backends.OpenVINOBackend:
        """The backend with every model it may run compiled (OpenVINO compiles on first use otherwise):
        a pipeline actor preloads it while its first batch is read and chunked."""
        backend = self._load()
        getattr(backend, "compile_all", lambda: None)()
        return backend

    def warm_up(self) -> None:
        """Load and compile everything a query may run, and run one, so that no later call waits (a
        service's replica at start; `embedpipe query` skips this and compiles only what it uses)."""
        getattr(self.backend, "compile_all", lambda: None)()
        self.encode(["warm up"])

    def encode(self, texts: list[str]) -> np.ndarray:
        """Unit-length float32 vectors, one row per text, in passes of ``encode_batch_size``."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for start in range(0, len(order), self.encode_batch_size):
            rows = order[start : start + self.encode_batch_size]
            out[rows] = self.backend.encode([texts[i] for i in rows])
        return out

    def embed(
        self, texts: list[str], lengths: list[int], ids: list[Any] | None = None
    ) -> tuple[np.ndarray, dict[str, int]]:
        """Embed texts in token-budget passes; ``lengths`` are their token counts, ``ids`` their
        token ids when the chunker made them (the passes then skip tokenizing).

        Returns:
            The vectors, and counts: passes, padded tokens, OOM splits.
        """
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        stats = {"passes": 0, "padded_tokens": 0, "oom_splits": 0, "busy_s": 0.0}
        if not texts:
            return out, stats  # nothing to embed: the model is not even loaded
        order = sorted(range(len(texts)), key=lambda i: lengths[i])
        if ids is not None and getattr(self.backend, "streams", 1) > 1:
            self._run_streams(order, lengths, ids, out, stats)
            return out, stats
        prefetch = ids is not None and hasattr(self.backend, "prepare_ids")

        def next_part(start: int) -> list[int]:  # cut with the budget as it stands now
            return order[start : batching.group_end(order, lengths, start, self.budget.value)]

        part = next_part(0) if order else []
        ready = self._prepare(part, ids) if prefetch else None
        start = 0
        while part:
            start += len(part)
            following = next_part(start) if start < len(order) else []
            # The next pass is padded (and pinned) in a thread while this one runs: a GPU waits
            # for no host work between passes.
            upcoming = self._prepare(following, ids) if prefetch and following else None
            self._run(part, texts, lengths, out, stats, ids, prepared=ready.result() if ready else None)
            part, ready = following, upcoming
        return out, stats

    def _run_streams(
        self, order: list[int], lengths: list[int], ids: list[Any], out: np.ndarray, stats: dict
    ) -> None:
        """Every pass of the batch at once, over the backend's inference streams (OpenVINO's
        throughput mode; a CPU has no out-of-memory to split on)."""
        parts, start = [], 0
        while start < len(order):
            end = batching.group_end(order, lengths, start, self.budget.value)
            parts.append(order[start:end])
            start = end
        started = time.perf_counter()
        results = self.backend.run_many([self.backend.prepare_ids([ids[i] for i in part]) for part in parts])
        seconds = time.perf_counter() - started
        padded_all = sum(len(part) * max(lengths[i] for i in part) for part in parts)
        for part, vectors in zip(parts, results, strict=True):
            out[part] = vectors
            padded = len(part) * max(lengths[i] for i in part)
            stats["passes"] += 1
            stats["padded_tokens"] += padded
            # The passes overlap: each gets the share of the wall time its padded tokens took.
            self.budget.observe(
                tokens=sum(lengths[i] for i in part), padded=padded, seconds=seconds * padded / padded_all
            )
        stats["busy_s"] += seconds

    def _prepare(self, part: list[int], ids: list[list[int]]) -> Any:
        if self._preparer is None:
            from concurrent.futures import ThreadPoolExecutor

            self._preparer = ThreadPoolExecutor(1, thread_name_prefix="embed-prepare")
        return self._preparer.submit(self.backend.prepare_ids, [ids[i] for i in part])

    def _run(
        self,
        rows: list[int],
        texts: list[str],
        lengths: list[int],
        out: np.ndarray,
        stats: dict,
        ids: list[list[int]] | None = None,
        prepared: Any = None,
    ) -> None:
        """One forward pass over ``rows`` (``prepared``: its inputs, padded already); out of memory,
        the pass is split in halves, and the halves run again (a single row that does not fit
        raises)."""
        pending = [rows]
        while pending:
            part = pending.pop()
            padded = len(part) * max(lengths[i] for i in part)
            started = time.perf_counter()
            measure = self.device == "cuda" and not self._sized
            baseline = _cuda_peak_reset() if measure else 0
            ready = prepared if part is rows else None  # halves of a split are prepared anew
            vectors = self._pass(
                [texts[i] for i in part], [ids[i] for i in part] if ids else None, prepared=ready
            )
            if measure and vectors is not None:
                # The first pass on a GPU tells what a padded token costs; the budget follows from
                # the free memory, not from a guess that only out-of-memory errors could correct.
                self._sized = True
                used = _cuda_peak() - baseline
                self.budget.size_from_memory(
                    bytes_per_token=used / padded, free_bytes=batching.cuda_free_bytes()[0]
                )
            if vectors is None:
                # Out of memory, and outside the except block now: the failed pass's traceback (and
                # the tensors its frames hold) is gone, so freeing the cache frees them too.
                logger.warning(
                    "out of memory embedding %d rows (%d padded tokens); splitting", len(part), padded
                )
                self.backend.free_memory()
                stats["oom_splits"] += 1
                self.budget.shrink("out of memory", below=padded)
                half = len(part) // 2
                pending += [part[half:], part[:half]]
                continue
            out[part] = vectors
            seconds = time.perf_counter() - started
            stats["passes"] += 1
            stats["padded_tokens"] += padded
            # Busy: the device's own time where it is measured (CUDA events), else the pass's.
            device_s = getattr(self.backend, "last_device_s", None)
            stats["busy_s"] += device_s if device_s is not None else seconds
            self.budget.observe(tokens=sum(lengths[i] for i in part), padded=padded, seconds=seconds)

    def _pass(
        self, texts: list[str], ids: list[list[int]] | None = None, prepared: Any = None
    ) -> np.ndarray | None:
        """The vectors of one forward pass, or None if it ran out of memory with more than one row."""
        try:
            if prepared is not None:
                return self.backend.run_prepared(prepared)
            if ids is not None and hasattr(self.backend, "encode_ids"):
                return self.backend.encode_ids(ids)
            return self.backend.encode(texts)
        except Exception as exc:
            if not batching.is_out_of_memory(exc) or len(texts) == 1:
                raise
        return None

    def __call__(self, batch: pa.Table) -> pa.Table:
        called = time.time()
        status = batch.column("status").to_pylist()
        todo = [i for i, s in enumerate(status) if s == "ok"]
        titles, texts = batch.column("title").to_pylist(), batch.column("text").to_pylist()
        n_tokens = batch.column("n_tokens").to_pylist()
        inputs = [embed_input(titles[i], texts[i]) for i in todo]
        vectors = np.zeros((len(todo), self.dim), dtype=np.float32)
        keys = self._cache_keys(inputs)
        # What this actor computed lately first: the writer may not have appended it yet.
        hits = {k: self._recent[k] for k in keys if k in self._recent}
        if self.cache:
            hits |= self.cache.lookup([k for k in keys if k not in hits])
        # Each distinct text not in the cache is embedded once, however many rows share it.
        first: dict[str, int] = {}
        misses: list[int] = []
        for j, text in enumerate(inputs):
            key = keys[j] if keys else text
            if key in hits:
                vectors[j] = hits[key]
            elif key not in first:
                first[key] = j
                misses.append(j)
        ids = _token_ids(batch, [todo[j] for j in misses])
        computed, stats = self.embed([inputs[j] for j in misses], [n_tokens[todo[j]] for j in misses], ids)
        vectors[misses] = computed
        for j, text in enumerate(inputs):
            key = keys[j] if keys else text
            if key not in hits and first[key] != j:
                vectors[j] = vectors[first[key]]
        if self.cache and misses:
            if self.cache_writer is not None:  # sent before the batch moves on: see CacheWriter.finish
                self.cache_writer.add.remote([keys[j] for j in misses], computed)
                for j, vector in zip(misses, computed, strict=True):
                    self._recent[keys[j]] = vector
                while len(self._recent) > RECENT_ROWS:
                    self._recent.pop(next(iter(self._recent)))  # the oldest
            else:
                self.cache.store([keys[j] for j in misses], computed)
        events = self.budget.events[self._events_sent :]
        self._events_sent = len(self.budget.events)
        summary = {
            **stats,
            "rows": len(todo),
            "computed": len(misses),
            "cache_hits": len(todo) - len(misses),
            "tokens_computed": int(sum(n_tokens[todo[j]] for j in misses)),
            "events": events,
            "actor": os.getpid(),
            "called_at": called,
            "returned_at": time.time(),
            "device": self.device,
            "dtype": self.dtype,
            "logical_gpu": self.logical_gpu,
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        }
        info = [json.dumps(summary)] + [None] * (batch.num_rows - 1)
        if "input_ids" in batch.column_names:
            batch = batch.drop_columns(["input_ids"])  # the write stage needs them no more
        return batch.append_column(
            "vector", vector_array(vectors, todo, len(status), self.dim)
        ).append_column("embed_stats", pa.array(info, pa.string()))


def _token_ids(batch: pa.Table, rows: list[int]) -> list[np.ndarray] | None:
    """The chunker's token ids of ``rows`` as views into one Arrow buffer (no Python int lists on
    the actor's hot path); None when the batch carries none for some row."""
    if "input_ids" not in batch.column_names or not rows:
        return None
    column = batch.column("input_ids").combine_chunks()
    if column.null_count and any(not column[i].is_valid for i in rows):
        return None
    offsets = column.offsets.to_numpy()
    values = column.values.to_numpy()
    return [values[offsets[i] : offsets[i + 1]] for i in rows]


def _cuda_peak_reset() -> int:
    import torch

    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def _cuda_peak() -> int:
    import torch

    return torch.cuda.max_memory_allocated()


def autoscaler_gpus(path: str | Path | None = None) -> float:
    """GPUs the cluster can grow to, from the autoscaler's node types: the head's plus each worker
    type's GPUs times its max_workers. The cluster launcher writes that config to
    ~/ray_bootstrap_config.yaml on the head, where submitted jobs run; EMBEDPIPE_AUTOSCALER_CONFIG
    names another file. 0 when there is none (a fixed cluster, or a laptop)."""
    import yaml

    path = Path(
        path or os.environ.get("EMBEDPIPE_AUTOSCALER_CONFIG") or Path.home() / "ray_bootstrap_config.yaml"
    )
    try:
        config = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return 0.0
    head = config.get("head_node_type")
    total = 0.0
    for name, node_type in (config.get("available_node_types") or {}).items():
        gpus = float((node_type.get("resources") or {}).get("GPU", 0))
        total += gpus * (1 if name == head else int(node_type.get("max_workers", 0)))
    return total


def vector_array(vectors: np.ndarray, rows: list[int], n: int, dim: int) -> pa.Array:
    """A fixed-size-list column with ``vectors`` at ``rows`` and nulls elsewhere."""
    full = np.zeros((n, dim), dtype=np.float32)
    valid = np.zeros(n, dtype=bool)
    if rows:
        full[rows] = vectors
        valid[rows] = True
    values = pa.array(full.reshape(-1), type=pa.float32())
    mask = None if valid.all() else pa.array(~valid)
    return pa.FixedSizeListArray.from_arrays(values, dim, mask=mask)


def embedding_dim(model: str) -> int:
    """The model's output size, read from its config without loading the weights when possible."""
    import json
    from pathlib import Path

    path = Path(models.resolve_model(model))
    pooling = path / "1_Pooling" / "config.json"
    if pooling.exists():
        dim = json.loads(pooling.read_text()).get("word_embedding_dimension")
        if dim:
            return int(dim)
    return backends.TorchBackend(model, device="cpu", dtype="fp32").dim


def actor_options(
    *,
    cluster_gpus: float,
    gpus_per_actor: float | None,
    min_actors: int,
    max_actors: int | None,
    possible_gpus: float = 0.0,
    device: str = "auto",
    dtype: str = "auto",
) -> dict[str, Any]:
    """Ray resources and pool bounds for the embedding actors.

    Args:
        cluster_gpus: GPUs up now.
        gpus_per_actor: the config's choice; None: 1 on a GPU run, else 0.
        min_actors, max_actors: the config's pool bounds; ``max_actors`` None: one actor per GPU the
            cluster has or can grow to, else ``min_actors``.
        possible_gpus: GPUs the cluster can grow to (``autoscaler_gpus``): an autoscaling cluster
            whose GPU nodes start at 0 still gets a pool as large as its GPU node types allow.
        device: the config's device: ``cuda`` asks for GPUs even when none is up yet (the autoscaler
            starts nodes for the pending actors); ``auto`` asks when the cluster has or can have GPUs.
        dtype: the config's dtype (int8 runs on CPUs only).
    """
    wants_gpu = dtype != "int8" and (
        device == "cuda" or (device == "auto" and max(cluster_gpus, possible_gpus) >= 1)
    )
    gpus = gpus_per_actor if gpus_per_actor is not None else (1.0 if wants_gpu else 0.0)
    if gpus and (device == "cpu" or dtype == "int8"):
        raise ValueError(
            f"embedding.gpus_per_actor={gpus} with device={device!r}, dtype={dtype!r}: CPU embedding "
            "takes no GPU. Drop gpus_per_actor, or use device cuda/auto with fp16/bf16/fp32."
        )
    if max_actors is None:
        max_actors = max(min_actors, int(max(cluster_gpus, possible_gpus) // gpus)) if gpus else min_actors
    # A GPU actor's CPU share is left to Ray's default: Ray Data warns when a map stage sets both.
    options: dict[str, Any] = {"num_gpus": gpus, "min_size": min_actors, "max_size": max_actors}
    if not gpus:
        options["num_cpus"] = 1
    return options
