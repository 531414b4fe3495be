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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lancedb.index import FTS, HnswSq, IvfPq, IvfRq, IvfSq

from pipelines import bm25, codes, store
from pipelines.config import IndexSettings, StorageConfig, TextIndexSettings

logger = logging.getLogger(__name__)

# index_stats() without the IVF centroids: read_indexes needs none, and Lance warns on every call
# until told which it should be.
os.environ.setdefault("LANCE_INCLUDE_VECTOR_CENTROIDS", "false")

VECTOR_INDEX = "vector_idx"  # + "_p<partitions>": LanceDB does not report an IVF partition count
FTS_COLUMNS = ("title", "text")
# Rows per IVF partition: HNSW graphs stay fast up to a few tens of thousands of rows per partition;
# IVF_PQ wants about sqrt(rows) partitions; IVF_RQ and IVF_SQ follow settings.rows_per_partition.
HNSW_ROWS_PER_PARTITION = 32_768
MAX_PARTITIONS = 4096
# An index is rebuilt when the partitions its rows call for are this many times more (or fewer) than
# it has; below that, new rows are added to it incrementally (optimize), in time for the new rows.
REBUILD_RATIO = 2.0
HELD_TEXT_BYTES = 1536  # a held small shard's ids, title and text per row (pipelines.search.MemoryShard)
# ... and its rows' keyword postings (bm25.HeldTerms; index.bm25_postings): 948 B a row measured over
# title and text of 3,000 SciFact documents (8 B a posting, 16 a distinct term, 16 a row)
HELD_POSTINGS_BYTES = 1024
KINDS = {"ivf_rq": "IVF_RQ", "ivf_sq": "IVF_SQ", "ivf_pq": "IVF_PQ", "ivf_hnsw_sq": "IVF_HNSW_SQ"}


@dataclass(frozen=True)
class VectorPlan:
    """The vector index a shard of ``rows`` rows should have."""

    kind: str  # "exact", "IVF_RQ", "IVF_SQ", "IVF_PQ" or "IVF_HNSW_SQ"
    num_partitions: int | None = None
    num_sub_vectors: int | None = None
    m: int | None = None
    num_bits: int | None = None


@dataclass(frozen=True)
class ShardIndexes:
    """The indexes a shard table holds now."""

    vector_kind: str  # "exact" when there is no vector index
    num_partitions: int | None
    fts_columns: tuple[str, ...]
    vector_index_name: str | None = None
    unindexed_rows: int = 0  # rows added since the vector index was built or updated (searched by a scan)


def plan_vector_index(rows: int, *, dim: int, settings: IndexSettings) -> VectorPlan:
    """Pick the vector index for a shard from its size.

    Args:
        rows: rows in the shard.
        dim: vector dimension.
        settings: thresholds and the ANN kind.

    Returns:
        ``exact`` below ``settings.exact_below_rows`` (or when too few rows to train on), else the ANN
        index with parameters derived from ``rows`` (see README, "Indexes", for the measurements).
    """
    if rows < max(settings.exact_below_rows, 256):  # quantizer training needs a few hundred rows
        return VectorPlan("exact")
    kind = KINDS[settings.vector_index]
    if kind == "IVF_RQ" and dim % 8:  # RaBitQ packs 8 dimensions a byte
        kind = "IVF_SQ"
    partitions = partitions_for(kind, rows, settings)
    if kind == "IVF_PQ":
        return VectorPlan(kind, num_partitions=partitions, num_sub_vectors=_sub_vectors(dim))
    if kind == "IVF_HNSW_SQ":
        return VectorPlan(kind, num_partitions=partitions, m=20)
    return VectorPlan(
        kind, num_partitions=partitions, num_bits=settings.rq_bits if kind == "IVF_RQ" else None
    )


