"""``embedpipe bench``: the pipeline against plain embedding loops, on the same texts, in one run.

Phases, each timed on its own:

- (a) a plain sentence-transformers ``encode`` loop in fp32 over the chunk texts the pipeline embeds,
- (b) the same loop in the pipeline's dtype and engine (batches of 32, tokenized in the loop),
- (c) the full pipeline, read -> chunk -> embed -> write -> commit, into a fresh db, in a Ray started
  beforehand (``ratio_vs_plain_best_with_ray_start`` counts the start too, as a user timing one
  ``embedpipe ingest`` on an embedded Ray sees it),
- (d) the same ingest again on the unchanged corpus (every document skipped).

Besides (a) and (b), a plain loop runs for every other backend the machine runs natively (``plain``:
int8, bf16 and fp32 on OpenVINO and torch, as autotune.candidates lists them), each scored by nDCG@10
of exact search over its own vectors when the source is a BEIR collection; ``ratio_vs_plain_best``
compares (c) with the fastest of them whose nDCG@10 is within 0.005 of fp32's.

The loops exclude loading the model; the pipeline's times are its run reports' wall times, in a Ray
that the bench started beforehand (its start-up is reported on its own, as is the once-per-machine
quantization and backend measurement, ``setup_s``).

On a shared machine one run's ratios move by 10-20% with what else runs: ``run_repeated`` runs the
phases several times in a row (plain loops and pipeline interleaved) and reports each ratio's median
and its spread.
"""

from __future__ import annotations

import json
import math
import platform
import shutil
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from pipelines import models, store
from pipelines.config import Config
from pipelines.embedding import backends

REGRESSION = 0.10  # a figure worse than the baseline by more than this is flagged
PLAIN_BATCH = 32  # sentence-transformers' default batch size


class PeakRSS:
    """Peak resident memory of this process while the block runs (sampled every 50 ms)."""

    def __enter__(self) -> PeakRSS:
        self.peak = psutil.Process().memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        proc = psutil.Process()
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, proc.memory_info().rss)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def mb(self) -> float:
        return round(self.peak / 2**20, 1)


def corpus_of(source: Path) -> tuple[Path, Path | None]:
    """The corpus file to ingest and, for a BEIR directory with qrels, the directory to score."""
    if source.is_dir() and (source / "corpus.jsonl").exists():
        beir = source if (source / "qrels").is_dir() and (source / "queries.jsonl").exists() else None
        return source / "corpus.jsonl", beir
    return source, None


def flops_per_text(model: Any, lengths: list[int]) -> float:
    """Forward-pass FLOPs of a BERT-like encoder over texts of the given token lengths.

    Dense layers cost 2 FLOPs per weight per token; attention adds 4 * layers * hidden * n^2 per text
    (scores and the weighted sum). Embedding look-ups are free.
    """
    transformer = model[0].auto_model
    config = transformer.config
    dense = sum(p.numel() for name, p in transformer.named_parameters() if "embeddings" not in name)
    layers, hidden = int(config.num_hidden_layers), int(config.hidden_size)
    return float(sum(2 * dense * n + 4 * layers * hidden * n * n for n in lengths))


def _read_back(db: Path) -> tuple[list[str], list[int], list[str]]:
    from pipelines.models import embed_input

    texts: list[str] = []
    lengths: list[int] = []
    doc_ids: list[str] = []
    for table in store.open_shards(db).values():
        rows = table.search().select(["doc_id", "title", "text", "n_tokens"]).limit(None).to_arrow()
        texts += [
            embed_input(t, x)
            for t, x in zip(rows["title"].to_pylist(), rows["text"].to_pylist(), strict=True)
        ]
        lengths += rows["n_tokens"].to_pylist()
        doc_ids += rows["doc_id"].to_pylist()
    return texts, lengths, doc_ids


def _plain_fp32(model_name: str, texts: list[str], threads: int) -> tuple[float, float, Any, np.ndarray]:
    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(threads)
    backends.quiet_transformers()
    model = SentenceTransformer(models.resolve_model(model_name), device="cpu")
    model.encode(texts[:PLAIN_BATCH], batch_size=PLAIN_BATCH, show_progress_bar=False)  # warm-up
    with PeakRSS() as rss:
        started = time.perf_counter()
        vectors = model.encode(
            texts, batch_size=PLAIN_BATCH, normalize_embeddings=True, show_progress_bar=False
        )
        seconds = time.perf_counter() - started
    return seconds, rss.mb, model, np.asarray(vectors, dtype=np.float32)


