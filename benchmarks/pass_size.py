"""Tokens/s and memory of the int8 model on OpenVINO per token budget (padded tokens per pass) on this CPU.

Each budget runs in a process of its own, so each one's resident memory is its own: the model, the
pre-tokenized texts and what OpenVINO keeps for passes of that size. The texts are cut into passes
the pipeline's way (sorted by length, ``batching.plan_batches``) and run over 2 inference streams.
This is where ``batching.CPU_MAX_TOKENS`` comes from; it needs the int8 model in the model cache (any
ingest with ``dtype: auto`` on a CPU with VNNI or AMX, or ``embedpipe quantize``, makes it).

    python benchmarks/pass_size.py ../shared/datasets/scifact/corpus.jsonl --budgets 4096,8192,16384,32768
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
MODEL = "sentence-transformers/all-MiniLM-L6-v2"


def one(corpus: Path, budget: int, limit: int, rounds: int) -> dict:
    import numpy as np
    import psutil

    from pipelines import models
    from pipelines.embedding import backends, batching

    with corpus.open() as f:
        texts = [json.loads(line)["text"] for _, line in zip(range(limit), f, strict=False)]
    tokenizer = models.load_embedding_tokenizer(MODEL)
    ids = [np.asarray(e.ids, dtype=np.int64) for e in tokenizer.encode_batch(texts)]
    lengths = [len(row) for row in ids]
    parts = batching.plan_batches(lengths, budget)
    int8 = backends.int8_dir(backends.cache_root(None), MODEL)
    if not (int8 / "meta.json").exists():
        raise SystemExit(f"no int8 model at {int8}: run `embedpipe quantize` first")
    backend = backends.load_backend(
        MODEL, device="cpu", dtype="int8", threads=os.cpu_count(), int8_model=int8, streams=2
    )
    prepared = [backend.prepare_ids([ids[i] for i in part]) for part in parts]
    backend.run_many(prepared[-2:])  # warm-up: the longest passes
    started = time.perf_counter()
    for _ in range(rounds):
        backend.run_many(prepared)
    seconds = time.perf_counter() - started
    return {
        "budget": budget,
        "passes": len(parts),
        "tokens_per_s": round(rounds * sum(lengths) / seconds),
        "rss_mb": psutil.Process().memory_info().rss >> 20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("corpus", type=Path, help="a JSONL file with text")
    parser.add_argument("--budgets", default="4096,8192,16384,24576,32768,65536")
    parser.add_argument("--limit", type=int, default=3000, help="texts (each cut at the model's 256 tokens)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # a child's budget
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(one(args.corpus, args.one, args.limit, args.rounds)))
        return
    rows = []
    for budget in (int(b) for b in args.budgets.split(",")):
        done = subprocess.run(
            [sys.executable, __file__, str(args.corpus), "--one", str(budget), "--limit", str(args.limit),
             "--rounds", str(args.rounds)],
            capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parent.parent,
        )  # fmt: skip
        row = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"{budget:>7} tokens per pass: {row['tokens_per_s']:>7,} tokens/s, {row['rss_mb']:,} MB")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