def partitions_for(kind: str, rows: int, settings: IndexSettings | None = None) -> int:
    """IVF partitions for ``rows`` rows: ~sqrt(rows) for IVF_PQ, ~32k rows each for HNSW kinds, one
    per ``settings.rows_per_partition`` rows for IVF_RQ and IVF_SQ."""
    if "HNSW" in kind:
        return max(1, round(rows / HNSW_ROWS_PER_PARTITION))
    if kind == "IVF_PQ":
        return min(MAX_PARTITIONS, max(1, round(math.sqrt(rows))))
    per = (settings or IndexSettings()).rows_per_partition
    return min(MAX_PARTITIONS, max(1, round(rows / per)))


def _sub_vectors(dim: int) -> int:
    # 8 dimensions per PQ code (48 for 384), the usual recall/size trade-off; it must divide dim.
    for per_code in (8, 4, 2, 1):
        if dim % per_code == 0:
            return dim // per_code
    return dim


def _vector_config(plan: VectorPlan) -> Any:
    if plan.kind == "IVF_RQ":
        return IvfRq(distance_type="cosine", num_partitions=plan.num_partitions, num_bits=plan.num_bits or 1)
    if plan.kind == "IVF_SQ":
        return IvfSq(distance_type="cosine", num_partitions=plan.num_partitions)
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
        wanted = max(settings.min_nprobes, math.ceil(settings.probe_factor * math.sqrt(partitions)))
        params["nprobes"] = min(partitions, wanted)
    return params


def bytes_per_row(kind: str, *, dim: int, settings: IndexSettings | None = None, rows: int = 0) -> int:
    """What a serving process holds per row of a shard searched this way (the estimate ``embedpipe
    plan`` uses; /healthz reports what is held): a small exact shard's vectors, row ids and the
    columns an answer shows, held by its group; an indexed shard's in-memory codes and ids
    (``settings.codes``), or else its IVF index's codes and row ids in LanceDB's index cache. The
    text of an indexed shard's rows is never held (an answer reads its top k rows from the table).
    ``rows``: the shard's, which pick the codes' bits when ``settings.codes_bits`` is None."""
    settings = settings or IndexSettings()
    if kind != "exact" and settings.codes:  # the in-memory codes (pipelines.codes), not LanceDB's index
        bits = codes.bits_for(rows, settings)
        return codes.bytes_per_row(dim, bits, settings.codes_rows_per_partition)
    if kind == "exact":
        # float32 vector and norm, row id and position, tie rank, and the columns an answer shows
        # (ids, title, text: ~1 KB for a SciFact chunk, up to ~1.5 KB for a full 256-token one), and
        # the postings keyword search scores them from
        return 4 * dim + 32 + HELD_TEXT_BYTES + (HELD_POSTINGS_BYTES if settings.bm25_postings else 0)
    code = {
        "IVF_RQ": math.ceil(dim * settings.rq_bits / 8) + 12,  # packed bits and three float factors
        "IVF_SQ": dim,
        "IVF_PQ": _sub_vectors(dim),
        "IVF_HNSW_SQ": dim + 2 * 20 * 4,  # SQ codes and the graph's links
    }[kind]
    # The row id, and ~24 B a row of LanceDB's index metadata in its caches (measured: 223-239 B a row
    # held for 384-dim 4-bit IVF_RQ at 1M and 10M rows, against 212 B of codes and row ids).
    return code + 8 + 24


def read_indexes(table: Any) -> ShardIndexes:
    """What indexes ``table`` holds (read from the table itself)."""
    vector_kind, partitions, fts, name, unindexed = "exact", None, [], None, 0
    for index in table.list_indices():
        if index.index_type == "FTS":
            fts.extend(index.columns)
        elif "vector" in index.columns:
            stats = table.index_stats(index.name)
            vector_kind, name = str(stats.index_type), index.name
            unindexed = int(stats.num_unindexed_rows or 0)
            # LanceDB reports no partition count: index_shard writes it into the name. An index made
            # elsewhere gets the count the planning rule gives for the rows it indexed.
            recorded = re.fullmatch(rf"{VECTOR_INDEX}_p(\d+)", index.name)
            partitions = int(recorded[1]) if recorded else partitions_for(vector_kind, stats.num_indexed_rows)
    return ShardIndexes(vector_kind, partitions, tuple(c for c in FTS_COLUMNS if c in fts), name, unindexed)


