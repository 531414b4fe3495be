"""Index each shard for its size: exact search when small, an ANN index when large, BM25 for hybrid.

``embedpipe index --db DIR`` runs ``build``; the search side reads what a table holds with
``read_indexes`` and turns it into query parameters with ``query_params``, so the indexes on disk are
the single source of truth (there is no second file to drift from them).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lancedb.index import FTS, HnswSq, IvfPq

from pipelines import store
from pipelines.config import IndexSettings, StorageConfig

logger = logging.getLogger(__name__)

# index_stats() without the IVF centroids: read_indexes needs none, and Lance warns on every call
# until told which it should be.
os.environ.setdefault("LANCE_INCLUDE_VECTOR_CENTROIDS", "false")

VECTOR_INDEX = "vector_idx"  # + "_p<partitions>": LanceDB does not report an IVF partition count
FTS_COLUMNS = ("title", "text")
# Rows per IVF partition: HNSW graphs stay fast up to a few tens of thousands of rows per partition;
# IVF_PQ wants about sqrt(rows) partitions.
HNSW_ROWS_PER_PARTITION = 32_768


@dataclass(frozen=True)
class VectorPlan:
    """The vector index a shard of ``rows`` rows should have."""

    kind: str  # "exact", "IVF_HNSW_SQ" or "IVF_PQ"
    num_partitions: int | None = None
    num_sub_vectors: int | None = None
    m: int | None = None


@dataclass(frozen=True)
class ShardIndexes:
    """The indexes a shard table holds now."""

    vector_kind: str  # "exact" when there is no vector index
    num_partitions: int | None
    fts_columns: tuple[str, ...]
    vector_index_name: str | None = None


def plan_vector_index(rows: int, *, dim: int, settings: IndexSettings) -> VectorPlan:
    """Pick the vector index for a shard from its size.

    Args:
        rows: rows in the shard.
        dim: vector dimension.
        settings: thresholds and the ANN kind.

    Returns:
        ``exact`` below ``settings.exact_below_rows`` (or when too few rows to train on), else the ANN
        index with parameters derived from ``rows``.
    """
    if rows < max(settings.exact_below_rows, 256):  # PQ and SQ training need a few hundred rows
        return VectorPlan("exact")
    if settings.vector_index == "ivf_pq":
        return VectorPlan(
            "IVF_PQ", num_partitions=partitions_for("IVF_PQ", rows), num_sub_vectors=_sub_vectors(dim)
        )
    return VectorPlan("IVF_HNSW_SQ", num_partitions=partitions_for("IVF_HNSW_SQ", rows), m=20)


def partitions_for(kind: str, rows: int) -> int:
    """IVF partitions for ``rows`` rows: ~sqrt(rows) for IVF_PQ, ~32k rows each for HNSW kinds."""
    if "HNSW" in kind:
        return max(1, round(rows / HNSW_ROWS_PER_PARTITION))
    return min(4096, max(1, round(math.sqrt(rows))))


def _sub_vectors(dim: int) -> int:
    # 8 dimensions per PQ code (48 for 384), the usual recall/size trade-off; it must divide dim.
    for per_code in (8, 4, 2, 1):
        if dim % per_code == 0:
            return dim // per_code
    return dim


def _vector_config(plan: VectorPlan) -> Any:
    if plan.kind == "IVF_PQ":
        return IvfPq(
            distance_type="cosine", num_partitions=plan.num_partitions, num_sub_vectors=plan.num_sub_vectors
        )
    return HnswSq(distance_type="cosine", num_partitions=plan.num_partitions, m=plan.m or 20)


def query_params(indexes: ShardIndexes, *, k: int, settings: IndexSettings) -> dict[str, int]:
    """LanceDB vector-query parameters for a shard's index (empty for exact search)."""
    if indexes.vector_kind == "exact":
        return {}
    partitions = indexes.num_partitions or 1
    params: dict[str, int] = {}
    if settings.refine_factor:
        params["refine_factor"] = settings.refine_factor
    if "HNSW" in indexes.vector_kind:
        params["nprobes"] = max(1, math.ceil(partitions * settings.hnsw_probe_fraction))
        # The graph must return every candidate the refine step asks for.
        params["ef"] = max(settings.ef, k * (settings.refine_factor or 1))
    else:
        params["nprobes"] = min(partitions, max(20, partitions // 10))
    return params


def read_indexes(table: Any) -> ShardIndexes:
    """What indexes ``table`` holds (read from the table itself)."""
    vector_kind, partitions, fts, name = "exact", None, [], None
    for index in table.list_indices():
        if index.index_type == "FTS":
            fts.extend(index.columns)
        elif "vector" in index.columns:
            stats = table.index_stats(index.name)
            vector_kind, name = str(stats.index_type), index.name
            # LanceDB reports no partition count: index_shard writes it into the name. An index made
            # elsewhere gets the count the planning rule gives for the rows it indexed.
            recorded = re.fullmatch(rf"{VECTOR_INDEX}_p(\d+)", index.name)
            partitions = int(recorded[1]) if recorded else partitions_for(vector_kind, stats.num_indexed_rows)
    return ShardIndexes(vector_kind, partitions, tuple(c for c in FTS_COLUMNS if c in fts), name)


def index_shard(table: Any, *, dim: int, settings: IndexSettings, rebuild: bool = False) -> dict[str, Any]:
    """Give one shard the indexes its size calls for.

    Args:
        table: the open shard table.
        dim: vector dimension.
        settings: index settings.
        rebuild: rebuild indexes that already match the plan (otherwise they only take in new rows).

    Returns:
        A summary: rows, the plan, the query parameters it implies, seconds spent.
    """
    started = time.perf_counter()
    rows = table.count_rows()
    plan = plan_vector_index(rows, dim=dim, settings=settings)
    have = read_indexes(table)
    if plan.kind == "exact":
        if have.vector_index_name:
            table.drop_index(have.vector_index_name)
    elif rebuild or (have.vector_kind, have.num_partitions) != (plan.kind, plan.num_partitions):
        name = f"{VECTOR_INDEX}_p{plan.num_partitions}"
        # The new index first: searches keep an index while it builds, and keep the old one if it fails.
        table.create_index("vector", config=_vector_config(plan), replace=True, name=name)
        if have.vector_index_name and have.vector_index_name != name:
            table.drop_index(have.vector_index_name)  # by its own name, whoever made it
    if settings.fts:
        for column in FTS_COLUMNS:
            if rebuild or column not in have.fts_columns:
                table.create_index(column, config=FTS(), replace=True)
    # Rows added since an index was built are searched by a scan until they are folded in here.
    table.optimize()
    now = read_indexes(table)
    return {
        "shard": table.name,
        "rows": rows,
        "vector_index": now.vector_kind,
        "num_partitions": now.num_partitions,
        "fts": list(now.fts_columns),
        "query_params": query_params(now, k=10, settings=settings),
        "version": table.version,
        "seconds": round(time.perf_counter() - started, 2),
    }


def build(
    db: str | Path | store.Location,
    *,
    settings: IndexSettings,
    rebuild: bool = False,
    lock: StorageConfig | None = None,
    generation: int | None = None,
) -> list[dict[str, Any]]:
    """Index every shard of ``db``'s live generation or of ``generation`` (see ``index_shard``);
    returns one summary per shard.

    Args:
        db: the db.
        settings: the config's index section.
        rebuild: rebuild indexes that already fit.
        lock: take the db's writer lock with these lease and wait settings first (an index build is
            a commit on every shard); None when the caller holds it (ingest's index after_ingest).
        generation: the generation to index (default: the live one).
    """
    loc = store.location(db)
    loc.check()
    store.read_manifest(loc, generation)  # no db (or generation) there fails before the lock is written
    with contextlib.ExitStack() as stack:
        held = None
        if lock is not None:
            held = stack.enter_context(
                store.writer_lock(loc, run_id="index", lease_s=lock.lock_lease_s, wait_s=lock.lock_wait_s)
            )
        manifest = store.read_manifest(loc, generation)
        summaries = []
        for name, table in store.open_shards(loc, generation).items():
            if held is not None:
                held.check()
            logger.info("indexing %s", name)
            summaries.append(index_shard(table, dim=manifest.dim, settings=settings, rebuild=rebuild))
    return summaries
