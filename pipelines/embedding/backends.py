"""Model backends: one forward pass over a list of texts, returning unit-length float32 vectors.

- ``TorchBackend``: sentence-transformers on torch, fp32 / bf16 (CPU or GPU) / fp16 (GPU).
- ``OpenVINOBackend``: an int8 OpenVINO model made by ``quantize`` (static post-training
  quantization with NNCF, calibrated on texts of the corpus being embedded). No optimum needed.

Batching is the caller's job (``batching``): ``encode`` embeds exactly the texts it is given in one pass,
so the caller controls padding and memory.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import logging
import os
import re
import shutil
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from pipelines import models

logger = logging.getLogger(__name__)

_NATIVE_BF16_FLAGS = {"avx512_bf16", "amx_bf16"}
DTYPES = ("fp32", "bf16", "fp16", "int8")
# A query model compiles static single-text shapes only where they beat the dynamic model by this
# much, measured at start (OpenVINOBackend._static_pays) on a text near STATIC_PROBE_LENGTH tokens.
STATIC_MIN_GAIN = 1.5
STATIC_PROBE_LENGTH = 32
STATIC_PROBE_ROUNDS = 7
# The dynamic model runs widths rounded up to a multiple of this many tokens (padding is masked), and
# OpenVINO keeps the kernels of at most RUNTIME_CACHE_SHAPES input shapes. Measured on 800 batches of
# 1-16 SciFact queries (2-core AVX-512 EPYC, int8): RSS +850 MB after 400 batches and still growing
# with exact widths and OpenVINO's default 5,000 shapes, +200 MB flat with these, at 35 against 36 ms of
# CPU a batch (a width of 16: 40 ms; a bound alone, 200 shapes: 42 ms and still growing).
DYNAMIC_WIDTH_STEP = 8
RUNTIME_CACHE_SHAPES = 256


@functools.cache
def cpu_has_native_bf16() -> bool:
    """True on CPUs whose instructions do bf16 math; elsewhere bf16 is emulated and slow.

    Measured on a 2-core AMD EPYC (AVX2, no AVX512): all-MiniLM-L6-v2 ran 16.5 docs/s in fp32 and
    2.8 docs/s in bf16, so "auto" must not pick bf16 there.
    """
    return bool(_NATIVE_BF16_FLAGS & _cpu_flags())


_INT8_DOT_FLAGS = {"avx512_vnni", "avx_vnni", "amx_int8"}


@functools.cache
def cpu_has_int8_dot() -> bool:
    """True on CPUs with int8 dot-product instructions (VNNI, AMX), where int8 inference pays.

    Measured on a 2-core AMD EPYC with AVX2 only, SciFact texts, batches of 32: OpenVINO int8 13-15
    docs/s, OpenVINO fp32 15-16, torch fp32 13-15.5 (ONNX Runtime dynamic int8 16.7 against its own
    fp32 12.8): no gain worth a minute of quantizing, so "auto" keeps fp32 on such CPUs.
    """
    return bool(_INT8_DOT_FLAGS & _cpu_flags())


@functools.cache
def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return set(next((line for line in f if line.startswith("flags")), "").split())
    except OSError:
        return set()


@functools.cache
def openvino_available() -> bool:
    """Whether openvino and nncf are installed (found, not imported: nncf alone takes ~2 s)."""
    import importlib.util

    return all(importlib.util.find_spec(name) is not None for name in ("openvino", "nncf"))


@functools.cache
def no_openvino_telemetry() -> None:
    """Keep OpenVINO and NNCF from sending usage telemetry from embedpipe's processes.

    ``import openvino`` sends an event at once (openvino/tools/ovc/__init__.py), and NNCF more: the
    sender forks a process that posts to Google Analytics and keeps a client id under ~/intel, unless
    the user ran ``opt_in_out --opt_out`` (only CI=true turns it off otherwise). Every process that
    imports openvino forked: the driver, each embedding actor, the Serve router; lancedb then warned
    "fork support is experimental" in each. openvino_telemetry has no switch of its own for one
    process, so its singleton is set up here, before openvino is imported, as one that has no
    consent and never re-initializes. Run before any ``import openvino``/``nncf``; harmless if the
    package changes (then nothing is done).
    """
    try:
        from openvino_telemetry import main as telemetry_main
    except ImportError:
        return
    cls = telemetry_main.Telemetry
    slot = "_SingletonMetaClass__single_instance"
    if getattr(cls, slot, None) is not None or not hasattr(cls, slot):
        return  # already made (by an import before this call), or internals we do not know

    class _Silent:
        app_name = "OpenVINO"

    quiet = object.__new__(cls)
    quiet.consent = False  # every send_event/start_session/... checks this first
    quiet.tid = None
    quiet.backend = _Silent()  # app_name matches, so openvino's tools do not re-initialize it
    quiet.sender = None
    quiet.init = lambda *args, **kwargs: None  # nor may any other tool turn consent back on
    quiet.force_shutdown = lambda *args, **kwargs: None
    setattr(cls, slot, quiet)


def resolve_device(device: str) -> str:
    if device == "cpu" or (device == "auto" and not _cuda_may_be_here()):
        return "cpu"
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        logger.warning("device=cuda was asked for but no CUDA device is visible; using the CPU")
        return "cpu"
    return device


def _cuda_may_be_here() -> bool:
    """False where no NVIDIA driver is visible, known without importing torch (~1.4 s and ~220 MB
    in a process that embeds one query); torch decides wherever a driver might be."""
    if os.environ.get("CUDA_VISIBLE_DEVICES") in ("", "-1"):
        return False
    signs = ("/proc/driver/nvidia", "/dev/nvidiactl", "/dev/nvidia0", "/dev/dxg")  # /dev/dxg: WSL2
    return any(Path(sign).exists() for sign in signs)


def require_cuda(why: str) -> None:
    """Raise a clear error when torch cannot see the GPU that ``why`` says this process holds."""
    import torch

    if torch.cuda.is_available():
        return
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "unset")
    raise RuntimeError(
        f"{why}, but torch {torch.__version__} ({build}) sees no CUDA device "
        f"(CUDA_VISIBLE_DEVICES={visible}). Install a CUDA build of torch on GPU nodes "
        "(make TORCH_SPEC=torch, or the pins in cluster.yaml)."
    )


def resolve_dtype(dtype: str, device: str, *, int8_ok: bool = False) -> str:
    """Pick the dtype for ``auto`` and reject what the device cannot run.

    Args:
        dtype: auto, fp32, bf16, fp16 or int8.
        device: cpu or cuda (already resolved).
        int8_ok: whether ``auto`` may pick int8 on a CPU (the ingest driver can quantize first).
    """
    if dtype == "auto":
        if device == "cuda":
            return "fp16"
        if int8_ok and cpu_has_int8_dot() and openvino_available():
            return "int8"
        return "bf16" if cpu_has_native_bf16() else "fp32"
    if dtype == "fp16" and device == "cpu":
        raise ValueError("dtype 'fp16' needs a GPU. Supported on a CPU: auto, fp32, bf16, int8.")
    if dtype == "int8" and not openvino_available():
        raise ValueError("dtype 'int8' needs the openvino and nncf packages: pip install 'embedpipe[int8]'")
    return dtype


@functools.cache
def weights_hash(model: str) -> str:
    """A short hash of the model's files, so caches notice a changed model under the same name."""
    path = Path(models.resolve_model(model))
    digest = hashlib.blake2b(digest_size=8)
    if not path.is_dir():
        digest.update(f"unresolved:{model}".encode())
        return digest.hexdigest()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(path)).encode())
        with file.open("rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()


def model_key(model: str, dtype: str) -> str:
    """Names one set of embeddings: the model, its weights and the numeric format that computed them."""
    return f"{models.model_id(model)}@{weights_hash(model)}/{dtype}"


def cache_root(configured: str | None = None) -> Path:
    """Where quantized models are kept: the config's ``embedding.model_cache``, else $EMBEDPIPE_CACHE,
    else ~/.cache/embedpipe. Only the driver needs it: actors get the model through Ray's object store."""
    if configured:
        return Path(configured).expanduser()
    if os.environ.get("EMBEDPIPE_CACHE"):
        return Path(os.environ["EMBEDPIPE_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "embedpipe"


def _compiled_cache() -> str | None:
    """OpenVINO's cache of compiled models, under ``cache_root()`` (None where it cannot be made)."""
    path = cache_root() / "openvino-compiled"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    return str(path)


def int8_dir(root: str | Path, model: str) -> Path:
    return _model_dir(root, "int8", model)


def openvino_fp32_dir(root: str | Path, model: str) -> Path:
    return _model_dir(root, "openvino-fp32", model)


def _model_dir(root: str | Path, kind: str, model: str) -> Path:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", models.model_id(model)).strip("_")
    return Path(root) / kind / f"{slug}-{weights_hash(model)}"


def read_int8(model_dir: str | Path) -> dict[str, Any]:
    """A quantized model as bytes (about 25 MB for MiniLM), to ship to actors on any node."""
    model_dir = Path(model_dir)
    return {
        "xml": (model_dir / "model.xml").read_bytes(),
        "bin": (model_dir / "model.bin").read_bytes(),
        "meta": json.loads((model_dir / "meta.json").read_text()),
    }


def quiet_transformers() -> None:
    """No weight-loading bars and no config notes from transformers: loading a model is not news."""
    import transformers

    transformers.logging.disable_progress_bar()
    transformers.logging.set_verbosity_error()


class TorchBackend:
    """sentence-transformers on torch; ``encode`` is one forward pass."""

    def __init__(self, model: str, *, device: str, dtype: str, threads: int | None = None):
        import torch
        from sentence_transformers import SentenceTransformer

        quiet_transformers()
        if device == "cpu" and threads:
            torch.set_num_threads(threads)
        torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
        self.model = SentenceTransformer(
            models.resolve_model(model), device=device, model_kwargs={"torch_dtype": torch_dtype}
        )
        self.model.eval()
        self.device, self.dtype = device, dtype
        self.dim = int(self.model.get_embedding_dimension())
        self.pad_id = int(self.model.tokenizer.pad_token_id or 0)
        self.last_device_s: float | None = None

    def encode(self, texts: list[str]) -> np.ndarray:
        import torch

        vectors = self.model.encode(
            texts,
            batch_size=max(len(texts), 1),
            normalize_embeddings=False,
            convert_to_tensor=True,
            show_progress_bar=False,
        )
        # Normalized in fp32 whatever the model ran in: fp16 norms are off by ~1e-3.
        vectors = torch.nn.functional.normalize(vectors.float(), dim=-1)
        return np.ascontiguousarray(vectors.cpu().numpy(), dtype=np.float32)

    def encode_ids(self, ids: list[list[int]]) -> np.ndarray:
        """One forward pass over texts tokenized already (the chunker's ``input_ids``)."""
        return self.run_prepared(self.prepare_ids(ids))

    def prepare_ids(self, ids: list[list[int]]) -> tuple[Any, Any]:
        """The host side of a pass: pad, and on a GPU pin the memory so that the copy can run
        asynchronously. Thread-safe: the embedder prepares the next pass while this one runs."""
        import torch

        input_ids, mask = (torch.from_numpy(a) for a in pad_ids(ids, self.pad_id))
        if self.device == "cuda":
            input_ids, mask = input_ids.pin_memory(), mask.pin_memory()
        return input_ids, mask

    def run_prepared(self, prepared: tuple[Any, Any]) -> np.ndarray:
        """Copy (non-blocking from pinned memory), run, normalize in fp32. On a GPU the pass's device
        time, from CUDA events, is left in ``last_device_s``."""
        import torch

        input_ids, mask = prepared
        timed = self.device == "cuda"
        if timed:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            input_ids = input_ids.to(self.device, non_blocking=True)
            mask = mask.to(self.device, non_blocking=True)
        with torch.inference_mode():
            out = self.model({"input_ids": input_ids, "attention_mask": mask})["sentence_embedding"]
            vectors = torch.nn.functional.normalize(out.float(), dim=-1)
        if timed:
            end.record()
        result = np.ascontiguousarray(vectors.cpu().numpy(), dtype=np.float32)  # waits for the GPU
        if timed:
            self.last_device_s = begin.elapsed_time(end) / 1000
        return result

    def free_memory(self) -> None:
        import gc

        import torch

        if self.device == "cuda":
            gc.collect()  # tensors held by reference cycles (an exception's frames, say) go first
            torch.cuda.empty_cache()


class OpenVINOBackend:
    """An OpenVINO model on the CPU: int8 (quantized), or the fp32 export run in fp32 or bf16;
    tokenization by the model's own fast tokenizer."""

    def __init__(
        self,
        model: str,
        *,
        files: str | Path | dict[str, Any],
        threads: int | None = None,
        precision: str | None = None,
        streams: int = 1,
        static_lengths: tuple[int, ...] = (),
    ):
        """
        Args:
            model: the source model (its tokenizer is used).
            files: the model's directory (``export_openvino``), or ``read_int8`` of it.
            threads: inference threads; default every core.
            precision: for an fp32 export, ``fp32`` (the default) or ``bf16`` (OpenVINO's bf16
                inference precision: AVX512-BF16 or AMX CPUs only). None for an int8 model.
            streams: more than 1 compiles for throughput, with that many inference streams sharing
                ``threads``; ``run_many`` then keeps them all busy (one pass at a time still works).
            static_lengths: also compile the model for one text of each of these lengths: a single
                text is then padded to the next one and run there. OpenVINO pays ~3 ms to switch a
                dynamic model to another input shape and ~20 ms for a new one, more than a short
                query's pass takes (measured on a 2-core EPYC: 5.6 ms a query alternating lengths
                16/32/48/64 dynamically, 1.8 ms on static models); the queries of a search service.
        """
        no_openvino_telemetry()
        import openvino as ov

        if not isinstance(files, dict):
            if not (Path(files) / "model.xml").exists():
                raise FileNotFoundError(f"No OpenVINO model in {files}; run `embedpipe quantize` first")
            files = read_int8(files)
        core = ov.Core()
        weights = ov.Tensor(np.frombuffer(files["bin"], dtype=np.uint8).copy())
        network = core.read_model(model=files["xml"].decode("utf-8"), weights=weights)
        self.model = model
        self.pad_id = models.pad_token_id(model)
        self.max_length = int(files["meta"]["max_seq_length"])
        self.dim = int(files["meta"]["dim"])
        exported_fp32 = files["meta"].get("format") == "openvino-fp32"
        if precision not in (None, "fp32", "bf16") or (precision == "bf16" and not exported_fp32):
            raise ValueError(f"precision {precision!r} needs an fp32 export. Supported: fp32, bf16.")
        self.dtype = (precision or "fp32") if exported_fp32 else "int8"
        threads = threads or os.cpu_count() or 1
        self.streams = max(1, min(streams, threads))
        config: dict[str, Any] = {"INFERENCE_NUM_THREADS": threads}
        # OpenVINO keeps the kernels of each input shape it has run (5,000 by default): under queries
        # of every batch size and length that grew a router by ~850 MB in 400 batches. Widths rounded
        # to DYNAMIC_WIDTH_STEP tokens (``_infer``) and this bound keep it at ~200 MB (backends.py).
        config["CPU_RUNTIME_CACHE_CAPACITY"] = RUNTIME_CACHE_SHAPES
        if self.streams > 1:
            config.update(PERFORMANCE_HINT="THROUGHPUT", NUM_STREAMS=self.streams)
        else:
            config["PERFORMANCE_HINT"] = "LATENCY"
        if exported_fp32:
            # OpenVINO runs an fp32 model in bf16 on CPUs with AVX512-BF16 or AMX unless told not to;
            # the precision is always named, so that a dtype means the same vectors on every CPU.
            config["INFERENCE_PRECISION_HINT"] = "bf16" if self.dtype == "bf16" else "f32"
        compiled_cache = _compiled_cache()
        if compiled_cache is not None:
            # A model compiled once (each static length, each config) loads from here on the next
            # start: a service's replica or a CLI query does not compile it again.
            config["CACHE_DIR"] = compiled_cache
        self._core, self._config, self._files, self._weights = core, config, files, weights
        self._network = network
        # Every model is compiled when first used: `embedpipe query` runs one static model (or only the
        # dynamic one), a service compiles them all at start (``compile_all``).
        self._static: dict[int, Any] = {}  # length -> infer request of a model compiled for [1, length]
        # Single texts up to these lengths run on static models, where they pay on this machine.
        self.static_lengths = tuple(sorted({min(n, self.max_length) for n in static_lengths}))

        def measure() -> bool:
            probe = min(self.static_lengths, key=lambda n: abs(n - STATIC_PROBE_LENGTH))
            return self._static_pays(self._static_request(probe), probe)

        if self.static_lengths and not self._static_choice(files["meta"], measure):
            self.static_lengths, self._static = (), {}
            self._drop_sources(dynamic="compiled" in self.__dict__)
        self.device = "cpu"

    @functools.cached_property
    def compiled(self) -> Any:
        """The dynamic model, compiled on first use (batches, and single texts past the static lengths)."""
        compiled = self._core.compile_model(self._network, "CPU", self._config)
        self._drop_sources(dynamic=True)
        return compiled

    @functools.cached_property
    def request(self) -> Any:
        return self.compiled.create_infer_request()

    @functools.cached_property
    def _queue(self) -> Any:
        import openvino as ov

        return ov.AsyncInferQueue(self.compiled, self.streams) if self.streams > 1 else None

    def _static_request(self, length: int) -> Any:
        if length not in self._static:
            fixed = self._core.read_model(model=self._files["xml"].decode("utf-8"), weights=self._weights)
            fixed.reshape({port.get_any_name(): [1, length] for port in fixed.inputs})
            self._static[length] = self._core.compile_model(fixed, "CPU", self._config).create_infer_request()
            self._drop_sources(dynamic="compiled" in self.__dict__)
        return self._static[length]

    def _drop_sources(self, *, dynamic: bool) -> None:
        # The model's files stay in memory only until every model that may run has been compiled.
        if dynamic and set(self._static) >= set(self.static_lengths):
            self._files = self._weights = self._network = None

    def compile_all(self) -> None:
        """Compile every model now (the dynamic one and each static length), as a service does at start
        so that no query waits for a compilation."""
        _ = self.request
        for length in self.static_lengths:
            self._static_request(length)

    def _static_choice(self, meta: dict[str, Any], measure: Callable[[], bool]) -> bool:
        """Whether single texts run on static models on this machine: measured once (``measure``)
        and kept under ``cache_root()``, the first measurement winning, so that every process here
        (a service's replicas, `embedpipe query`) embeds a query alike: a static and the dynamic
        model can differ in the last bits, enough to swap two near-tied results."""
        from importlib.metadata import version

        from pipelines.embedding import autotune

        key = {
            "cpu": autotune.cpu_signature(), "weights": meta.get("weights_hash"),
            "format": meta.get("format"), "dtype": self.dtype, "openvino": version("openvino"),
        }  # fmt: skip
        kept = autotune.kept_once(cache_root(), "openvino-static", key, lambda: {"static": measure(), **key})
        return bool(kept["static"])

    def _static_pays(self, static: Any, length: int) -> bool:
        """Whether single texts should run on static models, measured here: each costs ~150 MB
        of RSS (its own copy of the repacked weights), and on some CPUs OpenVINO's dynamic model
        is as fast at one text of varying length (a 2-core AVX-512 EPYC: 5.7 ms a query both
        ways), on others ~3x slower (a 2-core AVX2 EPYC: 5.6 ms against 1.8 ms)."""
        varying = [np.full((1, n), self.pad_id, dtype=np.int64) for n in (length // 2, length)]
        mask = [np.ones_like(ids) for ids in varying]
        feed = {"input_ids": varying[1], "attention_mask": mask[1]}

        def dynamic() -> None:
            for ids, m in zip(varying, mask, strict=True):  # alternating shapes, as queries come
                self.request.infer({"input_ids": ids, "attention_mask": m})

        def fixed() -> None:
            static.infer(feed)
            static.infer(feed)

        for run in (dynamic, fixed):
            run()  # warm
        timings = {dynamic: [], fixed: []}
        for _ in range(STATIC_PROBE_ROUNDS):  # interleaved, so that a busy moment hits both
            for run, seen in timings.items():
                started = time.perf_counter()
                run()
                seen.append(time.perf_counter() - started)
        ratio = float(np.median(timings[dynamic]) / np.median(timings[fixed]))
        pays = ratio >= STATIC_MIN_GAIN
        logger.info(
            "OpenVINO dynamic/static time at %d tokens: %.2fx; single texts run on %s",
            length, ratio, "static models" if pays else "the dynamic model",
        )  # fmt: skip
        return pays

    def encode(self, texts: list[str]) -> np.ndarray:
        return self._infer(*self.tokenize(texts))

    def tokenize(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Padded ids and mask of ``texts``, ready for ``run_prepared`` or ``run_many``. The
        tokenizers library alone, as the chunker uses it: transformers would import torch, ~0.2 GB
        more RSS in a process that embeds only queries."""
        encoded = models.load_embedding_tokenizer(self.model).encode_batch(texts)
        return pad_ids([e.ids[: self.max_length] for e in encoded], self.pad_id)

    def encode_ids(self, ids: list[list[int]]) -> np.ndarray:
        """One pass over texts tokenized already (the chunker's ``input_ids``)."""
        return self.run_prepared(self.prepare_ids(ids))

    def prepare_ids(self, ids: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        return pad_ids(ids, self.pad_id)

    def run_prepared(self, prepared: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
        return self._infer(*prepared)

    def run_many(self, prepared: list[tuple[np.ndarray, np.ndarray]]) -> list[np.ndarray]:
        """Several passes at once, spread over the inference streams; results in input order."""
        if self._queue is None or len(prepared) < 2:
            return [self.run_prepared(p) for p in prepared]
        out: list[np.ndarray | None] = [None] * len(prepared)

        def done(request: Any, i: int) -> None:
            out[i] = _unit(np.array(request.get_output_tensor(0).data, dtype=np.float32))

        self._queue.set_callback(done)
        for i, (input_ids, mask) in enumerate(prepared):
            self._queue.start_async({"input_ids": input_ids, "attention_mask": mask}, i)
        self._queue.wait_all()
        return out  # type: ignore[return-value]

    def _infer(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        # Padding is masked: the same vectors at any width. The dynamic model runs widths rounded up to
        # DYNAMIC_WIDTH_STEP (few distinct shapes, see __init__); a single text runs on the smallest
        # static model it fits, a model that never changes shape.
        width = input_ids.shape[1]
        fits = [n for n in self.static_lengths if n >= width] if len(input_ids) == 1 else []
        if fits:
            request, target = self._static_request(fits[0]), fits[0]
        else:
            request = self.request
            target = max(width, min(self.max_length, -(-width // DYNAMIC_WIDTH_STEP) * DYNAMIC_WIDTH_STEP))
        if target > width:
            input_ids = np.pad(input_ids, ((0, 0), (0, target - width)), constant_values=self.pad_id)
            attention_mask = np.pad(attention_mask, ((0, 0), (0, target - width)))
        out = request.infer({"input_ids": input_ids, "attention_mask": attention_mask})
        return _unit(np.asarray(out[0], dtype=np.float32))

    def free_memory(self) -> None:
        pass


def _unit(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return np.ascontiguousarray(vectors / np.maximum(norms, 1e-12))


def pad_ids(ids: list[Any], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Token id sequences (lists or arrays) as one right-padded int64 matrix, and its mask."""
    width = max((len(row) for row in ids), default=0)
    input_ids = np.full((len(ids), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(ids), width), dtype=np.int64)
    for i, row in enumerate(ids):
        input_ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
    return input_ids, mask


def load_backend(
    model: str,
    *,
    device: str,
    dtype: str,
    threads: int | None = None,
    int8_model: Any = None,
    openvino_model: Any = None,
    streams: int = 1,
    static_lengths: tuple[int, ...] = (),
) -> TorchBackend | OpenVINOBackend:
    """The backend for a dtype; int8 needs ``int8_model``. ``openvino_model``, an fp32 export, runs
    fp32 or bf16 on OpenVINO instead of torch. Either model is a directory, ``read_int8`` bytes or
    a Ray object reference to them; ``streams`` > 1 compiles an OpenVINO model for throughput."""
    if openvino_model is not None and dtype in ("fp32", "bf16") and device == "cpu":
        return OpenVINOBackend(
            model, files=_fetched(openvino_model), threads=threads, precision=dtype, streams=streams,
            static_lengths=static_lengths,
        )  # fmt: skip
    if dtype == "int8":
        if int8_model is None:
            raise ValueError("dtype int8 needs a quantized model (see `embedpipe quantize`)")
        return OpenVINOBackend(
            model, files=_fetched(int8_model), threads=threads, streams=streams, static_lengths=static_lengths
        )
    return TorchBackend(model, device=device, dtype=dtype, threads=threads)


def _fetched(files: Any) -> Any:
    if type(files).__name__ == "ObjectRef":
        import ray

        return ray.get(files)
    return files


def quantize(
    model: str, texts: list[str], out_dir: Path, *, batch_size: int = 8, force: bool = False
) -> dict[str, Any]:
    """Convert a sentence-transformers model to OpenVINO and quantize it to int8 with NNCF.

    Static post-training quantization: activation ranges come from embedding ``texts``, which
    should be a sample of the corpus the model will embed (a few hundred chunks is plenty).

    Args:
        model: a model id or path.
        texts: calibration inputs, as the model will read them.
        out_dir: where model.xml/.bin and meta.json go (written atomically).
        batch_size: calibration inputs per forward pass.
        force: quantize again even when out_dir holds a model.

    Returns:
        The model's meta.json: source model, weights hash, calibration size, seconds taken.
    """
    if not texts:
        raise ValueError("quantize needs calibration texts; the corpus gave none")
    return export_openvino(model, out_dir, texts=texts, batch_size=batch_size, force=force)


def openvino_fp32_model(model: str, root: str | Path | None = None) -> Path:
    """The model exported to OpenVINO in fp32, converted once per machine and cached under
    ``cache_root()``. On a CPU it embeds one short query about twice as fast as torch."""
    out_dir = openvino_fp32_dir(root or cache_root(), model)
    export_openvino(model, out_dir)
    return out_dir


def export_openvino(
    model: str,
    out_dir: Path,
    *,
    texts: list[str] | None = None,
    batch_size: int = 8,
    force: bool = False,
) -> dict[str, Any]:
    """Export a sentence-transformers model (mean pooling included) to OpenVINO: fp32, or int8
    quantized with NNCF when calibration ``texts`` are given (see ``quantize``)."""
    out_dir = Path(out_dir)
    if (out_dir / "meta.json").exists() and not force:
        return json.loads((out_dir / "meta.json").read_text())  # before the imports: torch is ~0.2 GB of RSS
    no_openvino_telemetry()
    import openvino as ov
    import torch
    from sentence_transformers import SentenceTransformer

    quiet_transformers()  # a one-time step that is announced already
    started = time.time()
    st = SentenceTransformer(models.resolve_model(model), device="cpu")
    st.eval()

    class _Pooled(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            features = {"input_ids": input_ids, "attention_mask": attention_mask}
            return self.inner(features)["sentence_embedding"]

    max_length = int(st.max_seq_length)
    example = st.tokenizer(
        (texts or ["an example input"])[:2],
        padding=True,
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
    )
    shape = ov.PartialShape([-1, -1])
    with torch.inference_mode(), warnings.catch_warnings():
        # Tracing with fixed example shapes is what the conversion does; its TracerWarnings say so.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", FutureWarning)  # transformers' deprecations met while tracing
        converted = ov.convert_model(
            _Pooled(st),
            example_input={"input_ids": example["input_ids"], "attention_mask": example["attention_mask"]},
            input=[("input_ids", shape, ov.Type.i64), ("attention_mask", shape, ov.Type.i64)],
        )
    meta = {
        "model": models.model_id(model),
        "weights_hash": weights_hash(model),
        "format": "openvino-int8" if texts else "openvino-fp32",
        "max_seq_length": max_length,
        "dim": int(st.get_embedding_dimension()),
    }
    if texts:
        import nncf

        batches = []
        for start in range(0, len(texts), batch_size):
            enc = st.tokenizer(
                texts[start : start + batch_size],
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="np",
            )
            batches.append(
                {
                    "input_ids": enc["input_ids"].astype(np.int64),
                    "attention_mask": enc["attention_mask"].astype(np.int64),
                }
            )
        # NNCF draws its progress bars with rich on standard output, where they would mix with a
        # command's own output (--json); the quantization is announced already, so they go to the log.
        with contextlib.redirect_stdout(io.StringIO()) as bars:
            converted = nncf.quantize(
                converted,
                nncf.Dataset(batches),
                model_type=nncf.ModelType.TRANSFORMER,
                subset_size=len(batches),
            )
        for line in bars.getvalue().splitlines():
            if line.strip():
                logger.info("nncf: %s", line.strip())
        meta["calibration_texts"] = len(texts)
    meta.update(quantize_s=round(time.time() - started, 1), created_at=time.time())
    tmp = out_dir.with_name(out_dir.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    # fp32 stays fp32 (save_model would halve the weights by default); int8 as it always was.
    ov.save_model(converted, str(tmp / "model.xml"), compress_to_fp16=bool(texts))
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    if force and out_dir.exists():
        shutil.rmtree(out_dir)
    try:
        tmp.rename(out_dir)
    except OSError:  # another process wrote it meanwhile: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
        return json.loads((out_dir / "meta.json").read_text())
    logger.info("%s model for %s written to %s in %.1f s", meta["format"], model, out_dir, meta["quantize_s"])
    return meta