def _fts_options(table: Any) -> dict[str, dict[str, Any]]:
    """Each full-text index's tokenizer options, by column (as TextIndexSettings names them)."""
    keys = TextIndexSettings.model_fields
    found = {}
    for index in table.list_indices():
        if index.index_type == "FTS":
            details = dict(index.index_details or {})
            # LanceDB reports the n-gram bounds under other names than it takes them.
            details.setdefault("ngram_min_length", details.get("min_ngram_length"))
            details.setdefault("ngram_max_length", details.get("max_ngram_length"))
            found[index.columns[0]] = {key: details.get(key) for key in keys}
    return found


def _fits(have: ShardIndexes, plan: VectorPlan) -> bool:
    """Whether the index a shard has can take its new rows incrementally: the planned kind, and a
    partition count within REBUILD_RATIO of the plan's (rows grew or shrank by less than that)."""
    if have.vector_kind != plan.kind or not have.num_partitions or not plan.num_partitions:
        return False
    ratio = have.num_partitions / plan.num_partitions
    return 1 / REBUILD_RATIO < ratio < REBUILD_RATIO


def index_shard(
    table: Any,
    *,
    dim: int,
    settings: IndexSettings,
    rebuild: bool = False,
    codes_at: store.Location | None = None,
) -> dict[str, Any]:
    """Give one shard the indexes its size calls for.

    A shard whose vector index fits its size (same kind, partitions within REBUILD_RATIO of the
    plan) keeps it: rows added since are folded in by ``optimize``, in time for the new rows, not for
    the shard. Otherwise the index is built again (the old one serves until the new one is in).

    Args:
        table: the open shard table.
        dim: vector dimension.
        settings: index settings.
        rebuild: rebuild indexes even where they fit.
        codes_at: where the generation's tables are: the shard's in-memory codes (pipelines.codes)
            are brought up to date there, after the table's compaction (None: left alone).

    Returns:
        A summary: rows, the plan, what was done (built, updated or kept), the query parameters it
        implies, seconds spent.
    """
    started = time.perf_counter()
    rows = table.count_rows()
    plan = plan_vector_index(rows, dim=dim, settings=settings)
    have = read_indexes(table)
    action = "exact"
    if plan.kind == "exact":
        if have.vector_index_name:
            table.drop_index(have.vector_index_name)
    elif rebuild or not _fits(have, plan):
        name = f"{VECTOR_INDEX}_p{plan.num_partitions}"
        # The new index first: searches keep an index while it builds, and keep the old one if it fails.
        table.create_index("vector", config=_vector_config(plan), replace=True, name=name)
        if have.vector_index_name and have.vector_index_name != name:
            table.drop_index(have.vector_index_name)  # by its own name, whoever made it
        action = "built"
    else:
        action = "updated" if have.unindexed_rows else "kept"
    if settings.fts:
        options = settings.text.options()
        built_with = _fts_options(table)
        # Built again when it splits text otherwise than the config says (index.text changed), and when
        # rows changed since the BM25 statistics were stored: LanceDB's index, updated in place, keeps
        # counting replaced rows in its own statistics, and the exact global rescoring bounds a row's
        # score by its local one (pipelines/bm25.py), so both must describe the same rows.
        held = bm25.pointer(codes_at, table.name) if codes_at is not None else None
        changed = held is not None and held["version"] != table.version
        for column in FTS_COLUMNS:
            if rebuild or changed or column not in have.fts_columns or built_with.get(column) != options:
                table.create_index(column, config=FTS(**options), replace=True)
    # Rows added since an index was built are searched by a scan until they are folded in here.
    table.optimize()
    now = read_indexes(table)
    # After the compaction, which gives rows new ids: the codes follow them.
    codes_done = None
    if codes_at is not None:
        if now.vector_kind != "exact" and settings.codes:
            codes_done = codes.update(table, codes_at, settings=settings, rebuild=rebuild)
        elif codes.pointer(codes_at, table.name) is not None:
            codes.drop(codes_at, table.name)
    # The term statistics that score BM25 alike in every shard (pipelines.bm25), at this version.
    terms = None
    if codes_at is not None:
        if now.fts_columns:
            terms = bm25.update(table, codes_at, now.fts_columns, settings.text.options())
        elif bm25.pointer(codes_at, table.name) is not None:
            bm25.drop(codes_at, table.name)
    return {
        "shard": table.name,
        "rows": rows,
        "vector_index": now.vector_kind,
        "num_partitions": now.num_partitions,
        "action": action,
        "new_rows": have.unindexed_rows if action == "updated" else None,
        "fts": list(now.fts_columns),
        "query_params": query_params(now, k=10, settings=settings),
        "codes": codes_done,
        "bm25": terms,
        "version": table.version,
        "seconds": round(time.perf_counter() - started, 2),
    }


