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
from lancedb.query import MatchQuery, MultiMatchQuery

from pipelines import store
from pipelines.config import IndexSettings
from pipelines.index import ShardIndexes, query_params, read_indexes
from serve.merge import merge_topk, rrf_fuse

logger = logging.getLogger(__name__)

RESULT_COLUMNS = ["chunk_id", "doc_id", "chunk_index", "title", "text", "source", "metadata"]


def search_shard(
    table: Any,
    vector: np.ndarray,
    *,
    k: int,
    shard: str,
    where: str | None = None,
    params: dict[str, int] | None = None,
    exact: bool = False,
) -> pa.Table:
    """Cosine search of one shard table: exact, or through its ANN index.

    Args:
        table: an open LanceDB table.
        vector: the unit-length query vector.
        k: rows to return from this shard.
        shard: the shard's name, added as a column.
        where: an optional SQL predicate applied before the search.
        params: ANN query parameters (``nprobes``, ``ef``, ``refine_factor``; see pipelines.index).
        exact: scan every row even when the table has an ANN index.

    Returns:
        RESULT_COLUMNS plus ``score`` (cosine similarity, higher is better) and ``shard``.
    """
    query = table.search(vector).distance_type("cosine").select([*RESULT_COLUMNS, "_distance"]).limit(k)
    if exact:
        query = query.bypass_vector_index()
    else:
        for name, value in (params or {}).items():
            query = getattr(query, name)(value)
    if where:
        query = query.where(where, prefilter=True)
    hits = query.to_arrow()
    score = pc.subtract(pa.scalar(1.0, pa.float32()), hits.column("_distance").cast(pa.float32()))
    return _finish(hits.drop_columns(["_distance"]), score, shard)


def text_search_shard(
    table: Any, text: str, *, k: int, shard: str, columns: tuple[str, ...], where: str | None = None
) -> pa.Table:
    """BM25 full-text search of one shard over ``columns`` (each needs an FTS index).

    Returns:
        RESULT_COLUMNS plus ``score`` (BM25, higher is better) and ``shard``.
    """
    if not columns:
        raise NoTextIndexError(f"{shard} has no full-text index; run `embedpipe index --db DIR` first.")
    match = MatchQuery(text, columns[0]) if len(columns) == 1 else MultiMatchQuery(text, list(columns))
    query = table.search(match, query_type="fts").select([*RESULT_COLUMNS, "_score"]).limit(k)
    if where:
        query = query.where(where, prefilter=True)
    hits = query.to_arrow()
    return _finish(hits.drop_columns(["_score"]), hits.column("_score").cast(pa.float32()), shard)


def _finish(hits: pa.Table, score: Any, shard: str) -> pa.Table:
    hits = hits.select(RESULT_COLUMNS).append_column("score", score)
    return hits.append_column("shard", pa.array([shard] * hits.num_rows, pa.string()))


def query_dtype(dtype: str, device: str) -> str:
    """The precision queries are embedded in: ``auto`` is fp32 on a CPU (what Serve's OpenVINO
    export runs too, so /search and embedpipe query agree on every CPU; bf16 would differ by ~1e-3)
    and fp16 on a GPU."""
    if dtype != "auto":
        return dtype
    return "fp16" if device == "cuda" else "fp32"


class NoTextIndexError(ValueError):
    """Hybrid search on a shard without full-text indexes."""


