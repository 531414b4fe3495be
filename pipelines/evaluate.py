"""Score retrieval on a BEIR-layout collection (corpus.jsonl, queries.jsonl, qrels/test.tsv) with ranx."""

from __future__ import annotations

import csv
import json
import logging
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from pipelines import store
from pipelines.search import Searcher

logger = logging.getLogger(__name__)

METRICS = ["ndcg@10", "recall@100", "mrr@10"]


class BeirError(ValueError):
    """A directory that is not in BEIR layout."""


class EndpointError(ValueError):
    """A search service that did not answer a query."""


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


def rank_docs(
    search: Callable[[int], list[tuple[str, float]]], *, n_docs: int, max_k: int | None = None
) -> dict[str, float]:
    """The best ``n_docs`` documents for a query, each scored by its best chunk.

    Args:
        search: returns the top-k chunks as ``(doc_id, score)``, best first.
        n_docs: documents wanted.
        max_k: the most chunks ``search`` may be asked for (a service's limit).
    """
    k = n_docs * 3 if max_k is None else min(n_docs * 3, max_k)
    while True:
        hits = search(k)
        docs: dict[str, float] = {}
        for doc_id, score in hits:
            docs.setdefault(doc_id, float(score))  # hits are best first
        if len(docs) >= n_docs or len(hits) < k or (max_k is not None and k >= max_k):
            return dict(list(docs.items())[:n_docs])
        k = k * 2 if max_k is None else min(k * 2, max_k)


def run_local(
    searcher: Searcher, queries: dict[str, str], *, n_docs: int = 100, **search_options: Any
) -> dict[str, dict[str, float]]:
    """Document rankings for every query, searched in this process.

    Args:
        searcher: the db's searcher.
        queries: ``{qid: text}``.
        n_docs: documents ranked per query.
        search_options: passed to ``Searcher.search`` (mode, candidates, fusion, weight, rrf_k).
    """
    qids = sorted(queries)
    if search_options.get("mode") == "text":  # BM25 alone: nothing to embed
        vectors = [None] * len(qids)
    else:
        vectors = searcher.embed([queries[q] for q in qids])

    def searcher_for(text: str, vector: np.ndarray | None) -> Callable[[int], list[tuple[str, float]]]:
        def search(k: int) -> list[tuple[str, float]]:
            hits = searcher.search(text, k=k, vector=vector, **search_options)
            return list(zip(hits["doc_id"].to_pylist(), hits["score"].to_pylist(), strict=True))

        return search

    return {
        qid: rank_docs(searcher_for(queries[qid], vec), n_docs=n_docs)
        for qid, vec in zip(qids, vectors, strict=True)
    }


def run_endpoint(
    url: str,
    queries: dict[str, str],
    *,
    n_docs: int = 100,
    api_key: str | None = None,
    max_k: int = 300,
    mode: str | None = None,
    fusion: str | None = None,
    weight: float | None = None,
    refused: dict[str, str] | None = None,
) -> dict[str, dict[str, float]]:
    """Document rankings for every query the service answers, searched through ``embedpipe serve``.

    Args:
        url: the service, e.g. http://127.0.0.1:8000.
        queries: ``{qid: text}``.
        n_docs: documents ranked per query.
        api_key: sent as a bearer token.
        max_k: the most chunks asked for at once (the service's serve.max_k, 300 by default).
        mode: vector, text or hybrid; None: the service's default.
        fusion: hybrid: convex or rrf; None: the service's default.
        weight: convex fusion: the vector ranking's weight; None: the service's default.
        refused: filled with ``{qid: reason}`` for each query the service refused with a 4xx (a query
            over its max_query_chars, say); those are left out of the rankings, not the whole run.

    Raises:
        EndpointError: the service is unreachable, refuses the key, or fails (5xx).
    """
    import requests

    session = requests.Session()
    if api_key:
        session.headers["Authorization"] = f"Bearer {api_key}"
    endpoint = url.rstrip("/") + "/search"
    options = {
        name: value
        for name, value in (("mode", mode), ("fusion", fusion), ("weight", weight))
        if value is not None
    }
    refused = {} if refused is None else refused

    def searcher_for(text: str) -> Callable[[int], list[tuple[str, float]]]:
        def search(k: int) -> list[tuple[str, float]]:
            try:
                response = session.post(endpoint, json={"query": text, "k": k, **options}, timeout=120)
            except requests.RequestException as exc:
                raise EndpointError(f"{endpoint} did not answer: {type(exc).__name__}") from exc
            if response.status_code in (401, 403) or response.status_code >= 500:
                raise EndpointError(f"{endpoint} answered {response.status_code}: {response.text[:300]}")
            if response.status_code != 200:
                raise _Refused(f"{response.status_code}: {_detail(response)}")
            return [(hit["doc_id"], hit["score"]) for hit in response.json()["results"]]

        return search

    run: dict[str, dict[str, float]] = {}
    for qid in sorted(queries):
        try:
            run[qid] = rank_docs(searcher_for(queries[qid]), n_docs=n_docs, max_k=max_k)
        except _Refused as exc:
            refused[qid] = str(exc)
            logger.warning("query %s refused by the service: %s", qid, exc)
    return run


class _Refused(Exception):
    """A 4xx for one query: the service will not answer that query, whatever else it answers."""


def _detail(response: Any) -> str:
    try:
        detail = response.json().get("detail")
    except ValueError:
        return response.text[:300]
    return (detail if isinstance(detail, str) else json.dumps(detail))[:300]


def score(run: dict[str, dict[str, float]], qrels: dict[str, dict[str, int]]) -> dict[str, Any]:
    """nDCG@10, Recall@100 and MRR@10 of document rankings (ranx does the scoring)."""
    from ranx import Qrels, Run
    from ranx import evaluate as ranx_evaluate

    # ranx rejects a query with an empty ranking; such a query simply scores 0.
    run = {qid: ranking or {"__none__": 0.0} for qid, ranking in run.items()}
    with warnings.catch_warnings():
        # numba compiles ranx's nDCG once per machine and warns about a uint64 cast inside ranx: noise
        warnings.filterwarnings("ignore", message=".*unsafe cast from uint64 to int64")
        scores = ranx_evaluate(Qrels(qrels), Run(run), METRICS, make_comparable=True)
    return {**{m: round(float(scores[m]), 4) for m in METRICS}, "queries": len(run)}


def corpus_ingested(db: str | Path, beir_dir: str | Path) -> bool:
    return store.has_source(db, str((Path(beir_dir) / "corpus.jsonl").resolve()))
