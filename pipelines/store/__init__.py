"""The LanceDB layout: a db (a folder or an s3:// gs:// az:// prefix) holds one or more generations of
N shard tables, and a manifest that says which generation is live (``manifest``); serve/ reads it too.
``location`` says where a db lives, ``lock`` who may write it.

Writes go in two steps so that readers never see part of a run: pipeline tasks write Arrow batches
as Lance data files (fragments) of per-run staging tables without committing them, and the driver adds
them with one commit per staging table, then moves each staging table into its shard with one commit
(an ``add``, or a ``merge_insert`` when documents are replaced), one new version per shard. Write tasks
never commit, so however many run at once they never contend on a table's commit (lancedb#725: many
small concurrent appends exhaust Lance's commit retries), and a fragment written by a task attempt whose
result never reached the driver (Ray ran the task again) is never committed at all.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import secrets
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipelines.store.location import Location, LocationError, is_uri, location  # noqa: F401  (re-exported)
from pipelines.store.lock import LockLost, LockTimeout, WriterLock, writer_lock  # noqa: F401  (re-exported)
from pipelines.store.manifest import (  # noqa: F401  (re-exported)
    BUILDING,
    MANIFEST,
    READY,
    Catalog,
    Manifest,
    StoreError,
    drop,
    new_generation,
    promote,
    read_catalog,
    read_manifest,
    shard_name,
    tables_of,
    update_generation,
    write_catalog,
)

logger = logging.getLogger(__name__)

RUNS_DIR = "_runs"
STAGING_DIR = "_staging"
ERRORS_TABLE = "_errors"  # one row per failed document per run; not a shard, so never searched


def shard_of(doc_id: str, shards: int) -> int:
    """The shard of a document: a stable hash of its id, so all its chunks live together."""
    digest = hashlib.blake2b(doc_id.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % shards


def table_schema(dim: int) -> pa.Schema:
    """The columns of every shard table."""
    return pa.schema(
        [
            ("chunk_id", pa.string()),
            ("doc_id", pa.string()),
            ("chunk_index", pa.int32()),
            ("title", pa.string()),
            ("text", pa.string()),
            ("vector", pa.list_(pa.float32(), dim)),
            ("n_tokens", pa.int32()),
            ("char_start", pa.int32()),
            ("char_end", pa.int32()),
            ("source", pa.string()),
            ("content_hash", pa.string()),
            ("metadata", pa.string()),
            ("model", pa.string()),
            ("run_id", pa.string()),
        ]
    )


def _staging_schema(dim: int) -> pa.Schema:
    # "attempt" names the write task attempt that staged a row: Ray retries a task whose worker died,
    # and only the attempt whose result reached the driver may be committed.
    return table_schema(dim).append(pa.field("attempt", pa.string()))


ERRORS_SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("doc_id", pa.string()),
        ("source", pa.string()),
        ("reason", pa.string()),
        ("time", pa.timestamp("us", tz="UTC")),
    ]
)


def record_failures(db: str | Path | Location, *, run_id: str, failed: list[list[str]], at: float) -> int:
    """Append a run's failed documents (``[doc_id, source, reason]``) to the db's ``_errors`` table."""
    if not failed:
        return 0
    when = datetime.fromtimestamp(at, UTC)
    rows = pa.Table.from_pylist(
        [{"run_id": run_id, "doc_id": d, "source": s, "reason": r, "time": when} for d, s, r in failed],
        schema=ERRORS_SCHEMA,
    )
    location(db).connect().create_table(ERRORS_TABLE, schema=ERRORS_SCHEMA, exist_ok=True).add(rows)
    return rows.num_rows


def clean_staging(db: str | Path | Location, *, keep: str | None = None) -> list[str]:
    """Remove the staging folders of runs other than ``keep``; returns their run ids.

    Call it holding the writer lock (lock.writer_lock): only the holder stages, so any other run's
    staging belongs to a run that died before its commit and can never commit it.
    """
    loc = location(db)
    removed = [run for run in loc.folders(STAGING_DIR) if run != keep]
    for run in removed:
        loc.delete_tree(f"{STAGING_DIR}/{run}")
        logger.warning("removed the staging of run %s, which stopped before its commit", run)
    return removed


@contextlib.contextmanager
def machine_lock(folder: str | Path, name: str) -> Iterator[None]:
    """Wait for and hold the lock ``name`` in a folder of this machine (e.g. so that two runs on one
    machine quantize a model into its cache once)."""
    path = Path(folder) / f".{name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def record_vectors(db: str | Path | Location, dtype: str, generation: int | None = None) -> Manifest:
    """Note in the manifest the format of the vectors a run added: the first run's, or "mixed"."""
    manifest = read_manifest(db, generation)
    recorded = dtype if manifest.vectors in (None, dtype) else "mixed"
    if recorded != manifest.vectors:  # readers see the old manifest or the new one
        manifest = update_generation(db, manifest.generation, vectors=recorded)
    return manifest


