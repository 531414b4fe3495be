"""How should hybrid search fuse its vector and BM25 rankings? nDCG@10 of vector, text and each fusion
candidate on several BEIR collections, from one search per query.

python benchmarks/fusion.py ../shared/datasets/scifact /tmp/collections/trec-rag24-nist --workdir /tmp/fusion

Each collection is ingested into WORKDIR/<name> (with the config's settings, --shards shards) unless it
already is, and indexed (BM25 term statistics included). Each query is embedded and searched once: its
vector and BM25 top ``serve.hybrid_candidates`` chunks, exactly as hybrid mode searches them; every
candidate fusion then ranks those two lists (``pipelines.search.combine``), the chunks become documents
(each scored by its best chunk, as ``embedpipe eval`` does) and ranx scores them. Prints a table, and
with --json the scores. ``benchmarks/beir_collections.py`` builds collections other than SciFact.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

WEIGHTS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def candidates() -> dict[str, dict]:
    """The rankings compared: each alone, RRF, and convex combinations by vector weight."""
    found = {"vector": {}, "text": {}, "rrf": {"fusion": "rrf"}}
    found.update({f"convex {w}": {"fusion": "convex", "weight": w} for w in WEIGHTS})
    return found


def collection_scores(beir_dir: Path, workdir: Path, shards: int | None, config: Path | None) -> dict:
    from pipelines import evaluate as ev
    from pipelines import index, store
    from pipelines import ingest as pipeline
    from pipelines.config import load_config
    from pipelines.search import Partial, Searcher, combine, fetch_rows

    cfg = load_config(config, shards=shards)
    db = store.location(workdir / beir_dir.name)
    queries, qrels = ev.load_beir(beir_dir)
    if not ev.corpus_ingested(db, beir_dir):
        pipeline.build(source=beir_dir / "corpus.jsonl", db=db, cfg=cfg)
    index.build(db, settings=cfg.index)
    searcher = Searcher(db, index=cfg.index, dtype=cfg.serve.query_dtype)
    depth = cfg.serve.hybrid_candidates
    qids = sorted(queries)
    vectors = searcher.embed([queries[q] for q in qids])
    runs: dict[str, dict[str, dict[str, float]]] = {name: {} for name in candidates()}
    for qid, vector in zip(qids, vectors, strict=True):
        answer = searcher.group.search(np.asarray(vector), [depth], [None], [queries[qid]])
        (part,) = answer.answers
        if isinstance(part, Exception):
            raise part
        for name, options in candidates().items():
            if name == "vector":
                ranked = combine([Partial(part.vector, None)], k=depth)
            elif name == "text":
                ranked = combine([Partial(None, part.text)], k=depth)
            else:
                ranked = combine([part], k=2 * depth, depth=depth, rrf_k=cfg.serve.rrf_k, **options)
            (rows,) = fetch_rows([ranked], answer.tables, columns=["doc_id"])
            docs: dict[str, float] = {}
            for doc_id, score in zip(rows["doc_id"].to_pylist(), rows["score"].to_pylist(), strict=True):
                docs.setdefault(doc_id, float(score))
            runs[name][qid] = docs
    scores = {name: ev.score(run, {q: qrels[q] for q in run})["ndcg@10"] for name, run in runs.items()}
    return {"queries": len(qids), "shards": searcher.manifest.shards, "ndcg@10": scores}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("beir_dirs", type=Path, nargs="+", help="BEIR collections")
    parser.add_argument("--workdir", type=Path, required=True, help="where the collections' dbs are")
    parser.add_argument("--shards", type=int, default=None)
    parser.add_argument("--config", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None, help="write the scores here too")
    args = parser.parse_args()
    results = {d.name: collection_scores(d, args.workdir, args.shards, args.config) for d in args.beir_dirs}
    names = list(candidates())
    print(f"{'collection':<22}" + "".join(f"{n:>11}" for n in names))
    for collection, found in results.items():
        row = found["ndcg@10"]
        print(f"{collection:<22}" + "".join(f"{row[n]:>11.4f}" for n in names))
    # A default must never fall below the better of vector and text alone on any collection.
    for name in names[2:]:
        margins = [
            r["ndcg@10"][name] - max(r["ndcg@10"]["vector"], r["ndcg@10"]["text"]) for r in results.values()
        ]
        print(f"{name:<12} worst margin over the better single ranking: {min(margins):+.4f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