def _index_one(
    loc: store.Location, generation: int, name: str, *, settings: IndexSettings, rebuild: bool
) -> dict[str, Any]:
    """Index one shard of ``loc``'s ``generation`` (a Ray task, or a call in this process)."""
    manifest = store.read_manifest(loc, generation)
    tables = store.tables_of(loc, manifest)
    table = tables.connect().open_table(name)
    import faiss
    import ray

    faiss.omp_set_num_threads(max(1, int(settings.build_cpus)))  # the CPUs this task reserved
    summary = index_shard(table, dim=manifest.dim, settings=settings, rebuild=rebuild, codes_at=tables)
    summary["node"] = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    return summary


def build(
    db: str | Path | store.Location,
    *,
    settings: IndexSettings,
    rebuild: bool = False,
    lock: StorageConfig | None = None,
    generation: int | None = None,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Index every shard of ``db``'s live generation or of ``generation`` (see ``index_shard``);
    returns one summary per shard, in shard order.

    With Ray running (``embedpipe index`` starts or joins one), each shard is one Ray task that
    reserves ``settings.build_cpus`` CPUs: a cluster builds its shards on every node, and one machine
    builds as many at once as its CPUs allow. Without Ray, the shards are built here one by one. Each
    table has one writer (its task); the writer lock is held here for the whole build.

    Args:
        db: the db.
        settings: the config's index section.
        rebuild: rebuild indexes that already fit.
        lock: take the db's writer lock with these lease and wait settings first (an index build is
            a commit on every shard); None when the caller holds it (ingest's index after_ingest).
        generation: the generation to index (default: the live one).
        progress: called with each shard's summary as it finishes.
    """
    import ray

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
        names = [store.shard_name(i) for i in range(manifest.shards)]
        summaries: dict[str, dict[str, Any]] = {}

        def done(summary: dict[str, Any]) -> None:
            if held is not None:
                held.check()
            summaries[summary["shard"]] = summary
            if progress is not None:
                progress(summary)

        if ray.is_initialized():
            # SPREAD: the shards' builds go to every node that has the CPUs, not first to the driver's.
            task = ray.remote(_index_one).options(
                num_cpus=settings.build_cpus, scheduling_strategy="SPREAD", max_retries=2
            )
            pending = [
                task.remote(loc, manifest.generation, name, settings=settings, rebuild=rebuild)
                for name in names
            ]
            while pending:
                ready, pending = ray.wait(pending, num_returns=1)
                done(ray.get(ready[0]))
        else:
            for name in names:
                if held is not None:
                    held.check()
                logger.info("indexing %s", name)
                done(_index_one(loc, manifest.generation, name, settings=settings, rebuild=rebuild))
    return [summaries[name] for name in names]