def is_db(db: str | Path | Location) -> bool:
    """Whether ``db`` holds an embedpipe db (its manifest)."""
    return location(db).exists(MANIFEST)


def init_db(db: str | Path | Location, manifest: Manifest) -> Manifest:
    """Create the db (generation 1: empty shard tables, then the manifest), or check that its live
    generation matches.

    Raises:
        LocationError: an object store that cannot be reached (nothing is written then).
        StoreError: an existing db whose live generation has another model or shard count.
    """
    loc = location(db)
    loc.check()
    if loc.exists(MANIFEST):
        existing = read_manifest(loc)
        if existing.shards != manifest.shards:
            raise StoreError(
                f"{loc.uri!r} has {existing.shards} shards, but {manifest.shards} were asked for. "
                f"Use --shards {existing.shards}, or change it with `embedpipe reshard --db {loc.uri} "
                f"--shards {manifest.shards}`."
            )
        if (existing.model, existing.dim) != (manifest.model, manifest.dim):
            raise StoreError(
                f"{loc.uri!r} holds {existing.model!r} vectors (dim {existing.dim}); it cannot take "
                f"{manifest.model!r} (dim {manifest.dim}). Move it to the new model with `embedpipe "
                f"reembed --db {loc.uri} --model {manifest.model}`, or use a new --db."
            )
        return existing
    manifest = dataclasses.replace(manifest, generation=1, path="", state=READY, created=time.time())
    create_tables(loc, manifest)
    write_catalog(loc, Catalog(live=1, generations={1: manifest}))  # last: a db is one once its tables exist
    return manifest


def create_tables(db: str | Path | Location, manifest: Manifest) -> None:
    """The empty shard tables of a generation."""
    conn = tables_of(db, manifest).connect()
    for i in range(manifest.shards):
        conn.create_table(shard_name(i), schema=table_schema(manifest.dim), exist_ok=True)


def open_shards(db: str | Path | Location, generation: int | None = None) -> dict[str, Any]:
    """The shard tables of a generation (default: the live one), by name, at their latest versions."""
    manifest = read_manifest(db, generation)
    conn = tables_of(db, manifest).connect()
    return {shard_name(i): conn.open_table(shard_name(i)) for i in range(manifest.shards)}


def shard_rows(db: str | Path | Location, generation: int | None = None) -> dict[str, int]:
    return {name: table.count_rows() for name, table in open_shards(db, generation).items()}


def _sql_list(values: list[str]) -> str:
    return ", ".join("'" + v.replace("'", "''") + "'" for v in values)


def stored_hashes(table: Any, doc_ids: list[str]) -> dict[str, str]:
    """content_hash of the documents among ``doc_ids`` that the table already holds."""
    if not doc_ids:
        return {}
    found = (
        table.search()
        .where(f"chunk_index = 0 AND doc_id IN ({_sql_list(doc_ids)})")
        .select(["doc_id", "content_hash"])
        .limit(None)
        .to_arrow()
    )
    return dict(zip(found["doc_id"].to_pylist(), found["content_hash"].to_pylist(), strict=True))


