"""Capacity planning: scale a measured ingest run (its report) up to N documents and a query load.

Pure functions over the report dict (see report.build_report); no Ray, no model. The plan assumes
throughput scales linearly with embedding actors, and that the new documents look like the run's.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from pipelines.config import IndexSettings
from pipelines.store import RUNS_DIR, Location, location

logger = logging.getLogger(__name__)

# Measured for this project's uncached Python ingress: about 10 QPS per router on a 2-core machine.
DEFAULT_QPS_PER_REPLICA = 10.0
# For the storage estimate without a measured db size; both measured on SciFact (all-MiniLM-L6-v2):
# about 3.9 bytes of chunk text per token, and about 290 bytes of ids, title, source, model and run id.
TEXT_BYTES_PER_TOKEN = 4.0
ROW_OVERHEAD_BYTES = 300
_EPS = 1e-9  # so that a node count that is whole up to float error is not rounded up
# The serving process tree before its rows: Ray's own processes, Serve's controller, proxy and HAProxy
# manager, the CLI, the router with its query model (`embedpipe serve`, summed RSS after load,
# benchmarks/serve_scale.py on a 2-core AVX-512 EPYC: 2.54 GB on SciFact's 9,945 rows, 2.82 GB on 1M rows
# of which 0.26 GB codes; README, "Search past RAM").
SERVE_BASE_BYTES = 2.55e9


def plan(
    report: dict[str, Any],
    *,
    docs: int,
    qps: float | None = None,
    nodes: int | None = None,
    hours: float | None = None,
    hourly_usd: float | None = None,
    db_bytes: int | None = None,
    dim: int | None = None,
    qps_per_replica: float = DEFAULT_QPS_PER_REPLICA,
    shards: int | None = None,
    serve_nodes: int = 1,
    index: IndexSettings | None = None,
) -> dict[str, Any]:
    """Estimate chunks, tokens, storage, time, nodes and cost to ingest ``docs`` documents, and the
    memory a serving node holds for them.

    The rate comes from the report's embedding stage (the stage whose name holds "Embedder"), so
    start-up (Ray, model load) is left out; without that stage it falls back to the run's wall time.

    Args:
        report: a run report, as written by ``report.build_report``.
        docs: how many documents to plan for.
        qps: the query load to serve; adds the replicas needed to ``serving``.
        nodes: embedding actors to plan with (one GPU each when the run used GPUs, else one CPU
            node). Defaults to the run's own actor count. Not together with ``hours``.
        hours: a deadline; the plan then gives the nodes needed to finish within it.
        hourly_usd: price of one node per hour; defaults to the report's ``cost.hourly_usd``.
        db_bytes: the size of the run's db directory on disk, to measure bytes per chunk (leave out
            the ``_embed_cache`` table unless the plan keeps a cache).
        dim: the embedding dimension (the db manifest's ``dim``), for the storage estimate when
            ``db_bytes`` is not given.
        qps_per_replica: queries per second one router or shard-searcher replica serves.
        shards: shard tables to plan serving for (default: the run's).
        serve_nodes: nodes the shards are served from (one shard group each).
        index: the index settings the shards will be indexed with (default: the defaults).

    Returns:
        ``{"basis": ..., "estimate": ..., "serving": ... or None, "notes": [...]}``; see
        :func:`format_plan` for a readable rendering. Unknown values are None.

    Raises:
        ValueError: for a report that measured nothing (no ingested docs, no wall time, no
            embeddings computed) or an argument out of range.
    """
    _check_args(
        docs=docs,
        qps=qps,
        nodes=nodes,
        hours=hours,
        hourly_usd=hourly_usd,
        db_bytes=db_bytes,
        dim=dim,
        qps_per_replica=qps_per_replica,
    )
    notes: list[str] = []
    run_id = str(report.get("run_id", "?"))
    ingested = int((report.get("docs") or {}).get("ingested") or 0)
    wall_s = float(report.get("wall_s") or 0.0)
    if ingested <= 0:
        raise ValueError(
            f"Run {run_id!r} ingested 0 documents, so it measured no throughput. "
            "Plan from a run that ingested documents."
        )
    if wall_s <= 0:
        raise ValueError(f"Run {run_id!r} has a wall time of {wall_s!r} s; a plan needs a positive one.")

    stage, stage_s = _embed_stage(report.get("stages") or {})
    if stage is not None:
        basis, basis_s = "embed stage", stage_s
    else:
        basis, basis_s = "run wall time", wall_s
        notes.append("No embed stage time in the report: the rate includes start-up, so it is pessimistic.")

    actors, gpus_per_actor = _actors(report, notes)
    chunks_written = int((report.get("chunks") or {}).get("written") or 0)
    tokens = int(report.get("tokens_embedded") or 0)
    chunks_per_doc = chunks_written / ingested
    tokens_per_doc = tokens / ingested

    docs_per_s = ingested / basis_s / actors
    computed = (report.get("embeddings") or {}).get("computed")
    if computed is not None and chunks_written and computed < chunks_written:
        if computed <= 0:
            raise ValueError(
                f"Run {run_id!r} took all {chunks_written} embeddings from the cache, so it measured no "
                "embedding throughput. Plan from a run that computed embeddings."
            )
        # New documents hit no cache: count only the embeddings the run actually computed.
        docs_per_s *= computed / chunks_written
        notes.append(
            f"{chunks_written - computed} of {chunks_written} embeddings came from the cache; "
            "the rate counts computed ones only."
        )

    bytes_per_chunk, bytes_source = _bytes_per_chunk(
        report, db_bytes=db_bytes, dim=dim, chunks_written=chunks_written, tokens=tokens, notes=notes
    )

    est_chunks = round(docs * chunks_per_doc)
    node_seconds = docs / docs_per_s  # time on one actor
    if hours is not None:
        mode = "hours"
        nodes = max(1, math.ceil(node_seconds / (hours * 3600) - _EPS))
    else:
        mode = "nodes"
        nodes = nodes if nodes is not None else actors
    est_hours = node_seconds / nodes / 3600

    price, price_source = _price(report, hourly_usd)
    if price:
        cost = est_hours * nodes * price
    else:
        cost = None
        notes.append("Cost unknown: no hourly price (pass hourly_usd, or set cost.hourly_usd in the config).")
    if price_source == "report":
        notes.append("The report's cost.hourly_usd is taken as the price of one node.")
    notes.append("Assumes throughput scales linearly with nodes and new documents look like the run's.")

    storage = est_chunks * bytes_per_chunk if bytes_per_chunk is not None else None
    serving = None
    if qps is not None:
        serving = {
            "qps": qps,
            "qps_per_replica": qps_per_replica,
            "replicas": math.ceil(qps / qps_per_replica - _EPS),
            "shards": len(report.get("shards") or {}) or None,
        }
        if qps_per_replica == DEFAULT_QPS_PER_REPLICA:
            notes.append(
                f"qps_per_replica defaults to {DEFAULT_QPS_PER_REPLICA:g}, measured for this project's "
                "uncached Python ingress (one router on a 2-core machine)."
            )

    memory = None
    shard_count = shards or len(report.get("shards") or {}) or None
    if dim and shard_count:
        memory = serving_memory(
            rows=est_chunks, shards=shard_count, dim=dim, nodes=serve_nodes, settings=index or IndexSettings()
        )

    return {
        "basis": {
            "run_id": run_id,
            "model": report.get("model"),
            "docs_ingested": ingested,
            "wall_s": wall_s,
            "basis": basis,
            "basis_s": basis_s,
            "basis_stage": stage,
            "actors": actors,
            "gpus_per_actor": gpus_per_actor,
            "unit": "GPU" if gpus_per_actor else "CPU node",
            "docs_per_s_per_actor": docs_per_s,
            "chunks_per_doc": chunks_per_doc,
            "tokens_per_doc": tokens_per_doc,
            "bytes_per_chunk": bytes_per_chunk,
            "bytes_per_chunk_source": bytes_source,
        },
        "estimate": {
            "docs": docs,
            "chunks": est_chunks,
            "tokens": round(docs * tokens_per_doc),
            "storage_bytes": round(storage) if storage is not None else None,
            "storage_gb": storage / 1e9 if storage is not None else None,
            "mode": mode,
            "target_hours": hours,
            "nodes": nodes,
            "gpus": math.ceil(nodes * gpus_per_actor - _EPS) if gpus_per_actor else 0,
            "hours": est_hours,
            "hourly_usd": price or None,
            "hourly_usd_source": price_source,
            "cost_usd": cost,
        },
        "serving": serving,
        "memory": memory,
        "notes": notes,
    }


def serving_memory(
    *, rows: int, shards: int, dim: int, nodes: int, settings: IndexSettings
) -> dict[str, Any]:
    """The memory a serving node holds for ``rows`` rows in ``shards`` shards served from ``nodes``
    nodes: the process tree's fixed part and, per row it serves, what its index holds
    (``pipelines.index.bytes_per_row``: ANN codes and row ids, or a small shard's vectors; never text).

    Returns:
        ``{"rows_per_shard", "vector_index", "bytes_per_row", "rows_per_node", "node_bytes", ...}``.
    """
    from pipelines import index

    per_shard = math.ceil(rows / shards)
    kind = index.plan_vector_index(per_shard, dim=dim, settings=settings).kind
    per_row = index.bytes_per_row(kind, dim=dim, settings=settings, rows=per_shard)
    per_node = math.ceil(shards / nodes) * per_shard
    return {
        "rows_per_shard": per_shard,
        "vector_index": kind,
        "bytes_per_row": per_row,
        "nodes": nodes,
        "rows_per_node": per_node,
        "base_bytes": SERVE_BASE_BYTES,
        "node_bytes": round(SERVE_BASE_BYTES + per_node * per_row),
    }


def format_plan(result: dict[str, Any]) -> str:
    """A short plain-text table of a :func:`plan` result.

    Args:
        result: what :func:`plan` returned.

    Returns:
        Lines of ``label  value``, then the notes.
    """
    b, e, s = result["basis"], result["estimate"], result["serving"]
    unit, actors = b["unit"], _count(b["actors"], "actor")
    per_chunk = "unknown (pass db_bytes or dim)"
    if b["bytes_per_chunk"] is not None:
        per_chunk = f"{b['bytes_per_chunk']:,.0f} bytes ({b['bytes_per_chunk_source']})"
    storage = f"{e['storage_gb']:,.2f} GB" if e["storage_gb"] is not None else "unknown"
    nodes = _count(e["nodes"], unit)
    if e["gpus"] and e["gpus"] != e["nodes"]:
        nodes += f" ({_count(e['gpus'], 'GPU')} at {b['gpus_per_actor']:g} per actor)"
    if e["mode"] == "hours":
        nodes += f" to finish within {e['target_hours']:g} h"
    cost = "unknown (no hourly price)"
    if e["cost_usd"] is not None:
        cost = f"${e['cost_usd']:,.2f} at ${e['hourly_usd']:g}/h per {unit}"
    rows = [
        ("basis", f"run {b['run_id']}: {b['docs_ingested']:,} docs in {b['basis_s']:,.1f} s ({b['basis']})"),
        ("rate", f"{b['docs_per_s_per_actor']:,.2f} docs/s per {unit}, measured with {actors}"),
        ("per doc", f"{b['chunks_per_doc']:,.2f} chunks, {b['tokens_per_doc']:,.1f} tokens"),
        ("per chunk", per_chunk),
        ("chunks", f"{e['chunks']:,}"),
        ("tokens", f"{e['tokens']:,}"),
        ("storage", storage),
        ("nodes", nodes),
        ("time", f"{e['hours']:,.2f} h"),
        ("cost", cost),
    ]
    if s is not None:
        # On one node each router replica searches every shard itself; on a cluster every query goes to
        # every shard group, so each group needs as many replicas as the routers.
        serving = f"{s['qps']:g} QPS -> {s['replicas']} router replicas"
        if s["shards"]:
            serving += (
                f", each searching the {s['shards']} shards in-process (on a cluster: {s['replicas']} "
                "replicas per shard group)"
            )
        serving += f" ({s['qps_per_replica']:g} QPS each)"
        rows.append(("serving", serving))
    m = result.get("memory")
    if m is not None:
        rows.append((
            "serve memory",
            f"{m['node_bytes'] / 1e9:,.2f} GB per node: {m['base_bytes'] / 1e9:.1f} GB of processes + "
            f"{m['rows_per_node']:,} rows x {m['bytes_per_row']} B ({m['vector_index']} shards of "
            f"{m['rows_per_shard']:,} rows, {_count(m['nodes'], 'node')})",
        ))  # fmt: skip
    width = max(len(label) for label, _ in rows)
    lines = [
        f"capacity plan for {e['docs']:,} docs",
        *(f"  {label:<{width}}  {value}" for label, value in rows),
    ]
    lines.extend(f"  - {note}" for note in result["notes"])
    return "\n".join(lines)


def latest_report(db: str | Path | Location) -> dict[str, Any]:
    """The newest run report of a db that embedded documents (a run whose documents were all
    unchanged measured no throughput).

    Args:
        db: the db (a folder or a URI); reports live in ``_runs/<run_id>.json``.

    Returns:
        The report with the latest ``started_at`` (a report without one counts by its file's
        mtime). Files that are not JSON objects are skipped.

    Raises:
        FileNotFoundError: when the db holds no readable run report.
    """
    loc = location(db)
    newest: tuple[float, str] | None = None
    found: dict[str, Any] | None = None
    for obj in loc.list(RUNS_DIR + "/"):
        if not obj["path"].endswith(".json"):
            continue
        try:
            data = json.loads(loc.read_bytes(obj["path"]) or b"")
            started = data.get("started_at")
            when = float(started) if isinstance(started, int | float) else obj["last_modified"].timestamp()
            if not (data.get("docs") or {}).get("ingested"):
                continue
        except (OSError, ValueError, AttributeError) as exc:
            logger.warning("skipping unreadable run report %s: %s", obj["path"], exc)
            continue
        if newest is None or (when, obj["path"]) > newest:
            newest, found = (when, obj["path"]), data
    if found is None:
        raise FileNotFoundError(
            f"No report of a run that ingested documents in {loc.uri}/{RUNS_DIR}: "
            f"ingest into {loc.uri!r} first."
        )
    return found


def _check_args(**args: Any) -> None:
    if not isinstance(args["docs"], int) or args["docs"] <= 0:
        raise ValueError(f"docs must be a positive whole number, got {args['docs']!r}.")
    if args["nodes"] is not None and args["hours"] is not None:
        raise ValueError("Give nodes (to get the time) or hours (to get the nodes), not both.")
    if args["nodes"] is not None and (not isinstance(args["nodes"], int) or args["nodes"] <= 0):
        raise ValueError(f"nodes must be a positive whole number, got {args['nodes']!r}.")
    for name in ("qps", "hours", "qps_per_replica", "db_bytes", "dim"):
        if args[name] is not None and not args[name] > 0:
            raise ValueError(f"{name} must be positive, got {args[name]!r}.")
    if args["hourly_usd"] is not None and not args["hourly_usd"] >= 0:
        raise ValueError(f"hourly_usd must be 0 (unknown) or more, got {args['hourly_usd']!r}.")


def _embed_stage(stages: dict[str, Any]) -> tuple[str | None, float]:
    """The embedding stage's name and wall time; Ray Data may fuse it with chunking (then both count)."""
    best: tuple[str | None, float] = (None, 0.0)
    for name, stats in stages.items():
        wall = float((stats or {}).get("wall_s") or 0.0) if isinstance(stats, dict) else 0.0
        if "Embedder" in name and wall > best[1]:
            best = (name, wall)
    return best


def _actors(report: dict[str, Any], notes: list[str]) -> tuple[int, float]:
    pool = (report.get("resources") or {}).get("embed_actors") or {}
    low, high = pool.get("min_size"), pool.get("max_size")
    gpus = float(pool.get("num_gpus") or 0.0)
    worked = int((report.get("embeddings") or {}).get("actors") or 0)
    if worked > 0:  # the actors that actually embedded batches, newer reports only
        return worked, gpus
    actors = int(high or low or 1)
    if not pool:
        notes.append("The report names no embedding actors; assumed 1.")
    elif low and high and low != high:
        # The pool could grow from min to max; dividing by max gives the lower, safer rate per actor.
        notes.append(f"The run's actor pool ranged {low}-{high}; the rate per actor assumes {high}.")
    return max(actors, 1), gpus


def _bytes_per_chunk(
    report: dict[str, Any],
    *,
    db_bytes: int | None,
    dim: int | None,
    chunks_written: int,
    tokens: int,
    notes: list[str],
) -> tuple[float | None, str | None]:
    rows = sum(int(n) for n in (report.get("shards") or {}).values())
    if db_bytes is not None and rows > 0:
        # shards holds the db's rows after the run, which is what db_bytes measures too.
        return db_bytes / rows, f"measured: db size / {rows:,} rows"
    if db_bytes is not None:
        notes.append("db_bytes was given but the report names no shard rows; storage is estimated.")
    dim = dim or report.get("dim") or (report.get("embeddings") or {}).get("dim")
    if not dim:
        notes.append("Storage unknown: pass db_bytes (the db directory's size) or the embedding dim.")
        return None, None
    tokens_per_chunk = tokens / chunks_written if chunks_written else 0.0
    estimate = int(dim) * 4 + tokens_per_chunk * TEXT_BYTES_PER_TOKEN + ROW_OVERHEAD_BYTES
    return estimate, f"estimated: {int(dim)}-dim float32 vector + text + ids, no index"


def _price(report: dict[str, Any], hourly_usd: float | None) -> tuple[float, str | None]:
    if hourly_usd is not None:
        return float(hourly_usd), "argument"
    price = float((report.get("cost") or {}).get("hourly_usd") or 0.0)
    return price, "report" if price else None


def _count(n: int, unit: str) -> str:
    return f"{n:,} {unit}" if n == 1 else f"{n:,} {unit}s"