class MemoryShard:
    """Exact cosine search over a shard held in memory: its vectors and the result columns.

    A LanceDB query costs a few milliseconds of planning even on a tiny table; a small shard searched
    many times (the Serve deployments) answers from memory instead, many queries in one matrix
    product. The rows, scores and order equal ``search_shard(..., exact=True)``: score is
    1 - cosine distance, and rows tied with the k-th best are kept or cut by chunk_id, as the merge
    orders them.

    Args:
        table: an open LanceDB table, at the version to hold.
        shard: the shard's name, added as a column.
    """

    def __init__(self, table: Any, *, shard: str):
        data = table.to_arrow().select([*RESULT_COLUMNS, "vector"])
        vectors = data.column("vector").combine_chunks()
        dim = vectors.type.list_size
        flat = vectors.flatten()  # respects the array's offset, unlike .values
        self.vectors = np.asarray(flat.to_numpy(zero_copy_only=False), dtype=np.float32).reshape(-1, dim)
        norms = np.linalg.norm(self.vectors, axis=1)
        self.norms = np.where(norms > 0, norms, 1.0).astype(np.float32)
        self.rows = data.drop_columns(["vector"]).combine_chunks()  # one chunk: cheaper take per query
        # Position of each row in chunk_id order: ties in score are cut by it, as merge_topk does.
        chunk_ids = np.asarray(self.rows.column("chunk_id").to_pylist(), dtype=object)
        self.id_rank = np.argsort(np.argsort(chunk_ids))
        self.shard = shard

    @property
    def num_rows(self) -> int:
        return self.rows.num_rows

    @property
    def nbytes(self) -> int:
        return self.vectors.nbytes + self.rows.nbytes

    def search(self, vectors: np.ndarray, ks: list[int]) -> list[pa.Table]:
        """The top ``ks[i]`` rows for each query vector ``vectors[i]``, best first."""
        queries = np.atleast_2d(np.asarray(vectors, dtype=np.float32))
        qnorms = np.linalg.norm(queries, axis=1, keepdims=True)
        cosine = (queries @ self.vectors.T) / (np.where(qnorms > 0, qnorms, 1.0) * self.norms)
        scores = (1.0 - (1.0 - cosine)).astype(np.float32)  # as LanceDB: 1 - cosine distance
        return [self._top(row, k) for row, k in zip(scores, ks, strict=True)]

    def _top(self, scores: np.ndarray, k: int) -> pa.Table:
        n = min(k, scores.size)
        if n == 0:
            idx = np.zeros(0, dtype=np.int64)
        else:
            if n < scores.size:
                cutoff = scores[np.argpartition(-scores, n - 1)[:n]].min()
                idx = np.flatnonzero(scores >= cutoff)  # every row tied with the k-th
            else:
                idx = np.arange(scores.size)
            idx = idx[np.lexsort((self.id_rank[idx], -scores[idx]))][:n]
        return _finish(self.rows.take(idx), pa.array(scores[idx], pa.float32()), self.shard)


class Searcher:
    """Holds a db's shard tables and its embedding model for repeated local searches.

    Args:
        db: the db directory.
        device: where to embed queries (auto, cpu, cuda).
        dtype: precision of the query embedder (auto, fp32, bf16, fp16).
        index: index settings (ANN query parameters).
    """

    def __init__(
        self,
        db: str | Path,
        *,
        device: str = "auto",
        dtype: str = "auto",
        index: IndexSettings | None = None,
    ):
        self.manifest = store.read_manifest(db)
        self.shards = store.open_shards(db)
        self.indexes: dict[str, ShardIndexes] = {name: read_indexes(t) for name, t in self.shards.items()}
        self.index_settings = index or IndexSettings()
        self._device, self._dtype = device, dtype
        self._embedder = None

    @property
    def embedder(self):
        if self._embedder is None:
            from pipelines.backends import resolve_device
            from pipelines.embedding import Embedder

            device = resolve_device(self._device)
            dtype = query_dtype(self._dtype, device)
            self._embedder = Embedder(model=self.manifest.model, device=device, dtype=dtype)
        return self._embedder

    def embed(self, texts: list[str]) -> np.ndarray:
        return self.embedder.encode(texts)

    def search_vector(
        self, vector: np.ndarray, *, k: int = 10, where: str | None = None, exact: bool = False
    ) -> pa.Table:
        """The global top-k for one query vector, merged across shards."""
        per_shard = [
            search_shard(
                table, vector, k=k, shard=name, where=where, exact=exact,
                params=query_params(self.indexes[name], k=k, settings=self.index_settings),
            )
            for name, table in self.shards.items()
        ]  # fmt: skip
        return merge_topk(per_shard, k=k)

    def search_text(self, text: str, *, k: int = 10, where: str | None = None) -> pa.Table:
        """The global BM25 top-k, merged across shards."""
        per_shard = [
            text_search_shard(
                table, text, k=k, shard=name, where=where, columns=self.indexes[name].fts_columns
            )
            for name, table in self.shards.items()
        ]
        return merge_topk(per_shard, k=k)

    def search(
        self,
        text: str,
        *,
        k: int = 10,
        where: str | None = None,
        mode: str = "vector",
        candidates: int = 100,
        rrf_k: int = 60,
        vector: np.ndarray | None = None,
    ) -> pa.Table:
        """The global top-k chunks for ``text``, best first.

        Args:
            text: the query.
            k: chunks to return.
            where: an optional SQL predicate over metadata columns.
            mode: ``vector`` (cosine) or ``hybrid`` (vector and BM25 fused by reciprocal rank).
            candidates: hybrid only: candidates taken from each ranking before fusion.
            rrf_k: hybrid only: the fusion constant.
            vector: the query's embedding, when already computed.
        """
        if vector is None:
            vector = self.embed([text])[0]
        if mode == "vector":
            return self.search_vector(vector, k=k, where=where)
        if mode != "hybrid":
            raise ValueError(f"Unsupported search mode: {mode!r}. Supported: vector, hybrid.")
        n = max(k, candidates)
        rankings = [self.search_vector(vector, k=n, where=where), self.search_text(text, k=n, where=where)]
        return rrf_fuse(rankings, k=k, rrf_k=rrf_k)