def _plain_backend(backend: Any, texts: list[str]) -> tuple[float, float, np.ndarray]:
    """A plain loop as a user would write it for this backend: batches of 32 texts, longest first,
    tokenized in the loop; OpenVINO in throughput mode gets a few batches at a time (run_many)."""
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))  # as sentence-transformers does
    batches = [order[start : start + PLAIN_BATCH] for start in range(0, len(order), PLAIN_BATCH)]
    vectors = np.zeros((len(texts), backend.dim), dtype=np.float32)
    streams = getattr(backend, "streams", 1)
    backend.encode([texts[i] for i in batches[0]])  # warm-up
    with PeakRSS() as rss:
        started = time.perf_counter()
        if streams > 1:
            for start in range(0, len(batches), 4 * streams):
                group = batches[start : start + 4 * streams]
                outs = backend.run_many([backend.tokenize([texts[i] for i in b]) for b in group])
                for rows, out in zip(group, outs, strict=True):
                    vectors[rows] = out
        else:
            for rows in batches:
                vectors[rows] = backend.encode([texts[i] for i in rows])
        seconds = time.perf_counter() - started
    return seconds, rss.mb, vectors


def _ndcg_of(
    vectors: np.ndarray, doc_ids: list[str], queries: np.ndarray, qids: list[str], qrels: dict
) -> float:
    """nDCG@10 of exact search over ``vectors`` (a document scores its best chunk)."""
    from pipelines import evaluate

    docs = sorted(set(doc_ids))
    index = {d: i for i, d in enumerate(docs)}
    column = np.array([index[d] for d in doc_ids])
    run = {}
    for start in range(0, len(qids), 64):
        scores = queries[start : start + 64] @ vectors.T
        best = np.full((scores.shape[0], len(docs)), -np.inf, dtype=np.float32)
        for row in range(scores.shape[0]):
            np.maximum.at(best[row], column, scores[row])
        top = np.argsort(-best, axis=1)[:, :100]
        for row, qid in enumerate(qids[start : start + 64]):
            run[qid] = {docs[j]: float(best[row, j]) for j in top[row]}
    return evaluate.score(run, qrels)["ndcg@10"]


def _phase(name: str, seconds: float, docs: int, tokens: int, flops: float, rss_mb: float) -> dict[str, Any]:
    seconds = max(seconds, 1e-9)
    return {
        "phase": name,
        "wall_s": round(seconds, 3),
        "docs_per_s": round(docs / seconds, 2),
        "tokens_per_s": round(tokens / seconds, 1),
        "gflops_per_s": round(flops / seconds / 1e9, 2),
        "peak_rss_mb": rss_mb,
    }


def _fresh_db(db: Path) -> None:
    shutil.rmtree(db, ignore_errors=True)