def has_source(db: str | Path | Location, source: str) -> bool:
    """Whether any shard holds rows read from ``source`` (used by eval to skip a re-ingest)."""
    if not is_db(db):
        return False
    quoted = source.replace("'", "''")
    return any(t.count_rows(f"source = '{quoted}'") > 0 for t in open_shards(db).values())


class Staging:
    """Per-run staging tables, one per shard, that pipeline tasks append to from any node."""

    def __init__(
        self, db: str | Path | Location, run_id: str, manifest: Manifest, *, under: Location | None = None
    ):
        # ``under``: where to stage (default the db's root; a generation being built stages in its own
        # folder, out of the way of ingest runs, which remove whatever other runs staged at the root).
        self.db, self.run_id, self.manifest = location(db), run_id, manifest
        self.root = under or self.db
        self.path = self.root.join(STAGING_DIR, run_id)

    def create(self) -> None:
        conn = self.path.connect()
        for i in range(self.manifest.shards):
            conn.create_table(shard_name(i), schema=_staging_schema(self.manifest.dim), exist_ok=True)

    def append(self, rows: pa.Table) -> tuple[dict[str, int], dict[str, list[str]]]:
        """Write chunk rows (with ``shard`` and ``attempt`` columns) as uncommitted fragments of their
        staging tables (Lance's fragment API, as lance-ray's distributed writer does); ``add`` commits them.

        Returns:
            Rows written per shard, and per shard the fragments' metadata (JSON) to hand to ``add``.
        """
        from lance.fragment import write_fragments

        schema = _staging_schema(self.manifest.dim)
        written: dict[str, int] = {}
        fragments: dict[str, list[str]] = {}
        shards = rows.column("shard")
        for shard in pc.unique(shards).to_pylist():
            part = rows.filter(pc.equal(shards, shard)).select(schema.names).cast(schema)
            name = shard_name(shard)
            made = write_fragments(
                part, self._uri(name), schema=schema, storage_options=self.path.storage_options or None
            )
            written[name] = part.num_rows
            fragments[name] = [json.dumps(f.to_json()) for f in made]
        return written, fragments

    def add(self, shard: int, fragments: list[str]) -> int:
        """Commit fragments that ``append`` wrote to a shard's staging table, in one commit.

        Returns:
            Rows added.
        """
        if not fragments:
            return 0
        import lance
        from lance.fragment import FragmentMetadata

        uri, options = self._uri(shard_name(shard)), self.path.storage_options or None
        made = [FragmentMetadata.from_json(f) for f in fragments]
        version = lance.dataset(uri, storage_options=options).version
        lance.LanceDataset.commit(
            uri, lance.LanceOperation.Append(made), read_version=version, storage_options=options
        )
        return sum(f.physical_rows for f in made)

    def _uri(self, name: str) -> str:
        return self.path.join(f"{name}.lance").uri

    def drop_attempts(self, shard: int, *, keep: set[str]) -> int:
        """Delete rows staged by task attempts other than ``keep`` (those whose results the run used).

        Returns:
            How many attempts were dropped.
        """
        table = self.path.connect().open_table(shard_name(shard))
        staged = table.search().select(["attempt"]).limit(None).to_arrow().column("attempt")
        orphans = sorted(set(pc.unique(staged).to_pylist()) - keep)
        if orphans:
            table.delete(f"attempt IN ({_sql_list(orphans)})")
            logger.warning("%s: dropped rows of %d retried write attempts", shard_name(shard), len(orphans))
        return len(orphans)

    def staged_doc_ids(self, shard: int) -> list[str]:
        """Ids of the documents staged for a shard, once per staged copy."""
        table = self.path.connect().open_table(shard_name(shard))
        reader = table.search().where("chunk_index = 0").select(["doc_id"]).limit(None).to_batches(8192)
        return [doc_id for batch in reader for doc_id in batch.column("doc_id").to_pylist()]

    def drop_docs(self, shard: int, doc_ids: list[str]) -> None:
        if doc_ids:
            table = self.path.connect().open_table(shard_name(shard))
            table.delete(f"doc_id IN ({_sql_list(doc_ids)})")

    def commit(self, shard: int, *, replaced: list[str]) -> int:
        """Move one staging table into its shard in a single commit.

        Args:
            shard: the shard index.
            replaced: documents whose old chunks must go in the same commit (changed documents).

        Returns:
            Rows committed.
        """
        name = shard_name(shard)
        source = self.path.connect().open_table(name)
        rows = source.count_rows()
        if rows == 0:
            return 0
        columns = table_schema(self.manifest.dim).names
        reader = source.search().select(columns).limit(None).to_batches(batch_size=4096)
        table = tables_of(self.db, self.manifest).connect().open_table(name)
        if replaced:
            # New chunks in and old ones (surplus chunks of a shrunk document too) out, at once.
            (
                table.merge_insert("chunk_id")
                .when_matched_update_all()
                .when_not_matched_insert_all()
                .when_not_matched_by_source_delete(f"doc_id IN ({_sql_list(replaced)})")
                .execute(reader)
            )
        else:
            table.add(reader)
        # Later runs look documents up by id to skip unchanged ones.
        from lancedb.index import BTree

        table.create_index("doc_id", config=BTree(), replace=True)
        logger.info("committed %d rows to %s (version %d)", rows, name, table.version)
        return rows

    def commit_attempts(self, shard: int, attempts: list[str]) -> int:
        """Add the rows staged by ``attempts`` to the shard in one commit: for a generation being built,
        which no one searches yet and whose stale documents were deleted before.

        Returns:
            Rows committed.
        """
        if not attempts:
            return 0
        name = shard_name(shard)
        staged = self.path.connect().open_table(name)
        where = f"attempt IN ({_sql_list(attempts)})"
        rows = staged.count_rows(where)
        if rows:
            columns = table_schema(self.manifest.dim).names
            reader = staged.search().where(where).select(columns).limit(None).to_batches(batch_size=4096)
            tables_of(self.db, self.manifest).connect().open_table(name).add(reader)
        return rows

    def discard(self) -> None:
        self.root.delete_tree(f"{STAGING_DIR}/{self.run_id}")


