"""A persistent embedding cache: a LanceDB table in the db dir, keyed by model, format and text.

The key hashes (model id + weights hash, dtype/backend, the exact text the model reads), so a text
embedded once is never embedded again by the same model in the same numeric format, whichever
document or run it comes from. Embedding actors look keys up before a forward pass and hand what
they compute to the run's one `CacheWriter`, which appends it in large batches (one writer per table
at commit time, no fragment per batch); the driver waits for its last append, then compacts the
table and indexes its keys.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray
from lancedb.index import BTree

from pipelines.store.location import Location, location

logger = logging.getLogger(__name__)

TABLE = "_embed_cache"


def schema(dim: int) -> pa.Schema:
    return pa.schema([("key", pa.string()), ("vector", pa.list_(pa.float32(), dim))])


def keys(namespace: str, texts: list[str]) -> list[str]:
    """One key per text: blake2b of the model key and the text."""
    prefix = namespace.encode("utf-8") + b"\0"
    return [
        hashlib.blake2b(prefix + t.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()
        for t in texts
    ]


def create(db: str | Path | Location, dim: int) -> None:
    conn = location(db).connect()
    table = conn.create_table(TABLE, schema=schema(dim), exist_ok=True)
    if table.schema.field("vector").type.list_size != dim:
        raise ValueError(f"{TABLE} in {db} holds vectors of another size; delete it to start over")


class EmbeddingCache:
    """Look-ups and appends from an embedding actor."""

    def __init__(self, db: str | Path | Location, dim: int):
        # Other actors append while this one reads: look for their new versions every few seconds.
        conn = location(db).connect(read_consistency_interval=timedelta(seconds=2))
        self.table = conn.open_table(TABLE)
        self.schema = schema(dim)

    def lookup(self, wanted: list[str]) -> dict[str, np.ndarray]:
        if not wanted:
            return {}
        found: dict[str, np.ndarray] = {}
        unique = sorted(set(wanted))
        for start in range(0, len(unique), 1000):
            quoted = ", ".join(f"'{k}'" for k in unique[start : start + 1000])  # hex digests: no quotes
            rows = (
                self.table.search()
                .where(f"key IN ({quoted})")
                .select(["key", "vector"])
                .limit(None)
                .to_arrow()
            )
            if rows.num_rows:
                vectors = rows.column("vector").combine_chunks().flatten().to_numpy(zero_copy_only=False)
                vectors = vectors.reshape(rows.num_rows, -1)
                for key, vector in zip(rows.column("key").to_pylist(), vectors, strict=True):
                    found[key] = vector
        return found

    def store(self, new_keys: list[str], vectors: np.ndarray) -> None:
        if new_keys:
            self.table.add(_rows(new_keys, vectors, self.schema))


def _rows(new_keys: list[str], vectors: np.ndarray, table_schema: pa.Schema) -> pa.Table:
    dim = table_schema.field("vector").type.list_size
    values = pa.array(np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1), type=pa.float32())
    column = pa.FixedSizeListArray.from_arrays(values, dim)
    return pa.table({"key": pa.array(new_keys, pa.string()), "vector": column}, schema=table_schema)


@ray.remote(num_cpus=0)
class CacheWriter:
    """The run's one writer of the embedding cache: buffers what the actors computed and appends it
    when ``flush_rows`` rows or ``flush_s`` seconds have gathered, so that a killed run still leaves
    all but its last few seconds of embeddings for the rerun."""

    def __init__(self, db: str | Location, dim: int, flush_rows: int = 16_384, flush_s: float = 5.0):
        self.table = location(db).connect().open_table(TABLE)
        self.schema = schema(dim)
        self.flush_rows, self.flush_s = flush_rows, flush_s
        self.keys: list[str] = []
        self.vectors: list[np.ndarray] = []
        self.received = self.written = self.appends = 0
        self.oldest = 0.0  # when the oldest buffered row arrived

    async def add(self, new_keys: list[str], vectors: np.ndarray) -> None:
        if not new_keys:
            return
        if not self.keys:
            self.oldest = time.monotonic()
        self.keys.extend(new_keys)
        self.vectors.append(vectors)
        self.received += len(new_keys)
        if len(self.keys) >= self.flush_rows or time.monotonic() - self.oldest >= self.flush_s:
            self._flush()

    async def finish(self, expected: int, timeout_s: float = 60.0) -> dict[str, int]:
        """Waits until ``expected`` rows have arrived (the actors send them before their batch moves
        on, but the sends may still be on their way), appends the rest and says what it wrote."""
        deadline = time.monotonic() + timeout_s
        while self.received < expected and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if self.received < expected:
            logger.warning("embedding cache: %d of %d rows arrived", self.received, expected)
        self._flush()
        return {"received": self.received, "written": self.written, "appends": self.appends}

    def _flush(self) -> None:
        if self.keys:
            self.table.add(_rows(self.keys, np.concatenate(self.vectors), self.schema))
            self.written += len(self.keys)
            self.appends += 1
            self.keys, self.vectors = [], []


def compact(db: str | Path | Location) -> int:
    """Merge the many small appends of a run into few files and index the keys.

    Returns:
        Rows in the cache.
    """
    try:
        table = location(db).connect().open_table(TABLE)
    except ValueError:  # LanceDB: "Table '_embed_cache' was not found"
        return 0
    rows = table.count_rows()
    if rows == 0:
        return 0
    # Old versions go after a while, not at once: another run may be reading one.
    table.optimize(cleanup_older_than=timedelta(minutes=10))
    if not any(index.columns == ["key"] for index in table.list_indices()):
        table.create_index("key", config=BTree())
    return rows
