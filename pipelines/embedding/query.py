"""The query embedder: one choice of backend and precision for ``embedpipe query`` and Serve alike, so
that both embed a query into the same vector on every CPU."""

from __future__ import annotations

import logging

from pipelines.embedding import Embedder, backends

logger = logging.getLogger(__name__)

# One query at a time runs on OpenVINO models compiled for these lengths (see OpenVINOBackend), where
# they pay; a longer one on the dynamic model. Each costs ~48 MB of RSS in every process that embeds
# queries (a router replica, `embedpipe query`); 64 tokens hold every SciFact query (p90: 36 tokens).
STATIC_LENGTHS = (16, 32, 48, 64)


def query_precision(*, vectors: str | None, device: str, dtype: str = "auto", model: str) -> str:
    """The precision queries are embedded in.

    ``auto`` follows the documents where this machine runs their precision natively: int8 (the cached
    quantized model, on a CPU with VNNI or AMX) for int8 documents, bf16 (AVX512-BF16 or AMX) for bf16
    documents; else fp32 on a CPU and fp16 on a GPU.

    Args:
        vectors: the precision the db's vectors were computed in (the manifest's ``vectors``).
        device: cpu or cuda (resolved).
        dtype: auto, or the precision to use.
        model: the db's model (its int8 version must be cached for int8 queries).
    """
    if dtype != "auto":
        return dtype
    if device == "cuda":
        return "fp16"
    if vectors == "int8" and backends.cpu_has_int8_dot() and _int8_model(model) is not None:
        return "int8"
    if vectors == "bf16" and backends.cpu_has_native_bf16():
        return "bf16"
    return "fp32"


def query_embedder(
    model: str,
    *,
    vectors: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    engine: str = "auto",
    threads: int | None = None,
) -> Embedder:
    """The embedder for queries of a db (see ``query_precision``).

    On a CPU, fp32 and bf16 run on OpenVINO with the precision named explicitly (OpenVINO would
    otherwise run fp32 as bf16 on AMX CPUs), torch when OpenVINO is not installed or ``engine`` says
    torch; int8 runs the quantized model that ingest cached on this machine.

    Args:
        model: the db's model.
        vectors: the precision of the db's vectors (the manifest's ``vectors``).
        device: auto, cpu or cuda.
        dtype: auto, fp32, bf16, fp16 or int8.
        engine: auto, torch or openvino (CPU fp32/bf16 only).
        threads: CPU threads for a forward pass.
    """
    device = backends.resolve_device(device)
    precision = query_precision(vectors=vectors, device=device, dtype=dtype, model=model)
    if precision == "int8":
        found = _int8_model(model)
        if found is None:
            raise ValueError(
                f"int8 queries need the int8 model of {model} on this machine: run `embedpipe quantize` "
                "or an int8 ingest here first, or ask for fp32."
            )
        return Embedder(
            model=model, device="cpu", dtype="int8", int8_model=str(found), cpu_threads=threads,
            static_lengths=STATIC_LENGTHS,
        )  # fmt: skip
    openvino = engine == "openvino" or (engine == "auto" and backends.openvino_available())
    if device == "cpu" and precision in ("fp32", "bf16") and openvino:
        try:
            exported = backends.openvino_fp32_model(model)
        except Exception:
            if engine == "openvino":
                raise
            logger.exception("OpenVINO export of %s failed; queries are embedded with torch", model)
        else:
            return Embedder(
                model=model, device="cpu", dtype=precision, cpu_threads=threads, openvino_model=str(exported),
                static_lengths=STATIC_LENGTHS,
            )  # fmt: skip
    return Embedder(model=model, device=device, dtype=precision, cpu_threads=threads)


def _int8_model(model: str):
    found = backends.int8_dir(backends.cache_root(), model)
    return found if backends.openvino_available() and (found / "model.xml").exists() else None
