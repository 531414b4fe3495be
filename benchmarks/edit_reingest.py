"""Edit N documents of an ingested corpus, ingest again, and check what was re-embedded and found.

Each edited document gets a sentence with a unique marker appended. Afterwards: the edited documents
are the only ones ingested (the rest unchanged), the chunks that went through the model are exactly
those whose text changed (the rest of the edited documents' chunks come from the embedding cache),
and searching for each marker returns its document with the new text.

    python benchmarks/edit_reingest.py ../shared/datasets/scifact/corpus.jsonl --db /tmp/bench-sf/db --edit 50
"""

from __future__ import annotations

import argparse
import json
import os
import random
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("corpus", type=Path, help="the JSONL corpus already ingested into --db")
    parser.add_argument("--db", type=Path, required=True)
    parser.add_argument("--edit", type=int, default=50)
    parser.add_argument("--config", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    from pipelines import ingest, store
    from pipelines.config import load_config
    from pipelines.search import Searcher

    docs = [json.loads(line) for line in args.corpus.open()]
    edited = {docs[i]["_id"] for i in random.Random(0).sample(range(len(docs)), args.edit)}

    def chunks() -> dict[str, str]:
        out: dict[str, str] = {}
        for table in store.open_shards(args.db).values():
            rows = table.search().select(["chunk_id", "text"]).limit(None).to_arrow()
            out.update(zip(rows["chunk_id"].to_pylist(), rows["text"].to_pylist(), strict=True))
        return out

    before = chunks()
    source = args.db.parent / f"{args.corpus.stem}-edited.jsonl"
    with source.open("w") as f:
        for doc in docs:
            if doc["_id"] in edited:
                doc = {**doc, "text": doc["text"] + f" Addendum zq{doc['_id']}x: results were re-checked."}
            f.write(json.dumps(doc) + "\n")
    report = ingest.build(
        source=source, db=args.db, cfg=load_config(args.config, **{"ray.progress_bars": False})
    )
    after = chunks()
    edited_chunks = [cid for cid in after if cid.rsplit("#", 1)[0] in edited]
    changed = [cid for cid in edited_chunks if before.get(cid) != after[cid]]
    searcher = Searcher(args.db)
    found = 0
    for doc_id in sorted(edited):
        hits = searcher.search(f"Addendum zq{doc_id}x: results were re-checked.", k=1).to_pylist()
        found += bool(hits) and hits[0]["doc_id"] == doc_id and f"zq{doc_id}x" in hits[0]["text"]
    figures = {
        "docs": report["docs"],
        "edited_docs": len(edited),
        "edited_docs_chunks": len(edited_chunks),
        "chunks_with_changed_text": len(changed),
        "embeddings": report["embeddings"],
        "chunks_written": report["chunks"]["written"],
        "stale_chunks_left": len([c for c in before if c.rsplit("#", 1)[0] in edited and c not in after]),
        "edited_docs_found_first_by_marker": found,
        "wall_s": report["wall_s"],
    }
    print(json.dumps(figures, indent=2))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
