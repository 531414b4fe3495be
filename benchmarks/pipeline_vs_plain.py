"""Ingest throughput of the full pipeline next to a plain sentence-transformers loop, back to back.

The plain loop embeds exactly the texts the pipeline embedded (read back from the db it wrote), in the
same dtype and forward-pass batch size, with every core; its time excludes loading the model. The
pipeline's time is the run report's wall time: Ray start, reading, chunking, embedding, writing, commit.

    python benchmarks/pipeline_vs_plain.py ../shared/datasets/scifact/corpus.jsonl --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path)
    parser.add_argument("--config", type=Path, default=None)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = parser.parse_args()

    from pipelines import ingest, store
    from pipelines.chunking import embed_input
    from pipelines.config import load_config
    from pipelines.embedding import Embedder

    cfg = load_config(args.config, shards=args.shards, **{"ray.progress_bars": False})
    with tempfile.TemporaryDirectory() as tmp:
        report = ingest.build(source=args.source, db=Path(tmp) / "db", cfg=cfg)
        texts = []
        for table in store.open_shards(Path(tmp) / "db").values():
            rows = table.search().select(["title", "text"]).limit(None).to_arrow()
            texts += [
                embed_input(t, x)
                for t, x in zip(rows["title"].to_pylist(), rows["text"].to_pylist(), strict=True)
            ]

    embedder = Embedder(
        model=cfg.embedding.model, dtype=cfg.embedding.dtype, device=cfg.embedding.device,
        encode_batch_size=cfg.embedding.encode_batch_size, cpu_threads=cfg.embedding.cpu_threads,
    )  # fmt: skip
    embedder.encode(texts[:64])  # warm-up
    started = time.perf_counter()
    embedder.encode(texts)
    plain_s = time.perf_counter() - started

    docs = report["docs"]["ingested"]
    tokens = report["tokens_embedded"]
    figures = {
        "docs": docs,
        "chunks": len(texts),
        "tokens": tokens,
        "dtype": embedder.dtype,
        "device": embedder.device,
        "pipeline": {
            "wall_s": report["wall_s"],
            "docs_per_s": round(docs / report["wall_s"], 2),
            "tokens_per_s": round(tokens / report["wall_s"], 1),
        },
        "plain_loop": {
            "wall_s": round(plain_s, 3),
            "docs_per_s": round(docs / plain_s, 2),
            "tokens_per_s": round(tokens / plain_s, 1),
        },
        "ratio_pipeline_vs_plain": round(plain_s / report["wall_s"], 3),
        "run_id": report["run_id"],
    }
    print(json.dumps(figures, indent=2))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
