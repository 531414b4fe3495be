"""Which precision and engine embed fastest on this CPU, measured once per machine and model.

``dtype: auto`` on a CPU asks here. Each candidate the CPU can run (int8 on OpenVINO where the CPU
has VNNI or AMX; bf16 on OpenVINO and on torch where it has AVX512-BF16 or AMX; fp32 on both) embeds
the same length-sorted, tokenized sample in the pipeline's own way (token-budget passes, OpenVINO in
throughput mode), and its vectors are compared with torch fp32's. The fastest candidate whose vectors
stay close to fp32 (mean cosine >= 0.995, every one >= 0.98: int8 MiniLM measures ~0.997) wins. The
result is kept as JSON under the model cache, keyed by the CPU, the model's weights and the library
versions, so the measurement runs once (~20 s).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import time
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np

from pipelines import NOTICE, models
from pipelines.embedding import backends, batching

logger = logging.getLogger(__name__)

MIN_MEAN_COSINE = 0.995
MIN_COSINE = 0.98
BUDGET_TOKENS = 8192  # padded tokens per pass while measuring, the pipeline's starting budget


def candidates(*, int8: bool, openvino: bool) -> list[tuple[str, str]]:
    """(dtype, engine) pairs this CPU runs natively. ``int8``: a quantized model is at hand."""
    found = [("fp32", "torch")]
    if openvino:
        found.append(("fp32", "openvino"))
    if backends.cpu_has_native_bf16():
        found.append(("bf16", "torch"))
        if openvino:
            found.append(("bf16", "openvino"))
    if int8 and openvino and backends.cpu_has_int8_dot():
        found.append(("int8", "openvino"))
    return found


def choose(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The fastest result whose vectors pass the fidelity bar (fp32 on torch always does)."""
    passing = [r for r in results if r["mean_cosine"] >= MIN_MEAN_COSINE and r["min_cosine"] >= MIN_COSINE]
    if not passing:
        raise ValueError("no candidate reproduced fp32's vectors; this is a bug: fp32 always should")
    return max(passing, key=lambda r: r["tokens_per_s"])


