"""Merge per-shard search results into the global top-k: a pure function on Arrow tables."""

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