# --- Ray Data stages that touch the store --------------------------------------------------------


def mark_unchanged(batch: pa.Table, *, db: str | Location, shards: int) -> pa.Table:
    """Add a ``status`` column: "unchanged" for documents stored with the same content_hash."""
    docs = batch.to_pylist()
    status = ["ok"] * len(docs)
    by_shard: dict[int, list[int]] = {}
    for i, doc in enumerate(docs):
        if not doc["error"]:
            by_shard.setdefault(shard_of(doc["doc_id"], shards), []).append(i)
    conn = location(db).connect()
    for shard, rows in by_shard.items():
        table = conn.open_table(shard_name(shard))
        if table.count_rows() == 0:
            continue
        stored = stored_hashes(table, [docs[i]["doc_id"] for i in rows])
        for i in rows:
            if stored.get(docs[i]["doc_id"]) == docs[i]["content_hash"]:
                status[i] = "unchanged"
    return batch.append_column("status", pa.array(status, pa.string()))


WRITE_SUMMARY = pa.schema(
    [
        ("chunks", pa.int64()),
        ("tokens", pa.int64()),
        ("ingested", pa.int64()),
        ("unchanged", pa.int64()),
        ("failed", pa.string()),  # JSON list of [doc_id, source, reason]
        ("shard_rows", pa.string()),  # JSON {shard name: rows}
        ("finished_at", pa.float64()),
        ("attempt", pa.string()),  # the write attempt whose staged rows this summary stands for
        ("fragments", pa.string()),  # JSON {shard name: [fragment metadata]}: Staging.add commits them
        ("doc_ids", pa.string()),  # JSON list of every document id this batch saw, for --prune
        ("embed_stats", pa.string()),  # JSON list of the embedding stage's per-batch stats
    ]
)


