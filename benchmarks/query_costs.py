"""What one query alone costs in one process, step by step, and what a LanceDB take costs by its rows:
where a lone query's time goes on a large db (README, "Search past RAM").

python benchmarks/query_costs.py ../shared/datasets/scifact --db /tmp/db-1m [--queries 100]

Each BEIR query, alone: embedding by the service's query embedder, the search of every shard
(``ShardGroup.search``: codes probed, then one take of the candidates' vectors a shard), then the
answers' rows (``fetch_rows``: one take a shard holding a hit, the columns /search returns); medians.
Then takes of 1, 20 and 100 random rows of one shard's vectors, one after another: wall time and the
process's CPU time per take.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ANSWER_COLUMNS = ["chunk_id", "doc_id", "title", "text"]  # what /search reads for its hits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("beir_dir", type=Path, help="a BEIR collection (its queries are used)")
    parser.add_argument("--db", required=True, type=Path)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--takes", type=int, default=200, help="takes per row count")
    args = parser.parse_args()

    from pipelines.config import load_config
    from pipelines.evaluate import load_beir
    from pipelines.search import Searcher, ShardGroup
    from pipelines.search.shard import _async_table, fetch_rows, run_async

    cfg = load_config(None)
    queries, _ = load_beir(args.beir_dir)
    texts = [queries[q] for q in sorted(queries)][: args.queries]
    searcher = Searcher(args.db, index=cfg.index, dtype=cfg.serve.query_dtype)
    group = ShardGroup(
        str(args.db), refresh_s=float("inf"), index=cfg.index, memory_rows=cfg.serve.memory_rows
    )
    for text in texts[:5]:  # warm the model and the caches
        group.search(searcher.embed([text]), [10])
    steps: dict[str, list[float]] = {"embed_ms": [], "search_ms": [], "answer_rows_ms": []}
    for text in texts:
        t0 = time.perf_counter()
        vector = searcher.embed([text])
        t1 = time.perf_counter()
        answer = group.search(vector, [10])
        t2 = time.perf_counter()
        fetch_rows([answer.answers[0].vector], answer.tables, ANSWER_COLUMNS)
        t3 = time.perf_counter()
        for name, seconds in zip(steps, (t1 - t0, t2 - t1, t3 - t2), strict=True):
            steps[name].append(seconds * 1000)
    result: dict[str, object] = {
        "db": str(args.db),
        "queries": len(texts),
        "shards": len(group.shards),
        **{name: round(statistics.median(values), 2) for name, values in steps.items()},
    }

    table = group.snapshots()[0].table
    rowids = table.search().select(["chunk_id"]).with_row_id(True).limit(50_000).to_arrow()["_rowid"]
    rowids = rowids.to_numpy()
    rng = np.random.default_rng(0)

    async def take(n: int) -> None:
        picked = sorted(rng.choice(rowids, n, replace=False).tolist())
        await _async_table(table).take_row_ids(picked).select(["vector"]).with_row_id().to_arrow()

    async def takes(n: int) -> None:
        for _ in range(args.takes):
            await take(n)

    for n in (1, 20, 100):
        run_async(take(n))  # warm
        wall, cpu = time.perf_counter(), _cpu()
        run_async(takes(n))
        result[f"take_{n}_rows"] = {
            "wall_ms": round((time.perf_counter() - wall) * 1000 / args.takes, 2),
            "cpu_ms": round((_cpu() - cpu) * 1000 / args.takes, 2),
        }
    print(json.dumps(result))


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


if __name__ == "__main__":
    main()
