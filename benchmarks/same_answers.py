"""Do two running services answer alike? POSTs the same queries to both and compares their top-k.

python benchmarks/same_answers.py ../shared/datasets/scifact http://127.0.0.1:8000 http://127.0.0.1:8001

E.g. one db ingested with --shards 4 and one with --shards 16, or two serve layouts. Prints one JSON
line: queries compared, how many had the same chunk ids in the same order, the largest score gap.
Set EMBEDPIPE_API_KEY_FILE or EMBEDPIPE_API_KEY if the services want one.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import requests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("beir_dir", type=Path, help="a BEIR collection whose queries are sent")
    parser.add_argument("url_a")
    parser.add_argument("url_b")
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--mode", default="vector")
    args = parser.parse_args()

    from pipelines.config import api_key_from_env
    from pipelines.evaluate import load_beir

    key = api_key_from_env()
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    queries, _ = load_beir(args.beir_dir)
    same, gap, differing = 0, 0.0, []
    texts = [queries[qid] for qid in sorted(queries)][: args.queries]
    for text in texts:
        body = {"query": text, "k": args.k, "mode": args.mode}
        a, b = (
            requests.post(f"{u}/search", json=body, headers=headers, timeout=60)
            for u in (args.url_a, args.url_b)
        )
        a.raise_for_status()
        b.raise_for_status()
        hits_a, hits_b = a.json()["results"], b.json()["results"]
        if [h["chunk_id"] for h in hits_a] == [h["chunk_id"] for h in hits_b]:
            same += 1
            gap = max([gap, *(abs(x["score"] - y["score"]) for x, y in zip(hits_a, hits_b, strict=True))])
        else:
            differing.append(text)
    print(
        json.dumps(
            {"queries": len(texts), "same_top_k": same, "max_score_gap": gap, "differing": differing[:5]}
        )
    )


if __name__ == "__main__":
    main()
