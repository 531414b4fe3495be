"""The embedding stage: a callable class that loads the model once per actor and embeds batches."""

from __future__ import annotations

import functools
import logging
import os
from typing import Any

import numpy as np
import pyarrow as pa

from pipelines import models
from pipelines.chunking import embed_input

logger = logging.getLogger(__name__)

_NATIVE_BF16_FLAGS = {"avx512_bf16", "amx_bf16"}


@functools.cache
def cpu_has_native_bf16() -> bool:
    """True on CPUs whose instructions do bf16 math; elsewhere bf16 is emulated and slow.

    Measured on a 2-core AMD EPYC (AVX2, no AVX512): all-MiniLM-L6-v2 ran 16.5 docs/s in fp32 and
    2.8 docs/s in bf16, so "auto" must not pick bf16 there.
    """
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return False
    return bool(_NATIVE_BF16_FLAGS & set(flags.split()))


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        logger.warning("device=cuda was asked for but no CUDA device is visible; using the CPU")
        return "cpu"
    return device


def resolve_dtype(dtype: str, device: str) -> str:
    """Pick fp32/bf16/fp16 for ``auto`` and reject what the device cannot run."""
    if dtype == "auto":
        if device == "cuda":
            return "fp16"
        return "bf16" if cpu_has_native_bf16() else "fp32"
    if dtype == "fp16" and device == "cpu":
        raise ValueError("dtype 'fp16' needs a GPU. Supported on a CPU: auto, fp32, bf16.")
    return dtype


class Embedder:
    """Adds a normalized ``vector`` column to chunk rows whose status is "ok".

    Args:
        model: a model id or path (see models.resolve_model).
        dtype: auto, fp32, bf16 or fp16.
        device: auto, cpu or cuda.
        encode_batch_size: inputs per forward pass.
        cpu_threads: torch threads on a CPU; default all cores of the node.
    """

    def __init__(
        self,
        *,
        model: str,
        dtype: str = "auto",
        device: str = "auto",
        encode_batch_size: int = 32,
        cpu_threads: int | None = None,
    ):
        import torch
        import transformers
        from sentence_transformers import SentenceTransformer

        transformers.logging.disable_progress_bar()  # one bar per actor start is noise in the logs
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        if self.device == "cpu":
            # Ray sets OMP_NUM_THREADS to the actor's logical CPUs (1); the forward pass is the one
            # stage that can use every core, and the others mostly wait on it.
            torch.set_num_threads(cpu_threads or os.cpu_count() or 1)
        torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
        self.model = SentenceTransformer(
            models.resolve_model(model),
            device=self.device,
            model_kwargs={"torch_dtype": torch_dtype[self.dtype]},
        )
        self.model.eval()
        self.dim = self.model.get_embedding_dimension()
        self.encode_batch_size = encode_batch_size

    def encode(self, texts: list[str]) -> np.ndarray:
        """Unit-length float32 vectors, one row per text."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        vectors = self.model.encode(
            texts,
            batch_size=self.encode_batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return np.ascontiguousarray(vectors, dtype=np.float32)

    def __call__(self, batch: pa.Table) -> pa.Table:
        status = batch.column("status").to_pylist()
        todo = [i for i, s in enumerate(status) if s == "ok"]
        titles, texts = batch.column("title").to_pylist(), batch.column("text").to_pylist()
        vectors = self.encode([embed_input(titles[i], texts[i]) for i in todo])
        return batch.append_column("vector", vector_array(vectors, todo, len(status), self.dim))


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
    return Embedder(model=model, device="cpu", dtype="fp32").dim


def actor_options(
    *, cluster_gpus: float, gpus_per_actor: float | None, min_actors: int, max_actors: int | None
) -> dict[str, Any]:
    """Ray resources and pool bounds for the embedding actors on this cluster."""
    gpus = gpus_per_actor if gpus_per_actor is not None else (1.0 if cluster_gpus >= 1 else 0.0)
    if max_actors is None:
        max_actors = max(min_actors, int(cluster_gpus // gpus)) if gpus else min_actors
    # A GPU actor's CPU share is left to Ray's default: Ray Data warns when a map stage sets both.
    options: dict[str, Any] = {"num_gpus": gpus, "min_size": min_actors, "max_size": max_actors}
    if not gpus:
        options["num_cpus"] = 1
    return options
