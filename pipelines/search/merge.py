"""Merge per-shard search results into the global top-k, and fuse a vector and a keyword ranking:
pure functions on Arrow tables."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

# Highest score first; equal scores fall back to chunk_id so that results never depend on the order
# in which shards answered.
SORT_KEYS = [("score", "descending"), ("chunk_id", "ascending")]


def merge_topk(results: list[pa.Table], *, k: int) -> pa.Table:
    """The k best rows across shard results, best first.

    Args:
        results: one table per shard, each with at least ``score`` (higher is better) and
            ``chunk_id`` columns and the same schema; empty tables are allowed.
        k: how many rows to keep (k >= 1).

    Returns:
        At most k rows sorted by score descending, ties broken by chunk_id.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    tables = [t for t in results if t.num_rows]
    if not tables:
        return results[0].slice(0, 0) if results else pa.table({"chunk_id": [], "score": []})
    merged = pa.concat_tables(tables, promote_options="default")
    if merged.num_rows > k:
        merged = merged.take(pc.select_k_unstable(merged, k=k, sort_keys=SORT_KEYS))
    return merged.sort_by(SORT_KEYS)


def rrf_fuse(rankings: list[pa.Table], *, k: int, rrf_k: int = 60) -> pa.Table:
    """Reciprocal rank fusion: each row scores sum(1 / (rrf_k + rank)) over the rankings it is in.

    Args:
        rankings: tables ranked best first, each with ``chunk_id`` and the same columns; a row's
            other columns are taken from the first ranking that holds it.
        k: how many rows to keep.
        rrf_k: the fusion constant (60 in the original paper); larger flattens the rank weights.

    Returns:
        At most k rows, ``score`` replaced by the fused score, best first, ties broken by chunk_id.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    fused: dict[str, float] = {}
    first: dict[str, tuple[int, int]] = {}  # chunk_id -> (ranking, row) it was first seen at
    for which, table in enumerate(rankings):
        for rank, chunk_id in enumerate(table.column("chunk_id").to_pylist(), start=1):
            fused[chunk_id] = fused.get(chunk_id, 0.0) + 1.0 / (rrf_k + rank)
            first.setdefault(chunk_id, (which, rank - 1))
    return _fused_rows(rankings, fused, first, k)


# The lowest score each ranking can give (cosine similarity, BM25): convex fusion scales a ranking's
# scores from there to its best (Bruch et al., "An Analysis of Fusion Functions for Hybrid Retrieval",
# TOIS 2023: the theoretical minimum is more robust than the observed one).
SCORE_FLOOR = {"vector": -1.0, "text": 0.0}


def convex_fuse(
    vector: pa.Table, text: pa.Table, *, k: int, weight: float, depth: int | None = None
) -> pa.Table:
    """A convex combination of normalized scores: ``weight`` * vector + (1 - ``weight``) * text.

    Each ranking's scores are scaled to [0, 1] from its floor (``SCORE_FLOOR``) to its best. A row
    absent from one ranking takes the lowest scaled score that ranking returned: its own is at most
    that (it was not in the top), and a 0 would sink a row that one ranking is sure of
    (benchmarks/fusion.py measured both; README, "Hybrid search"). But a BM25 ranking shorter than
    the ``depth`` it was asked for holds every row with a query term, so a row absent from it has
    none: it scores the floor, 0 (on a synthetic set of rare-keyword queries that lifted convex 0.8
    from 0.9246 to 0.9596 nDCG@10, and changed nothing on the natural collections).

    Args:
        vector: the vector ranking (cosine ``score``), best first.
        text: the BM25 ranking, best first; the same columns.
        k: how many rows to keep.
        weight: the vector ranking's weight, in [0, 1].
        depth: the rows each ranking was asked for (default: unknown, every ranking taken as cut).

    Returns:
        At most k rows, ``score`` replaced by the fused score, best first, ties broken by chunk_id.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"weight must be in [0, 1], got {weight}")
    first: dict[str, tuple[int, int]] = {}
    scaled = []
    for which, (table, floor) in enumerate([(vector, SCORE_FLOOR["vector"]), (text, SCORE_FLOOR["text"])]):
        scores = table.column("score").to_pylist()
        chunk_ids = table.column("chunk_id").to_pylist()
        span = max(scores) - floor if scores else 0.0
        norm = {c: (s - floor) / span if span > 0 else 1.0 for c, s in zip(chunk_ids, scores, strict=True)}
        for row, chunk_id in enumerate(chunk_ids):
            first.setdefault(chunk_id, (which, row))
        scaled.append((norm, min(norm.values(), default=0.0)))
    (vec, vec_low), (txt, txt_low) = scaled
    if depth is not None and text.num_rows < depth:  # every row with a query term is in it
        txt_low = 0.0
    fused = {c: weight * vec.get(c, vec_low) + (1.0 - weight) * txt.get(c, txt_low) for c in first}
    return _fused_rows([vector, text], fused, first, k)


def _fused_rows(
    rankings: list[pa.Table], fused: dict[str, float], first: dict[str, tuple[int, int]], k: int
) -> pa.Table:
    best = sorted(fused, key=lambda c: (-fused[c], c))[:k]
    if not best:
        return rankings[0].slice(0, 0) if rankings else pa.table({"chunk_id": [], "score": []})
    rows = pa.concat_tables(
        [rankings[first[c][0]].slice(first[c][1], 1) for c in best], promote_options="default"
    )
    score = pa.array([fused[c] for c in best], pa.float32())
    return rows.set_column(rows.schema.get_field_index("score"), "score", score)
