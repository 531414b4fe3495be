"""Search the shard tables: embed the query, search every shard, merge the global top-k.

One code path for ``embedpipe query``, eval and Serve:

- ``shard.py``: one shard (LanceDB exact/ANN, BM25, or a small shard's vectors in memory), following new
  table versions; hits are ids, scores and row ids, and ``fetch_rows`` reads the final top-k's text;
- ``group.py``: shards searched side by side in one process, each query's rows merged (``ShardGroup``),
  and the merge of several groups' answers (``combine``);
- ``merge.py``: the top-k merge and the fusions (convex, reciprocal rank), pure functions on Arrow tables.

BM25 scores use the statistics of the whole generation (``pipelines.bm25``), so that a chunk's keyword
score does not depend on the shard count.

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
from pipelines.search.group import FUSIONS, MODES, GroupAnswer, Partial, PinnedTables, ShardGroup, combine
from pipelines.search.merge import convex_fuse, merge_topk, rrf_fuse
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
    text_search_shard_async,
)

__all__ = [
    "FUSIONS", "MODES", "check_request", "collapse_docs", "convex_fuse",
    "KEY_COLUMNS", "RESULT_COLUMNS", "GroupAnswer", "MemoryShard", "NoTextIndexError", "Partial",
    "Pinned", "PinnedTables", "QueryTimeout", "RowCache", "Searcher", "Shard", "ShardError", "ShardGroup",
    "combine", "fetch_rows", "merge_topk", "rrf_fuse", "search_shard",
    "search_shard_async", "text_search_shard", "text_search_shard_async",
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

    def _one(
        self,
        answer: GroupAnswer,
        *,
        k: int,
        depth: int | None = None,
        fusion: str = "convex",
        weight: float = 0.8,
        rrf_k: int = 60,
        collapse: str | None = None,
    ) -> pa.Table:
        (part,) = answer.answers
        if isinstance(part, Exception):
            raise part
        top = combine(
            [part], k=depth if collapse else k, depth=depth, fusion=fusion, weight=weight, rrf_k=rrf_k
        )
        if collapse:
            top = collapse_docs(top, answer.tables, k=k)
        (rows,) = fetch_rows([top], answer.tables)
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
        candidates: int = 50,
        fusion: str = "convex",
        weight: float = 0.8,
        rrf_k: int = 60,
        collapse: str | None = None,
        vector: np.ndarray | None = None,
    ) -> pa.Table:
        """The global top-k chunks for ``text``, best first.

        Args:
            text: the query.
            k: chunks to return (documents, with ``collapse``).
            where: an optional SQL predicate over metadata columns.
            mode: ``vector`` (cosine), ``text`` (BM25 with the generation's statistics) or ``hybrid``
                (both, fused).
            candidates: hybrid (and collapse) only: rows taken from each ranking before fusion.
            fusion: hybrid only: ``convex`` (weighted normalized scores) or ``rrf`` (reciprocal rank).
            weight: convex only: the vector ranking's weight in [0, 1].
            rrf_k: rrf only: the fusion constant.
            collapse: ``doc_id``: the best chunk of each document, k documents (None: chunks).
            vector: the query's embedding, when already computed.
        """
        check_request(mode=mode, fusion=fusion, weight=weight, collapse=collapse)
        depth = max(k, candidates) if mode == "hybrid" or collapse else k
        if mode == "text":
            answer = self.group.search(None, [depth], [where], [text])
        else:
            if vector is None:
                vector = self.embed([text])[0]
            answer = self.group.search(vector, [depth], [where], [text] if mode == "hybrid" else None)
        return self._one(
            answer, k=k, depth=depth, fusion=fusion, weight=weight, rrf_k=rrf_k, collapse=collapse
        )


def check_request(*, mode: str, fusion: str, weight: float, collapse: str | None) -> None:
    """A clear error for a mode, fusion, weight or collapse outside what search takes."""
    if mode not in MODES:
        raise ValueError(f"Unsupported search mode: {mode!r}. Supported: {', '.join(MODES)}.")
    if fusion not in FUSIONS:
        raise ValueError(f"Unsupported fusion: {fusion!r}. Supported: {', '.join(FUSIONS)}.")
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"weight must be in [0, 1], got {weight}")
    if collapse not in (None, "doc_id"):
        raise ValueError(f"Unsupported collapse: {collapse!r}. Supported: doc_id.")


def collapse_docs(hits: pa.Table, tables: dict[str, Pinned], *, k: int) -> pa.Table:
    """The best row of each document among ``hits`` (KEY_COLUMNS, best first), k documents at most: the
    rows' doc_id read by row id first."""
    if not hits.num_rows:
        return hits
    (ids,) = fetch_rows([hits], tables, columns=["doc_id"])
    seen: set[str] = set()
    keep = []
    for row, doc_id in enumerate(ids.column("doc_id").to_pylist()):
        if doc_id not in seen:
            seen.add(doc_id)
            keep.append(row)
            if len(keep) == k:
                break
    return hits.take(pa.array(keep, pa.int64()))