def run(source: Path, *, workdir: Path, cfg: Config, threads: int | None = None) -> dict[str, Any]:
    """Run the four phases and return every figure (see module docstring).

    Args:
        source: a BEIR directory (corpus.jsonl, queries.jsonl, qrels/) or a corpus file/directory.
        workdir: where the bench db goes (emptied first).
        cfg: the pipeline's config; the bench runs on an embedded Ray unless ray.address is set.
        threads: threads for the plain loops; default every core.
    """
    from pipelines import ingest
    from pipelines.embedding import actor_options, setup
    from pipelines.ray_session import ray_session

    corpus, beir = corpus_of(source)
    threads = threads or psutil.cpu_count() or 1
    db = workdir / "db"
    _fresh_db(db)
    result: dict[str, Any] = {"source": str(source), "machine": _machine()}
    started = time.time()
    with ray_session(cfg.ray):
        result["ray_start_s"] = round(time.time() - started, 2)
        # Quantizing (int8) and measuring the backends (autotune) happen once per machine and are
        # cached; done here, they stay out of (c).
        started = time.time()
        pool = actor_options(
            cluster_gpus=_cluster_gpus(),
            device=cfg.embedding.device,
            dtype=cfg.embedding.dtype,
            gpus_per_actor=cfg.embedding.gpus_per_actor,
            min_actors=1,
            max_actors=1,
        )
        device = "cuda" if pool["num_gpus"] else "cpu"
        setup.choose_backend(ingest.sample(str(corpus.resolve()), cfg), cfg, device=device, stored=None)
        result["setup_s"] = round(time.time() - started, 2)
        report_c = ingest.build(source=corpus, db=db, cfg=cfg)
        report_d = ingest.build(source=corpus, db=db, cfg=cfg)
    texts, lengths, doc_ids = _read_back(db)
    docs = report_c["docs"]["ingested"]
    tokens = int(sum(lengths))
    max_len = models.max_seq_length(cfg.embedding.model)
    used = report_c["backend"]
    dtype, engine, device = used["dtype"], used.get("engine", "torch"), used["device"]
    result.update(dtype=dtype, engine=engine)
    if "autotune" in used and used["autotune"]:
        result["autotune"] = used["autotune"]
    if "int8" in used:
        result["int8_model"] = {"path": used.get("int8_model"), **used["int8"]}
        result["quantize_s"] = used["int8"].get("quantize_s")
    scorer = None
    if beir is not None:
        from pipelines import evaluate
        from pipelines.search import Searcher

        queries, qrels = evaluate.load_beir(beir)
        qids = sorted(queries)
        query_vectors = Searcher(db, index=cfg.index).embed([queries[q] for q in qids])

        def scorer(vectors: np.ndarray) -> float:
            return _ndcg_of(vectors, doc_ids, query_vectors, qids, qrels)

    # Every backend this machine runs natively, each as a plain loop over the same texts.
    seconds_a, rss_a, st_model, vectors_a = _plain_fp32(cfg.embedding.model, texts, threads)
    flops = flops_per_text(st_model, [min(n, max_len) for n in lengths])
    del st_model
    plain = [_plain_row("fp32", "torch", seconds_a, rss_a, tokens, scorer(vectors_a) if scorer else None)]
    if device == "cpu":
        from pipelines.embedding import autotune

        pairs = autotune.candidates(
            int8=used.get("int8_model") is not None, openvino=backends.openvino_available()
        )
    else:
        pairs = [(dtype, engine)]
    for pair_dtype, pair_engine in pairs:
        if (pair_dtype, pair_engine) == ("fp32", "torch") and device == "cpu":
            continue  # that is (a)
        backend = backends.load_backend(
            cfg.embedding.model,
            device=device,
            dtype=pair_dtype,
            threads=threads,
            int8_model=used.get("int8_model") if pair_dtype == "int8" else None,
            openvino_model=(
                backends.openvino_fp32_model(
                    cfg.embedding.model, backends.cache_root(cfg.embedding.model_cache)
                )
                if pair_engine == "openvino" and pair_dtype != "int8"
                else None
            ),
            streams=cfg.embedding.openvino_streams if pair_engine == "openvino" else 1,
        )
        seconds, rss, vectors = _plain_backend(backend, texts)
        del backend
        plain.append(
            _plain_row(pair_dtype, pair_engine, seconds, rss, tokens, scorer(vectors) if scorer else None)
        )
    same = next((r for r in plain if (r["dtype"], r["engine"]) == (dtype, engine)), plain[0])
    fp32_ndcg = plain[0]["ndcg@10"]
    # The best plain loop at fp32's quality: nDCG@10 within 0.005 of fp32 (all rows without qrels).
    fair = [r for r in plain if fp32_ndcg is None or r["ndcg@10"] >= fp32_ndcg - 0.005]
    best = max(fair, key=lambda r: r["tokens_per_s"])
    result["b_is_a"] = same is plain[0]

    phases = {
        "a": _phase("plain sentence-transformers loop, fp32", seconds_a, docs, tokens, flops, rss_a),
        "b": _phase(
            f"plain loop, {dtype} on {engine}" + (" (= a)" if result["b_is_a"] else ""),
            same["wall_s"],
            docs,
            tokens,
            flops,
            same["peak_rss_mb"],
        ),
        "c": _phase(
            "full pipeline (read, chunk, embed, write; Ray already up)",
            report_c["wall_s"],
            docs,
            tokens,
            flops,
            report_c["resources"]["peak_rss_mb"],
        ),
        "d": _phase(
            "re-ingest of the unchanged corpus",
            report_d["wall_s"],
            report_d["docs"]["unchanged"],
            0,
            0.0,
            report_d["resources"]["peak_rss_mb"],
        ),
    }
    seconds_b = same["wall_s"]
    result["plain"] = plain
    result["plain_best"] = {k: best[k] for k in ("dtype", "engine", "tokens_per_s", "ndcg@10")}
    result["ratio_vs_plain_best"] = round(best["wall_s"] / report_c["wall_s"], 3)
    result["ratio_vs_plain_best_with_ray_start"] = round(
        best["wall_s"] / (report_c["wall_s"] + result["ray_start_s"]), 3
    )
    result.update(
        {
            "docs": docs,
            "chunks": len(texts),
            "tokens": tokens,
            "model": models.model_id(cfg.embedding.model),
            "gflop_per_chunk": round(flops / max(len(texts), 1) / 1e9, 4),
            "phases": phases,
            "ratio_vs_plain_fp32": round(seconds_a / report_c["wall_s"], 3),
            "ratio_vs_plain_same_dtype": round(seconds_b / report_c["wall_s"], 3),
            "reingest_speedup": round(report_c["wall_s"] / max(report_d["wall_s"], 1e-9), 2),
            "reingest": {
                "unchanged": report_d["docs"]["unchanged"],
                "embeddings_computed": report_d["embeddings"]["computed"],
            },
            "pipeline": {
                "embeddings": report_c["embeddings"],
                "stages": report_c["stages"],
                "run_id": report_c["run_id"],
                "reingest_run_id": report_d["run_id"],
                "token_budget_final": (report_c["batching"]["timeline"] or [{}])[-1].get("token_budget"),
            },
        }
    )
    if beir is not None:
        from pipelines import evaluate
        from pipelines.search import Searcher

        queries, qrels = evaluate.load_beir(beir)
        ranking = evaluate.run_local(Searcher(db, index=cfg.index), queries)
        result["ndcg@10"] = evaluate.score(ranking, qrels)["ndcg@10"]
    return result


