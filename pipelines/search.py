"""Search the shard tables: embed the query, search every shard, merge the global top-k.

The CLI calls Searcher directly; the Serve deployments call ``search_shard`` (one shard each) and
``serve.merge.merge_topk``, so both paths return the same rows in the same order.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipelines import store
from serve.merge import merge_topk

logger = logging.getLogger(__name__)

RESULT_COLUMNS = ["chunk_id", "doc_id", "chunk_index", "title", "text", "source", "metadata"]


def search_shard(table: Any, vector: np.ndarray, *, k: int, shard: str, where: str | None = None) -> pa.Table:
    """Exact (or indexed) cosine search of one shard table.

    Args:
        table: an open LanceDB table.
        vector: the unit-length query vector.
        k: rows to return from this shard.
        shard: the shard's name, added as a column.
        where: an optional SQL predicate applied before the search.

    Returns:
        RESULT_COLUMNS plus ``score`` (cosine similarity, higher is better) and ``shard``.
    """
    query = table.search(vector).distance_type("cosine").select([*RESULT_COLUMNS, "_distance"]).limit(k)
    if where:
        query = query.where(where, prefilter=True)
    hits = query.to_arrow()
    score = pc.subtract(pa.scalar(1.0, pa.float32()), hits.column("_distance").cast(pa.float32()))
    hits = hits.drop_columns(["_distance"]).append_column("score", score)
    return hits.append_column("shard", pa.array([shard] * hits.num_rows, pa.string()))


class Searcher:
    """Holds a db's shard tables and its embedding model for repeated local searches.

    Args:
        db: the db directory.
        device: where to embed queries (auto, cpu, cuda).
        dtype: precision of the query embedder (auto, fp32, bf16, fp16).
    """

    def __init__(self, db: str | Path, *, device: str = "auto", dtype: str = "auto"):
        self.manifest = store.read_manifest(db)
        self.shards = store.open_shards(db)
        self._device, self._dtype = device, dtype
        self._embedder = None

    @property
    def embedder(self):
        if self._embedder is None:
            from pipelines.embedding import Embedder

            self._embedder = Embedder(model=self.manifest.model, device=self._device, dtype=self._dtype)
        return self._embedder

    def embed(self, texts: list[str]) -> np.ndarray:
        return self.embedder.encode(texts)

    def search_vector(self, vector: np.ndarray, *, k: int = 10, where: str | None = None) -> pa.Table:
        """The global top-k for one query vector, merged across shards."""
        per_shard = [
            search_shard(table, vector, k=k, shard=name, where=where) for name, table in self.shards.items()
        ]
        return merge_topk(per_shard, k=k)

    def search(self, text: str, *, k: int = 10, where: str | None = None) -> pa.Table:
        """Embed ``text`` and return the global top-k chunks, best first."""
        return self.search_vector(self.embed([text])[0], k=k, where=where)
