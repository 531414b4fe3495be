"""The LanceDB layout: a db directory holds N shard tables and a manifest; serve/ reads it too.

Writes go in two steps so that readers never see part of a run: pipeline tasks append Arrow batches
to per-run staging tables, and the driver then moves each staging table into its shard with one
commit (an ``add``, or a ``merge_insert`` when documents are replaced), one new version per shard.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lancedb
import pyarrow as pa
import pyarrow.compute as pc
from lancedb.index import BTree

logger = logging.getLogger(__name__)

MANIFEST = "embedpipe.json"
RUNS_DIR = "_runs"
STAGING_DIR = "_staging"
_LAYOUT_VERSION = 1


class StoreError(ValueError):
    """A db directory that does not exist, or that does not match what is asked of it."""


def shard_name(index: int) -> str:
    return f"shard_{index:03d}"


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


@dataclass(frozen=True)
class Manifest:
    shards: int
    model: str
    dim: int

    def to_json(self) -> str:
        return json.dumps({"layout": _LAYOUT_VERSION, **self.__dict__}, indent=2)


def read_manifest(db: str | Path) -> Manifest:
    path = Path(db) / MANIFEST
    if not path.exists():
        raise StoreError(f"{str(db)!r} is not an embedpipe db (no {MANIFEST}); run ingest first.")
    data = json.loads(path.read_text())
    return Manifest(shards=int(data["shards"]), model=str(data["model"]), dim=int(data["dim"]))


def init_db(db: str | Path, manifest: Manifest) -> Manifest:
    """Create the db (manifest and empty shard tables), or check that an existing one matches."""
    root = Path(db)
    if (root / MANIFEST).exists():
        existing = read_manifest(root)
        if existing.shards != manifest.shards:
            raise StoreError(
                f"{str(db)!r} has {existing.shards} shards, but {manifest.shards} were asked for. "
                f"Use --shards {existing.shards} or a new --db."
            )
        if (existing.model, existing.dim) != (manifest.model, manifest.dim):
            raise StoreError(
                f"{str(db)!r} holds {existing.model!r} vectors (dim {existing.dim}); it cannot take "
                f"{manifest.model!r} (dim {manifest.dim}). Use a new --db."
            )
        return existing
    root.mkdir(parents=True, exist_ok=True)
    conn = lancedb.connect(str(root))
    for i in range(manifest.shards):
        conn.create_table(shard_name(i), schema=table_schema(manifest.dim), exist_ok=True)
    (root / MANIFEST).write_text(manifest.to_json())
    return manifest


def open_shards(db: str | Path) -> dict[str, Any]:
    """The shard tables of a db, by name, opened at their latest versions."""
    manifest = read_manifest(db)
    conn = lancedb.connect(str(db))
    return {shard_name(i): conn.open_table(shard_name(i)) for i in range(manifest.shards)}


def shard_rows(db: str | Path) -> dict[str, int]:
    return {name: table.count_rows() for name, table in open_shards(db).items()}


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


def has_source(db: str | Path, source: str) -> bool:
    """Whether any shard holds rows read from ``source`` (used by eval to skip a re-ingest)."""
    if not (Path(db) / MANIFEST).exists():
        return False
    quoted = source.replace("'", "''")
    return any(t.count_rows(f"source = '{quoted}'") > 0 for t in open_shards(db).values())


class Staging:
    """Per-run staging tables, one per shard, that pipeline tasks append to from any node."""

    def __init__(self, db: str | Path, run_id: str, manifest: Manifest):
        self.db, self.run_id, self.manifest = str(db), run_id, manifest
        self.path = Path(db) / STAGING_DIR / run_id

    def create(self) -> None:
        conn = lancedb.connect(str(self.path))
        for i in range(self.manifest.shards):
            conn.create_table(shard_name(i), schema=table_schema(self.manifest.dim), exist_ok=True)

    def append(self, rows: pa.Table) -> dict[str, int]:
        """Append chunk rows (with a ``shard`` column) to their staging tables; returns rows per shard."""
        conn = lancedb.connect(str(self.path))
        schema = table_schema(self.manifest.dim)
        written: dict[str, int] = {}
        shards = rows.column("shard")
        for shard in pc.unique(shards).to_pylist():
            part = rows.filter(pc.equal(shards, shard)).select(schema.names).cast(schema)
            conn.open_table(shard_name(shard)).add(part)
            written[shard_name(shard)] = part.num_rows
        return written

    def staged_doc_ids(self, shard: int) -> list[str]:
        """Ids of the documents staged for a shard, once per staged copy."""
        table = lancedb.connect(str(self.path)).open_table(shard_name(shard))
        reader = table.search().where("chunk_index = 0").select(["doc_id"]).limit(None).to_batches(8192)
        return [doc_id for batch in reader for doc_id in batch.column("doc_id").to_pylist()]

    def drop_docs(self, shard: int, doc_ids: list[str]) -> None:
        if doc_ids:
            table = lancedb.connect(str(self.path)).open_table(shard_name(shard))
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
        source = lancedb.connect(str(self.path)).open_table(name)
        rows = source.count_rows()
        if rows == 0:
            return 0
        reader = source.search().limit(None).to_batches(batch_size=4096)
        table = lancedb.connect(self.db).open_table(name)
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
        table.create_index("doc_id", config=BTree(), replace=True)
        logger.info("committed %d rows to %s (version %d)", rows, name, table.version)
        return rows

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        parent = self.path.parent
        if parent.exists() and not any(parent.iterdir()):
            parent.rmdir()


# --- Ray Data stages that touch the store --------------------------------------------------------


def mark_unchanged(batch: pa.Table, *, db: str, shards: int) -> pa.Table:
    """Add a ``status`` column: "unchanged" for documents stored with the same content_hash."""
    docs = batch.to_pylist()
    status = ["ok"] * len(docs)
    by_shard: dict[int, list[int]] = {}
    for i, doc in enumerate(docs):
        if not doc["error"]:
            by_shard.setdefault(shard_of(doc["doc_id"], shards), []).append(i)
    conn = lancedb.connect(db)
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
    ]
)


def write_chunks(batch: pa.Table, *, staging: Staging, model: str) -> pa.Table:
    """Append embedded chunks to staging and return one summary row for the run report."""
    import time

    status = batch.column("status")
    ok = batch.filter(pc.equal(status, "ok"))
    shard_rows: dict[str, int] = {}
    if ok.num_rows:
        n = staging.manifest.shards
        shards = pa.array([shard_of(d, n) for d in ok.column("doc_id").to_pylist()], pa.int32())
        ok = (
            ok.append_column("shard", shards)
            .append_column("model", pa.array([model] * ok.num_rows, pa.string()))
            .append_column("run_id", pa.array([staging.run_id] * ok.num_rows, pa.string()))
        )
        shard_rows = staging.append(ok)
    failed_rows = batch.filter(pc.equal(status, "failed")).select(["doc_id", "source", "error"])
    failed = [[r["doc_id"], r["source"], r["error"]] for r in failed_rows.to_pylist()]
    summary = {
        "chunks": ok.num_rows,
        "tokens": int(pc.sum(ok.column("n_tokens")).as_py() or 0) if ok.num_rows else 0,
        "ingested": int(pc.sum(pc.equal(ok.column("chunk_index"), 0)).as_py() or 0) if ok.num_rows else 0,
        "unchanged": int(pc.sum(pc.equal(status, "unchanged")).as_py() or 0),
        "failed": json.dumps(failed),
        "shard_rows": json.dumps(shard_rows),
        "finished_at": time.time(),
    }
    return pa.Table.from_pylist([summary], schema=WRITE_SUMMARY)
