"""Plain encode speed of the embedding model per dtype on this machine (what dtype "auto" should pick).

python benchmarks/dtypes.py ../shared/datasets/scifact/corpus.jsonl --limit 300
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("corpus", type=Path, help="a JSONL file with title/text")
    parser.add_argument("--limit", type=int, default=300)
    parser.add_argument("--dtypes", default="fp32,bf16")
    args = parser.parse_args()

    from pipelines.embedding import Embedder
    from pipelines.embedding.backends import cpu_has_native_bf16

    with args.corpus.open() as f:
        docs = [json.loads(line) for _, line in zip(range(args.limit), f, strict=False)]
    texts = [f"{d.get('title', '')} {d['text']}".strip() for d in docs]
    results = {"native_bf16": cpu_has_native_bf16(), "docs": len(texts)}
    for dtype in args.dtypes.split(","):
        embedder = Embedder(model="sentence-transformers/all-MiniLM-L6-v2", device="cpu", dtype=dtype)
        embedder.encode(texts[:16])
        started = time.perf_counter()
        embedder.encode(texts)
        results[f"{dtype}_docs_per_s"] = round(len(texts) / (time.perf_counter() - started), 2)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
