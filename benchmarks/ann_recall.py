"""Recall@k of the shards' ANN indexes against exact search, and the latency of each, over BEIR queries.

python benchmarks/ann_recall.py --db DB ../shared/datasets/scifact [--queries 300] [--k 10]

Both searches run through ``Searcher.search_vector`` (the code behind ``embedpipe query`` and each
ShardSearcher); the exact one scans every row (``bypass_vector_index``).
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
    parser.add_argument("beir_dir", type=Path, help="a BEIR collection (its queries are used)")
    parser.add_argument("--db", required=True, type=Path)
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--config", type=Path, default=None, help="YAML config (its index: settings)")
    args = parser.parse_args()

    from pipelines.config import load_config
    from pipelines.evaluate import load_beir
    from pipelines.index import query_params
    from pipelines.search import Searcher

    cfg = load_config(args.config)
    queries, _ = load_beir(args.beir_dir)
    texts = [queries[q] for q in sorted(queries)][: args.queries]
    searcher = Searcher(args.db, index=cfg.index)
    vectors = searcher.embed(texts)
    searcher.search_vector(vectors[0], k=args.k)  # open files, warm caches
    recalls, ann_ms, exact_ms = [], [], []
    for vector in vectors:
        started = time.perf_counter()
        ann = searcher.search_vector(vector, k=args.k)
        ann_ms.append((time.perf_counter() - started) * 1000)
        started = time.perf_counter()
        exact = searcher.search_vector(vector, k=args.k, exact=True)
        exact_ms.append((time.perf_counter() - started) * 1000)
        truth = set(exact["chunk_id"].to_pylist())
        recalls.append(len(truth & set(ann["chunk_id"].to_pylist())) / max(1, len(truth)))
    print(
        json.dumps(
            {
                "queries": len(texts),
                "k": args.k,
                "rows": sum(t.count_rows() for t in searcher.shards.values()),
                "indexes": {
                    name: {
                        "vector_index": ix.vector_kind,
                        "num_partitions": ix.num_partitions,
                        "query_params": query_params(ix, k=args.k, settings=cfg.index),
                    }
                    for name, ix in searcher.indexes.items()
                },
                f"recall@{args.k}": round(statistics.mean(recalls), 4),
                "ann_p50_ms": round(statistics.median(ann_ms), 2),
                "exact_p50_ms": round(statistics.median(exact_ms), 2),
            }
        )
    )


if __name__ == "__main__":
    main()
