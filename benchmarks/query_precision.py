"""Query embedding precisions compared on one db: nDCG@10, recall@10 against fp32 queries, and the time
to embed one query, through the query embedder that Serve and ``embedpipe query`` share.

python benchmarks/query_precision.py ../shared/datasets/scifact --db /tmp/sf-db

Precisions: fp32, and int8 / bf16 where this CPU runs them natively (VNNI or AMX / AVX512-BF16 or
AMX) and, for int8, the quantized model is cached here. Prints one JSON line per precision.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("beir_dir", type=Path)
    parser.add_argument("--db", required=True, type=Path)
    parser.add_argument("--k", type=int, default=10)
    args = parser.parse_args()

    from pipelines import evaluate
    from pipelines.embedding import backends
    from pipelines.search import Searcher, query

    queries, qrels = evaluate.load_beir(args.beir_dir)
    qids = sorted(queries)
    model = Searcher(args.db).manifest.model
    precisions = ["fp32"]
    if backends.cpu_has_int8_dot() and query._int8_model(model) is not None:
        precisions.append("int8")
    if backends.cpu_has_native_bf16():
        precisions.append("bf16")
    top: dict[str, list[list[str]]] = {}
    for precision in precisions:
        searcher = Searcher(args.db, dtype=precision, memory_rows=1_000_000)
        searcher.embed(["warm up"])
        took = []
        for qid in qids:  # one query at a time, as a search service gets them
            started = time.perf_counter()
            searcher.embed([queries[qid]])
            took.append((time.perf_counter() - started) * 1000)
        vectors = searcher.embed([queries[q] for q in qids])
        top[precision] = [
            searcher.search_vector(v, k=args.k)["chunk_id"].to_pylist() for v in vectors
        ]  # fmt: skip
        ndcg = evaluate.score(evaluate.run_local(searcher, queries), qrels)
        recall = statistics.mean(
            len(set(a) & set(b)) / max(1, len(b)) for a, b in zip(top[precision], top["fp32"], strict=True)
        )
        print(json.dumps({
            "precision": precision,
            "ndcg@10": round(ndcg["ndcg@10"], 4),
            f"recall@{args.k}_vs_fp32": round(recall, 4),
            "embed_ms_p50": round(statistics.median(took), 2),
            "queries": len(qids),
        }), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