# The ratios a repeated bench reports as medians, with their spread.
RATIOS = (
    "ratio_vs_plain_fp32",
    "ratio_vs_plain_same_dtype",
    "ratio_vs_plain_best",
    "ratio_vs_plain_best_with_ray_start",
    "reingest_speedup",
)


def run_repeated(
    source: Path, *, workdir: Path, cfg: Config, repeat: int = 1, threads: int | None = None
) -> dict[str, Any]:
    """``run`` ``repeat`` times in a row; each ratio is then the median over the runs.

    Returns:
        The figures of the run whose ``ratio_vs_plain_best`` is the median (its phases, loops and
        pipeline details), with every ratio in ``RATIOS`` replaced by its median over the runs;
        ``repeats``, ``spread`` (each ratio's min and max) and ``runs`` (each run's ratios).
    """
    if repeat < 1:
        raise ValueError(f"repeat must be at least 1, got {repeat}")
    runs = [run(source, workdir=workdir, cfg=cfg, threads=threads) for _ in range(repeat)]
    ranked = sorted(runs, key=lambda r: r["ratio_vs_plain_best"])
    result = dict(ranked[(len(ranked) - 1) // 2])
    result["repeats"] = repeat
    result["runs"] = [{key: r[key] for key in (*RATIOS, "ray_start_s")} for r in runs]
    result["spread"] = {key: [min(r[key] for r in runs), max(r[key] for r in runs)] for key in RATIOS}
    for key in RATIOS:
        result[key] = round(float(np.median([r[key] for r in runs])), 3)
    return result


def _plain_row(
    dtype: str, engine: str, seconds: float, rss_mb: float, tokens: int, ndcg: float | None
) -> dict[str, Any]:
    return {
        "dtype": dtype,
        "engine": engine,
        "wall_s": round(seconds, 3),
        "tokens_per_s": round(tokens / max(seconds, 1e-9), 1),
        "peak_rss_mb": rss_mb,
        "ndcg@10": ndcg,
    }


def _cluster_gpus() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0))


def _machine() -> dict[str, Any]:
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": psutil.cpu_count(),
        "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "native_bf16": backends.cpu_has_native_bf16(),
    }


# Figures where bigger is better; a drop of more than REGRESSION against the baseline is flagged.
_COMPARED = (
    "ratio_vs_plain_fp32",
    "ratio_vs_plain_same_dtype",
    "ratio_vs_plain_best",
    "reingest_speedup",
    "ndcg@10",
)


def compare(result: dict[str, Any], baseline: dict[str, Any]) -> list[dict[str, Any]]:
    """Figures that fell more than 10% below the baseline (docs/s per phase, the ratios, nDCG@10)."""
    pairs = [(key, result.get(key), baseline.get(key)) for key in _COMPARED]
    for phase in "abcd":
        pairs.append(
            (
                f"{phase}.docs_per_s",
                result.get("phases", {}).get(phase, {}).get("docs_per_s"),
                baseline.get("phases", {}).get(phase, {}).get("docs_per_s"),
            )
        )
    worse = []
    for key, now, before in pairs:
        if isinstance(now, int | float) and isinstance(before, int | float) and before > 0:
            change = now / before - 1
            if change < -REGRESSION:
                worse.append({"figure": key, "baseline": before, "now": now, "change": round(change, 3)})
    return worse


