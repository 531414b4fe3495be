"""Do keyword and hybrid answers depend on the shard count? The same queries on generations of one db
with different shard counts, compared top-10 by top-10.

python benchmarks/shard_counts.py /tmp/sf-db ../shared/datasets/scifact --shards 1,4,16
python benchmarks/shard_counts.py /tmp/db-a,/tmp/db-b ../shared/datasets/scifact   # two dbs' live generations

For each shard count the db has no ready generation of, ``embedpipe reshard`` builds one (the same
chunks and vectors, indexed as the live one is, BM25 term statistics included); nothing is promoted.
Given several dbs (comma-separated), their live generations are compared instead (e.g. after the same
incremental ingest into both). Each query is embedded once and searched in every generation, in each
mode; the first is the reference. Prints one JSON line per mode: queries, how many had the same chunk
ids in the same order in every generation, and the largest score gap.

``--memory-rows N`` searches as a Serve process does: shards of at most N rows (not ANN-indexed) held in
memory, their keyword queries scored from their own postings (``--memory-rows 0,50000``: both ways side
by side, every generation each way, all compared with the first).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np


def generation_with(db: str, shards: int) -> int:
    """A ready generation of ``db`` with ``shards`` shards, built by `embedpipe reshard` if there is none."""
    from pipelines import store

    def find() -> int | None:
        catalog = store.read_catalog(db)
        ready = [g for g, m in catalog.generations.items() if m.shards == shards and m.state == "ready"]
        return max(ready) if ready else None

    found = find()
    if found is None:
        command = [sys.executable, "-m", "pipelines.cli", "reshard", "--db", db, "--shards", str(shards)]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        found = find()
    if found is None:
        raise SystemExit(f"no ready generation of {shards} shards after embedpipe reshard")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("db")
    parser.add_argument("beir_dir", type=Path, help="a BEIR collection whose queries are searched")
    parser.add_argument("--shards", default="1,4,16")
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--modes", default="text,hybrid,vector")
    parser.add_argument("--memory-rows", default="0", help="comma-separated: each a way of searching")
    args = parser.parse_args()

    from pipelines.evaluate import load_beir
    from pipelines.search import Searcher

    held = [int(n) for n in args.memory_rows.split(",")]
    if "," in args.db:  # several dbs: their live generations, as they are
        dbs = args.db.split(",")
        searchers = {(db, m): Searcher(db, memory_rows=m) for m in held for db in dbs}
        counts = [s.manifest.shards for s in searchers.values()]
        generations = {key: s.manifest.generation for key, s in searchers.items()}
    else:
        counts = [int(n) for n in args.shards.split(",")]
        found = {n: generation_with(args.db, n) for n in counts}
        generations = {(n, m): found[n] for m in held for n in counts}
        searchers = {
            (n, m): Searcher(args.db, generation=g, memory_rows=m) for (n, m), g in generations.items()
        }
        counts = [n for _ in held for n in counts]
    queries, _ = load_beir(args.beir_dir)
    texts = [queries[qid] for qid in sorted(queries)][: args.queries]
    vectors = next(iter(searchers.values())).embed(texts)
    for mode in args.modes.split(","):
        same, gap, differing = 0, 0.0, []
        for text, vector in zip(texts, vectors, strict=True):
            answers = [
                s.search(text, k=args.k, mode=mode, vector=np.asarray(vector)) for s in searchers.values()
            ]
            ids = [a["chunk_id"].to_pylist() for a in answers]
            if all(i == ids[0] for i in ids):
                same += 1
                scores = np.array([a["score"].to_numpy() for a in answers])
                gap = max(gap, float(np.abs(scores - scores[0]).max()) if scores.size else 0.0)
            else:
                differing.append(text)
        line = {
            "mode": mode, "shards": counts, "memory_rows": [m for _, m in generations],
            "generations": list(generations.values()), "queries": len(texts),
            "same_top_k": same, "max_score_gap": gap, "differing": differing[:5],
        }  # fmt: skip
        print(json.dumps(line))


if __name__ == "__main__":
    main()