def cpu_signature() -> dict[str, Any]:
    """What decides the winner: the CPU model, its vector and matrix extensions, the cores."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                name = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    except OSError:
        pass
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_bf16", "amx_int8")
    return {"cpu": name, "flags": sorted(f for f in wanted if f in flags), "cores": os.cpu_count()}


def _versions() -> dict[str, str]:
    found = {}
    for package in ("torch", "openvino"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "-"
    return found


def cached_choice(
    model: str,
    *,
    texts: list[str] | Callable[[], list[str]],
    int8_files: Any = None,
    threads: int | None = None,
    streams: int = 2,
    dtypes: tuple[str, ...] | None = None,
    engines: tuple[str, ...] | None = None,
    root: Path | None = None,
) -> dict[str, Any] | None:
    """The measured choice for ``model`` on this CPU, from the cache or measured now.

    Args:
        model: the embedding model.
        texts: a sample of what will be embedded (chunk texts; a few hundred are plenty), or a
            function that gives it, called only when there is something to measure.
        int8_files: the quantized model (directory or ``read_int8`` bytes); None leaves int8 out.
        threads: inference threads; default every core.
        streams: OpenVINO inference streams, as the pipeline runs it.
        dtypes, engines: only these (torch fp32, the reference, is always measured).
        root: the model cache (backends.cache_root()).

    Returns:
        {"dtype", "engine", "tokens_per_s", "results": every candidate's figures, "signature"}, or
        None when nothing was cached and the sample has under 16 texts.
    """
    openvino = backends.openvino_available()
    pairs = [
        (dtype, engine)
        for dtype, engine in candidates(int8=int8_files is not None, openvino=openvino)
        if (dtype, engine) == ("fp32", "torch")
        or ((dtypes is None or dtype in dtypes) and (engines is None or engine in engines))
    ]
    key = {
        "signature": cpu_signature(),
        "model": backends.model_key(model, "any"),
        "int8": _int8_id(int8_files),
        "candidates": pairs,
        "versions": _versions(),
        "streams": streams,
    }

    def measured() -> dict[str, Any] | None:
        sample = texts() if callable(texts) else texts
        if len(sample) < 16:
            return None
        logger.log(NOTICE, "measuring which precision embeds fastest on this CPU (once): %s", ", ".join(
            f"{d} on {e}" for d, e in pairs
        ))  # fmt: skip
        results = measure(
            model, texts=sample, pairs=pairs, int8_files=int8_files, threads=threads, streams=streams
        )
        best = choose(results)
        return {**{k: best[k] for k in ("dtype", "engine", "tokens_per_s")}, "results": results, **key}

    return kept_once(root or backends.cache_root(), "autotune", key, measured)


def kept_once(
    root: Path, kind: str, key: dict[str, Any], measured: Callable[[], dict[str, Any] | None]
) -> dict[str, Any] | None:
    """A measurement made once per machine and kept as JSON under ``root/kind``, found by ``key``
    (the CPU, the model, the versions...): read when kept, else ``measured()`` and kept, the first
    process to keep one winning (an atomic link, never over another's), so that every process of
    the machine decides alike. None (nothing kept) when ``measured`` gives None; where nothing can
    be written, this process's own measurement."""
    digest = hashlib.blake2b(json.dumps(key, sort_keys=True).encode(), digest_size=8).hexdigest()
    path = root / kind / f"{digest}.json"

    def read() -> dict[str, Any] | None:
        with contextlib.suppress(OSError, ValueError):  # absent, or torn: measure again
            return json.loads(path.read_text())
        return None

    found = read()
    if found is not None:
        return found
    value = measured()
    if value is None:
        return None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        scratch = path.with_suffix(f".{os.getpid()}.tmp")
        scratch.write_text(json.dumps(value, indent=2))
        with contextlib.suppress(FileExistsError):
            os.link(scratch, path)
        scratch.unlink()
    except OSError:
        return value
    return read() or value  # as a later run reads it


def _int8_id(int8_files: Any) -> str | None:
    if int8_files is None:
        return None
    if isinstance(int8_files, dict):
        return hashlib.blake2b(int8_files["bin"][: 1 << 20], digest_size=8).hexdigest()
    return str(int8_files)


def measure(
    model: str,
    *,
    texts: list[str],
    pairs: list[tuple[str, str]],
    int8_files: Any = None,
    threads: int | None = None,
    streams: int = 2,
    seconds_each: float = 2.0,
    root: Path | None = None,
) -> list[dict[str, Any]]:
    """Tokens/s and fidelity to torch fp32 of each (dtype, engine) pair on ``texts``."""
    tokenizer = models.load_embedding_tokenizer(model)  # as the chunker hands ids on
    ids = [np.asarray(e.ids, dtype=np.int64) for e in tokenizer.encode_batch(texts)]
    lengths = [len(row) for row in ids]
    order = sorted(range(len(ids)), key=lambda i: lengths[i])
    parts, start = [], 0
    while start < len(order):
        end = batching.group_end(order, lengths, start, BUDGET_TOKENS)
        parts.append(order[start:end])
        start = end
    fp32_export = None
    if any(engine == "openvino" and dtype != "int8" for dtype, engine in pairs):
        fp32_export = backends.openvino_fp32_model(model, root)
    reference: np.ndarray | None = None
    results = []
    for dtype, engine in pairs:
        backend = backends.load_backend(
            model,
            device="cpu",
            dtype=dtype,
            threads=threads or os.cpu_count(),
            int8_model=int8_files if dtype == "int8" else None,
            openvino_model=fp32_export if engine == "openvino" and dtype != "int8" else None,
            streams=streams if engine == "openvino" else 1,
        )
        prepared = [backend.prepare_ids([ids[i] for i in part]) for part in parts]
        vectors = np.zeros((len(ids), backend.dim), dtype=np.float32)
        run = getattr(backend, "run_many", None) or (lambda ps, b=backend: [b.run_prepared(p) for p in ps])
        run(prepared[-1:])  # warm-up: the longest pass
        tokens, started, rounds = 0, time.perf_counter(), 0
        while rounds == 0 or time.perf_counter() - started < seconds_each:
            out = run(prepared)
            if rounds == 0:
                for part, rows in zip(parts, out, strict=True):
                    vectors[part] = rows
            tokens += sum(lengths)
            rounds += 1
        seconds = time.perf_counter() - started
        if reference is None:
            reference = vectors  # torch fp32 comes first
        cosines = np.sum(vectors * reference, axis=1)
        results.append(
            {
                "dtype": dtype,
                "engine": engine,
                "tokens_per_s": round(tokens / seconds, 1),
                "mean_cosine": round(float(cosines.mean()), 6),
                "min_cosine": round(float(cosines.min()), 6),
            }
        )
        logger.info("autotune: %s", results[-1])
        del backend
    return results