def table(result: dict[str, Any]):
    from rich.table import Table

    out = Table(
        title=f"embedpipe bench: {result['docs']} docs, {result['chunks']} chunks, "
        f"{result['dtype']} on {result.get('engine', 'torch')}"
    )
    for column in ("phase", "wall s", "docs/s", "tokens/s", "GFLOP/s", "peak RSS MB"):
        out.add_column(column, justify="left" if column == "phase" else "right")
    for key, phase in result["phases"].items():
        out.add_row(
            f"({key}) {phase['phase']}",
            f"{phase['wall_s']:.1f}",
            f"{phase['docs_per_s']:.1f}",
            f"{phase['tokens_per_s']:.0f}",
            f"{phase['gflops_per_s']:.1f}",
            f"{phase['peak_rss_mb']:.0f}",
        )
    return out


def plain_table(result: dict[str, Any]):
    """Every plain loop the machine ran, fastest first, with the nDCG@10 of its vectors."""
    from rich.table import Table

    out = Table(title="plain loops, one per backend")
    for column in ("dtype on engine", "wall s", "tokens/s", "nDCG@10", "peak RSS MB"):
        out.add_column(column, justify="left" if column == "dtype on engine" else "right")
    for row in sorted(result.get("plain", []), key=lambda r: -r["tokens_per_s"]):
        ndcg = row["ndcg@10"]
        out.add_row(
            f"{row['dtype']} on {row['engine']}",
            f"{row['wall_s']:.1f}",
            f"{row['tokens_per_s']:.0f}",
            "-" if ndcg is None else f"{ndcg:.4f}",
            f"{row['peak_rss_mb']:.0f}",
        )
    return out


def ratios_text(result: dict[str, Any]) -> str:
    spread = result.get("spread", {})

    def ratio(key: str, digits: int = 2) -> str:
        low_high = spread.get(key)
        around = f" (runs {low_high[0]:.{digits}f}-{low_high[1]:.{digits}f})" if low_high else ""
        return f"{result[key]:.{digits}f}x{around}"

    repeats = result.get("repeats", 1)
    lines = [f"ratios: the median of {repeats} runs, each run's range after it"] if repeats > 1 else []
    lines += [
        f"(c)/(a) pipeline vs plain fp32 loop: {ratio('ratio_vs_plain_fp32')}",
        f"(c)/(b) pipeline vs plain {result['dtype']} loop: {ratio('ratio_vs_plain_same_dtype')}",
        f"(c) vs the best plain loop ({result['plain_best']['dtype']} on {result['plain_best']['engine']}): "
        f"{ratio('ratio_vs_plain_best')}; with Ray's start: {ratio('ratio_vs_plain_best_with_ray_start')}",
        f"(d)/(c) re-ingest speed-up: {ratio('reingest_speedup', 1)} ({result['reingest']['unchanged']} "
        f"unchanged, {result['reingest']['embeddings_computed']} embedded)",
        f"Ray start {result['ray_start_s']:.1f} s, quantizing/measuring backends {result['setup_s']:.1f} s "
        "(once per machine; neither in (c))",
        f"embedding busy {result['pipeline']['embeddings'].get('busy_fraction') or 0:.0%} "
        "of the actors' time",
    ]
    if "ndcg@10" in result:
        lines.append(f"nDCG@10: {result['ndcg@10']:.4f}")
    return "\n".join(lines)


def write_png(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    phases = result["phases"]
    labels = [f"({k})\n" + textwrap.fill(p["phase"], 26) for k, p in phases.items()]
    values = [p["docs_per_s"] for p in phases.values()]
    fig, ax = plt.subplots(figsize=(10, 5), dpi=120)
    bars = ax.bar(labels, values, color=["#9aa5b1", "#6b7a8c", "#2f6fdd", "#1a9850"])
    ax.set_yscale("log" if max(values) > 20 * max(min(values), 1e-9) else "linear")
    ax.set_ylabel("documents per second")
    ax.bar_label(bars, labels=[f"{v:,.1f}" for v in values])
    ax.set_title(
        f"{result['model']} ({result['dtype']}), {result['docs']} docs: "
        f"(c)/(a) {result['ratio_vs_plain_fp32']:.2f}x, (c)/(b) {result['ratio_vs_plain_same_dtype']:.2f}x, "
        f"(d) {result['reingest_speedup']:.0f}x faster than (c)",
        fontsize=9,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def finite(result: dict[str, Any]) -> bool:
    """Whether every ratio is a finite number (a sanity check for tests and CI)."""
    return all(math.isfinite(float(result[k])) for k in _COMPARED[:4])


def dumps(result: dict[str, Any]) -> str:
    return json.dumps(result, indent=2, default=lambda o: o.item() if isinstance(o, np.generic) else str(o))