def write_chunks(batch: pa.Table, *, staging: Staging, model: str, report_ids: bool = False) -> pa.Table:
    """Write embedded chunks as staging fragments and return one summary row: for the run report, and
    the fragments the driver commits (only those of summaries that reached it).

    With ``report_ids`` the summary lists every document id of the batch (``--prune`` needs them;
    other runs do not carry them to the driver).
    """
    status = batch.column("status")
    ok = batch.filter(pc.equal(status, "ok"))
    shard_rows: dict[str, int] = {}
    fragments: dict[str, list[str]] = {}
    attempt = secrets.token_hex(8)
    if ok.num_rows:
        n = staging.manifest.shards
        shards = pa.array([shard_of(d, n) for d in ok.column("doc_id").to_pylist()], pa.int32())
        ok = (
            ok.append_column("shard", shards)
            .append_column("model", pa.array([model] * ok.num_rows, pa.string()))
            .append_column("run_id", pa.array([staging.run_id] * ok.num_rows, pa.string()))
            .append_column("attempt", pa.array([attempt] * ok.num_rows, pa.string()))
        )
        shard_rows, fragments = staging.append(ok)
    failed_rows = batch.filter(pc.equal(status, "failed")).select(["doc_id", "source", "error"])
    failed = [[r["doc_id"], r["source"], r["error"]] for r in failed_rows.to_pylist()]
    first = pc.or_(pc.equal(batch.column("chunk_index"), 0), pc.not_equal(status, "ok"))
    seen = batch.filter(first).column("doc_id").to_pylist() if report_ids else []
    stats = batch.column("embed_stats").drop_null().to_pylist() if "embed_stats" in batch.column_names else []
    summary = {
        "chunks": ok.num_rows,
        "tokens": int(pc.sum(ok.column("n_tokens")).as_py() or 0) if ok.num_rows else 0,
        "ingested": int(pc.sum(pc.equal(ok.column("chunk_index"), 0)).as_py() or 0) if ok.num_rows else 0,
        "unchanged": int(pc.sum(pc.equal(status, "unchanged")).as_py() or 0),
        "failed": json.dumps(failed),
        "shard_rows": json.dumps(shard_rows),
        "finished_at": time.time(),
        "attempt": attempt,
        "fragments": json.dumps(fragments),
        "doc_ids": json.dumps(seen),
        "embed_stats": json.dumps([json.loads(x) for x in stats]),
    }
    return pa.Table.from_pylist([summary], schema=WRITE_SUMMARY)


def prune(db: str | Path | Location, *, source: str, keep: set[str]) -> list[str]:
    """Delete the documents read from ``source`` that are not in ``keep`` (they left the source).

    A document's chunks all live in one shard and go in one delete, so no reader sees part of one.

    Args:
        db: the db directory.
        source: the resolved source path: a file, or a directory whose files are the source.
        keep: ids of every document the run saw (ingested, unchanged or failed).

    Returns:
        The ids deleted.
    """
    prefix = source.rstrip("/") + "/"
    deleted: list[str] = []
    for table in open_shards(db).values():
        if table.count_rows() == 0:
            continue
        rows = table.search().where("chunk_index = 0").select(["doc_id", "source"]).limit(None).to_arrow()
        gone = [
            doc_id
            for doc_id, src in zip(
                rows.column("doc_id").to_pylist(), rows.column("source").to_pylist(), strict=True
            )
            if (src == source or src.startswith(prefix)) and doc_id not in keep
        ]
        for start in range(0, len(gone), 1000):
            table.delete(f"doc_id IN ({_sql_list(gone[start : start + 1000])})")
        deleted.extend(gone)
    return deleted
