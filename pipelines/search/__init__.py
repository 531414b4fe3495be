"""Search the shard tables: embed the query, search every shard, merge the global top-k.

One code path for ``embedpipe query``, eval and Serve:

- ``shard.py``: one shard (LanceDB exact/ANN, BM25, or a small shard's vectors in memory), following new
  table versions; hits are ids, scores and row ids, and ``fetch_rows`` reads the final top-k's text;
- ``group.py``: shards searched side by side in one process, each query's rows merged (``ShardGroup``),
  and the merge of several groups' answers (``combine``);
- ``merge.py``: the top-k merge and reciprocal rank fusion, pure functions on Arrow tables.

The query embedder (the same backend and precision for the CLI and Serve) is
``pipelines.embedding.query``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from pipelines import store
from pipelines.config import IndexSettings
from pipelines.embedding.query import query_embedder
from pipelines.search.group import GroupAnswer, Partial, PinnedTables, ShardGroup, combine
from pipelines.search.merge import merge_topk, rrf_fuse
from pipelines.search.shard import (
    KEY_COLUMNS,
    RESULT_COLUMNS,
    MemoryShard,
    NoTextIndexError,
    Pinned,
    QueryTimeout,
    RowCache,
    Shard,
    ShardError,
    fetch_rows,
    search_shard,
    search_shard_async,
    text_search_shard,
)

__all__ = [
    "KEY_COLUMNS", "RESULT_COLUMNS", "GroupAnswer", "MemoryShard", "NoTextIndexError", "Partial",
    "Pinned", "PinnedTables", "QueryTimeout", "RowCache", "Searcher", "Shard", "ShardError", "ShardGroup",
    "combine", "fetch_rows", "merge_topk", "rrf_fuse", "search_shard",
    "search_shard_async", "text_search_shard",
]  # fmt: skip


class Searcher:
    """A db's shards and its query embedder, for repeated local searches (``embedpipe query``, eval).

    Args:
        db: the db directory.
        device: where to embed queries (auto, cpu, cuda).
        dtype: precision of the query embedder (auto: see ``query_precision``; fp32, bf16, fp16, int8).
        index: index settings (ANN query parameters).
        memory_rows: unindexed shards up to this many rows are searched in memory (0: through LanceDB).
        generation: the db generation to search (default: the live one).
    """

    def __init__(
        self,
        db: str | Path | store.Location,
        *,
        device: str = "auto",
        dtype: str = "auto",
        index: IndexSettings | None = None,
        memory_rows: int = 0,
        generation: int | None = None,
    ):
        db = store.location(db)
        self.manifest = store.read_manifest(db, generation)
        self.manifest.require_ready(repr(db.uri))
        # One search process: the tables stay at the versions opened here.
        self.group = ShardGroup(
            db,
            refresh_s=float("inf"),
            index=index,
            memory_rows=memory_rows,
            generation=self.manifest.generation,
        )
        self._device, self._dtype = device, dtype
        self._embedder = None

    @property
    def embedder(self):
        if self._embedder is None:
            self._embedder = query_embedder(
                self.manifest.model, vectors=self.manifest.vectors, device=self._device, dtype=self._dtype
            )
        return self._embedder

    def embed(self, texts: list[str]) -> np.ndarray:
        return self.embedder.encode(texts)

    def _one(self, answer: GroupAnswer, *, k: int, depth: int | None = None, rrf_k: int = 60) -> pa.Table:
        (part,) = answer.answers
        if isinstance(part, Exception):
            raise part
        (rows,) = fetch_rows([combine([part], k=k, depth=depth, rrf_k=rrf_k)], answer.tables)
        return rows

    def search_vector(
        self, vector: np.ndarray, *, k: int = 10, where: str | None = None, exact: bool = False
    ) -> pa.Table:
        """The global top-k rows for one query vector, merged across shards."""
        return self._one(self.group.search(vector, [k], [where], exact=exact), k=k)

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
        if mode not in ("vector", "hybrid"):
            raise ValueError(f"Unsupported search mode: {mode!r}. Supported: vector, hybrid.")
        if vector is None:
            vector = self.embed([text])[0]
        if mode == "vector":
            return self.search_vector(vector, k=k, where=where)
        depth = max(k, candidates)
        answer = self.group.search(vector, [depth], [where], [text])
        return self._one(answer, k=k, depth=depth, rrf_k=rrf_k)
