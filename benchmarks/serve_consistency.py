"""Does POST /search return what `embedpipe query` and exact brute force return?

python benchmarks/serve_consistency.py ../shared/datasets/scifact --db DB --queries 100

For each query: the service's chunk ids (vector mode), ``Searcher.search`` (the code behind
``embedpipe query``), and a numpy brute force over every row of every shard, best first with ties
broken by chunk_id. Meant for a db without ANN indexes (exact search everywhere).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import requests

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("beir_dir", type=Path)
    parser.add_argument("--db", required=True, type=Path)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--k", type=int, default=10)
    args = parser.parse_args()

    import pyarrow as pa

    from pipelines.evaluate import load_beir
    from pipelines.search import Searcher

    queries, _ = load_beir(args.beir_dir)
    texts = [queries[q] for q in sorted(queries)][: args.queries]
    searcher = Searcher(args.db)
    shards = searcher.group.snapshots()
    rows = pa.concat_tables([s.table.to_arrow().select(["chunk_id", "vector"]) for s in shards])
    ids = np.array(rows["chunk_id"].to_pylist())
    matrix = rows["vector"].combine_chunks().flatten().to_numpy().reshape(rows.num_rows, -1)
    from pipelines.config import api_key_from_env

    key = api_key_from_env()
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    same_cli = same_brute = 0
    max_diff = 0.0
    for text, vector in zip(texts, searcher.embed(texts), strict=True):
        served = requests.post(
            f"{args.url}/search",
            json={"query": text, "k": args.k, "mode": "vector"},
            headers=headers,
            timeout=60,
        ).json()["results"]
        served_ids = [h["chunk_id"] for h in served]
        local = searcher.search(text, k=args.k, mode="vector")
        scores = matrix @ vector
        order = np.lexsort((ids, -scores))[: args.k]
        same_cli += served_ids == local["chunk_id"].to_pylist()
        same_brute += served_ids == ids[order].tolist()
        max_diff = max(
            max_diff, *(abs(h["score"] - float(s)) for h, s in zip(served, scores[order], strict=True))
        )
    print(
        json.dumps(
            {
                "queries": len(texts),
                "k": args.k,
                "rows": rows.num_rows,
                "same_as_query": same_cli,
                "same_as_brute_force": same_brute,
                "max_score_diff": float(f"{max_diff:.2e}"),
            }
        )
    )


if __name__ == "__main__":
    main()
