"""Recall@k against exact search, and latency, of the two ANN paths over BEIR queries: the shards'
LanceDB indexes (``embedpipe query``) and what Serve searches (``ShardGroup`` with the config's
``serve.memory_rows`` / ``serve.memory_exact_rows``: shards held in memory, through an in-memory IVF
index when large).

python benchmarks/ann_recall.py --db DB ../shared/datasets/scifact [--queries 100] [--k 10]

Exact search scans every row through LanceDB (``bypass_vector_index``). Queries are embedded once, by
the query embedder Serve uses.
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
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--config", type=Path, default=None, help="YAML config (its index: settings)")
    args = parser.parse_args()

    from pipelines.config import load_config
    from pipelines.evaluate import load_beir
    from pipelines.index import query_params
    from pipelines.search import Searcher, ShardGroup, combine

    cfg = load_config(args.config)
    queries, _ = load_beir(args.beir_dir)
    texts = [queries[q] for q in sorted(queries)][: args.queries]
    searcher = Searcher(args.db, index=cfg.index, dtype=cfg.serve.query_dtype)
    vectors = searcher.embed(texts)
    started = time.perf_counter()
    served = ShardGroup(
        str(args.db), refresh_s=float("inf"), index=cfg.index, memory_rows=cfg.serve.memory_rows,
        exact_rows=cfg.serve.memory_exact_rows,
    )  # fmt: skip
    load_s = time.perf_counter() - started

    def serve_search(vector):
        (part,) = served.search(vector, [args.k]).answers
        return combine([part], k=args.k)

    searcher.search_vector(vectors[0], k=args.k)  # open files, warm caches
    serve_search(vectors[0])
    found: dict[str, list[float]] = {"lancedb": [], "serve": []}
    took: dict[str, list[float]] = {"lancedb": [], "serve": [], "exact": []}
    for vector in vectors:
        started = time.perf_counter()
        exact = searcher.search_vector(vector, k=args.k, exact=True)
        took["exact"].append((time.perf_counter() - started) * 1000)
        truth = set(exact["chunk_id"].to_pylist())
        for name, search in (
            ("lancedb", lambda v: searcher.search_vector(v, k=args.k)),
            ("serve", serve_search),
        ):
            started = time.perf_counter()
            hits = search(vector)
            took[name].append((time.perf_counter() - started) * 1000)
            found[name].append(len(truth & set(hits["chunk_id"].to_pylist())) / max(1, len(truth)))
    stats = served.stats()
    memory, _ = served._memory_for(served.snapshots())
    print(json.dumps({
        "queries": len(texts),
        "k": args.k,
        "rows": sum(s["rows"] for s in stats),
        "indexes": {
            snap.table.name: {
                "vector_index": snap.indexes.vector_kind,
                "num_partitions": snap.indexes.num_partitions,
                "query_params": query_params(snap.indexes, k=args.k, settings=cfg.index),
            }
            for snap in searcher.group.snapshots()
        },
        f"lancedb_recall@{args.k}": round(statistics.mean(found["lancedb"]), 4),
        "lancedb_p50_ms": round(statistics.median(took["lancedb"]), 2),
        f"serve_recall@{args.k}": round(statistics.mean(found["serve"]), 4),
        "serve_p50_ms": round(statistics.median(took["serve"]), 2),
        "serve_memory": {
            "rows": memory.num_rows if memory else 0,
            "ivf_lists": memory.ivf.nlist if memory and memory.ivf else None,
            "ivf_probes": memory.ivf.index.nprobe if memory and memory.ivf else None,
            "load_s": round(load_s, 1),
        },
        "exact_p50_ms": round(statistics.median(took["exact"]), 2),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
