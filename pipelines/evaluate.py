"""Score retrieval on a BEIR-layout collection (corpus.jsonl, queries.jsonl, qrels/test.tsv) with ranx."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from pipelines import store
from pipelines.search import Searcher

logger = logging.getLogger(__name__)

METRICS = ["ndcg@10", "recall@100", "mrr@10"]


class BeirError(ValueError):
    """A directory that is not in BEIR layout."""


def load_beir(
    beir_dir: str | Path, *, split: str = "test"
) -> tuple[dict[str, str], dict[str, dict[str, int]]]:
    """Queries that have judgments, and the judgments (score > 0 is relevant).

    Returns:
        ``(queries {qid: text}, qrels {qid: {doc_id: score}})``.
    """
    root = Path(beir_dir)
    qrels_path, queries_path = root / "qrels" / f"{split}.tsv", root / "queries.jsonl"
    for path in (root / "corpus.jsonl", queries_path, qrels_path):
        if not path.exists():
            raise BeirError(f"{str(beir_dir)!r} is not a BEIR collection: {path.name} is missing.")
    qrels: dict[str, dict[str, int]] = {}
    with qrels_path.open(newline="") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            score = int(row["score"])
            if score > 0:
                qrels.setdefault(str(row["query-id"]), {})[str(row["corpus-id"])] = score
    queries: dict[str, str] = {}
    with queries_path.open() as f:
        for line in f:
            if line.strip():
                record = json.loads(line)
                if str(record["_id"]) in qrels:
                    queries[str(record["_id"])] = record["text"]
    missing = set(qrels) - set(queries)
    if missing:
        raise BeirError(
            f"{len(missing)} judged queries are missing from queries.jsonl, e.g. {min(missing)!r}"
        )
    return queries, qrels


def rank_docs(searcher: Searcher, vector: np.ndarray, *, n_docs: int) -> dict[str, float]:
    """The best ``n_docs`` documents for a query, each scored by its best chunk."""
    k = n_docs * 3
    while True:
        hits = searcher.search_vector(vector, k=k)
        docs: dict[str, float] = {}
        for doc_id, score in zip(hits["doc_id"].to_pylist(), hits["score"].to_pylist(), strict=True):
            docs.setdefault(doc_id, float(score))  # hits are best first
        if len(docs) >= n_docs or hits.num_rows < k:
            return dict(list(docs.items())[:n_docs])
        k *= 2


def evaluate(
    *, searcher: Searcher, queries: dict[str, str], qrels: dict[str, dict[str, int]]
) -> dict[str, Any]:
    """nDCG@10, Recall@100 and MRR@10 of the db behind ``searcher`` (ranx does the scoring)."""
    from ranx import Qrels, Run
    from ranx import evaluate as ranx_evaluate

    qids = sorted(queries)
    vectors = searcher.embed([queries[q] for q in qids])
    run = {qid: rank_docs(searcher, vec, n_docs=100) for qid, vec in zip(qids, vectors, strict=True)}
    # ranx rejects a query with an empty ranking; such a query simply scores 0.
    for ranking in run.values():
        if not ranking:
            ranking["__none__"] = 0.0
    scores = ranx_evaluate(Qrels(qrels), Run(run), METRICS, make_comparable=True)
    return {**{m: round(float(scores[m]), 4) for m in METRICS}, "queries": len(qids)}


def corpus_ingested(db: str | Path, beir_dir: str | Path) -> bool:
    return store.has_source(db, str((Path(beir_dir) / "corpus.jsonl").resolve()))
