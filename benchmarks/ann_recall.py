"""Recall@k against exact search, latency and memory of what Serve searches (``ShardGroup`` over the
db's shards: small unindexed shards held in memory, the others through the ANN index `embedpipe index`
built), over BEIR queries embedded by the query embedder Serve uses.

python benchmarks/ann_recall.py ../shared/datasets/scifact --db DB [--queries 100] [--k 10] [--config C]
    [--grid nprobes=20,32,64 refine=2,5,10 low_refine=3,5]

Exact search is one streamed pass over every shard's vectors (numpy, the queries at once: at 10M rows a
LanceDB scan per query would take hours), cosine as LanceDB computes it. Per setting it prints recall@k,
the p50 of one query alone (every shard searched side by side, as at c=1) and the cost per query of a
batch of 16 (as under load). ``open_s`` is how long the group took to open (what a new replica pays:
no index is built, the ANN indexes are prewarmed); ``memory`` what it holds, per row.
"""

from __future__ import annotations

import argparse
import itertools
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
    parser.add_argument(
        "--grid",
        nargs="*",
        default=[],
        help="query settings to try: nprobes=A,B refine=C,D low_refine=E,F (2-bit codes' candidates)",
    )
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
    truth = _exact_top(args.db, vectors, args.k)

    started = time.perf_counter()
    served = ShardGroup(
        str(args.db), refresh_s=float("inf"), index=cfg.index, memory_rows=cfg.serve.memory_rows
    )
    open_s = time.perf_counter() - started

    grid = {
        "nprobes": [None],
        "refine": [cfg.index.refine_factor],
        "low_refine": [cfg.index.codes_low_bits_refine],
    }
    for item in args.grid:
        name, values = item.split("=")
        grid[name] = [int(v) for v in values.split(",")]
    results = []
    for nprobes, refine, low in itertools.product(grid["nprobes"], grid["refine"], grid["low_refine"]):
        changes = {"refine_factor": refine, "codes_low_bits_refine": low}
        if nprobes is not None:  # every shard probes this many partitions
            changes.update(probe_factor=1e-9, min_nprobes=nprobes)
        settings = cfg.index.model_copy(update=changes)
        for shard in served.shards:
            shard.index_settings = settings

        def search(batch):
            answer = served.search(batch, [args.k] * len(batch))
            return [combine([part], k=args.k) for part in answer.answers]

        search(vectors[:16])  # warm caches
        took, found = [], []
        for vector, want in zip(vectors, truth, strict=True):
            t0 = time.perf_counter()
            (hits,) = search(vector[None])
            took.append((time.perf_counter() - t0) * 1000)
            found.append(len(want & set(hits["chunk_id"].to_pylist())) / max(1, len(want)))
        t0 = time.perf_counter()
        for i in range(0, len(vectors), 16):
            search(vectors[i : i + 16])
        batched = (time.perf_counter() - t0) * 1000 / len(vectors)
        snap = served.snapshots()[0]
        results.append({
            "query_params": query_params(snap.indexes, k=args.k, settings=settings),
            "low_bits_refine": low,
            f"recall@{args.k}": round(statistics.mean(found), 4),
            "p50_ms": round(statistics.median(took), 2),
            "batch16_ms_per_query": round(batched, 2),
        })  # fmt: skip
        print(json.dumps(results[-1]), flush=True)
    stats = served.stats()
    print(json.dumps({
        "queries": len(texts),
        "k": args.k,
        "rows": sum(s["rows"] for s in stats),
        "shards": {s["shard"]: {k: s[k] for k in ("rows", "vector_index", "in_memory")} for s in stats},
        "open_s": round(open_s, 2),
        "memory": served.memory(),
        "results": results,
    }))  # fmt: skip


def _exact_top(db: Path, vectors, k: int) -> list[set[str]]:
    """Each query's exact top-k chunk ids over every shard, in one streamed pass over the vectors."""
    import numpy as np

    from pipelines import store

    queries = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    best = np.full((len(queries), k), -np.inf, np.float32)
    ids = np.full((len(queries), k), "", dtype=object)
    for table in store.open_shards(db).values():
        for batch in table.search().select(["chunk_id", "vector"]).limit(None).to_batches(262_144):
            flat = batch.column("vector").flatten().to_numpy(zero_copy_only=False)
            rows = np.asarray(flat, np.float32).reshape(batch.num_rows, -1)
            norms = np.linalg.norm(rows, axis=1)
            scores = (queries @ rows.T) / np.where(norms > 0, norms, 1.0)
            top = np.argpartition(-scores, min(k, scores.shape[1] - 1), axis=1)[:, :k]
            chunk_ids = np.asarray(batch.column("chunk_id").to_pylist(), dtype=object)
            both = np.concatenate([best, np.take_along_axis(scores, top, axis=1)], axis=1)
            both_ids = np.concatenate([ids, chunk_ids[top]], axis=1)
            keep = np.argsort(-both, axis=1)[:, :k]
            best, ids = np.take_along_axis(both, keep, axis=1), np.take_along_axis(both_ids, keep, axis=1)
    return [set(row) for row in ids]


if __name__ == "__main__":
    main()
