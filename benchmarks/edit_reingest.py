"""Edit N documents of an ingested corpus, ingest again, and check what was re-embedded and found.

Each edited document gets a sentence with a unique marker appended. Afterwards: the edited documents
are the only ones ingested (the rest unchanged), the chunks that went through the model are exactly
those whose text changed (the rest of the edited documents' chunks come from the embedding cache),
and searching for each edited document's new ending returns that document, with the new text, first.

    python benchmarks/edit_reingest.py ../shared/datasets/scifact/corpus.jsonl --db /tmp/bench-sf/db --edit 50
"""

from __future__ import annotations

import argparse
import json
import os
import random
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _edit(doc: dict) -> dict:
    return {**doc, "text": doc["text"] + f" Addendum zq{doc['_id']}x: results were re-checked."}


def found_by_new_text(searcher, docs: list[dict], edited: set[str]) -> dict[str, int]:
    """Query each edited document's new ending: is the document the top hit, and is a chunk with the
    new text among the top 3 (a document's earlier chunks may outscore its short new last chunk)?"""
    first = new_in_top3 = 0
    for doc in docs:
        if doc["_id"] in edited:
            hits = searcher.search(_edit(doc)["text"][-300:], k=3).to_pylist()
            first += bool(hits) and hits[0]["doc_id"] == doc["_id"]
            new_in_top3 += any(h["doc_id"] == doc["_id"] and f"zq{doc['_id']}x" in h["text"] for h in hits)
    return {"doc_first": first, "new_text_in_top3": new_in_top3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("corpus", type=Path, help="the JSONL corpus already ingested into --db")
    parser.add_argument("--db", type=Path, required=True)
    parser.add_argument("--edit", type=int, default=50)
    parser.add_argument("--config", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--check-only", action="store_true", help="only search (after an earlier run)")
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

    if args.check_only:
        print(json.dumps({"search_for_new_ending": found_by_new_text(Searcher(args.db), docs, edited)}))
        return
    before = chunks()
    source = args.db.parent / f"{args.corpus.stem}-edited.jsonl"
    with source.open("w") as f:
        for doc in docs:
            if doc["_id"] in edited:
                doc = _edit(doc)
            f.write(json.dumps(doc) + "\n")
    report = ingest.build(
        source=source, db=args.db, cfg=load_config(args.config, **{"ray.progress_bars": False})
    )
    after = chunks()
    edited_chunks = [cid for cid in after if cid.rsplit("#", 1)[0] in edited]
    changed = [cid for cid in edited_chunks if before.get(cid) != after[cid]]
    found = found_by_new_text(Searcher(args.db), docs, edited)
    figures = {
        "docs": report["docs"],
        "edited_docs": len(edited),
        "edited_docs_chunks": len(edited_chunks),
        "chunks_with_changed_text": len(changed),
        "embeddings": report["embeddings"],
        "chunks_written": report["chunks"]["written"],
        "stale_chunks_left": len([c for c in before if c.rsplit("#", 1)[0] in edited and c not in after]),
        "search_for_new_ending": found,
        "wall_s": report["wall_s"],
    }
    print(json.dumps(figures, indent=2))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
