"""ShardSearcher: one Serve deployment per shard table, running the same search code as the CLI."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import lancedb
import numpy as np
import pyarrow as pa
from ray import serve

from pipelines.config import IndexSettings
from pipelines.index import ShardIndexes, query_params, read_indexes
from pipelines.search import NoTextIndexError, search_shard, text_search_shard

logger = logging.getLogger(__name__)


class FilterError(ValueError):
    """A filter predicate that LanceDB cannot run (bad syntax, unknown column)."""


@serve.deployment(max_ongoing_requests=32)
class ShardSearcher:
    """Holds one shard table open and answers searches on it.

    Every answer comes with the table version it was computed on, so the router never caches a
    result under newer versions than the data behind it.

    Args:
        db: the db directory.
        shard: the table name (``shard_000``...).
        refresh_s: how often to look for a newer table version (0: before every query).
        index: index settings (ANN query parameters).
    """

    def __init__(self, db: str, shard: str, refresh_s: float = 1.0, index: dict[str, Any] | None = None):
        conn = lancedb.connect(db, read_consistency_interval=timedelta(seconds=refresh_s))
        self.shard = shard
        self.table = conn.open_table(shard)
        self.index_settings = IndexSettings.model_validate(index or {})
        self._indexes: tuple[int, ShardIndexes] | None = None

    def _current_indexes(self) -> tuple[int, ShardIndexes]:
        version = self.table.version
        if self._indexes is None or self._indexes[0] != version:
            self._indexes = (version, read_indexes(self.table))
        return self._indexes

    def search(
        self, vector: list[float] | np.ndarray, k: int, where: str | None = None
    ) -> tuple[pa.Table, int]:
        """The shard's top-k rows for a unit query vector, and the table version searched."""
        version, indexes = self._current_indexes()
        params = query_params(indexes, k=k, settings=self.index_settings)
        with _filter_errors(where):
            hits = search_shard(
                self.table, np.asarray(vector, dtype=np.float32), k=k, shard=self.shard, where=where,
                params=params,
            )  # fmt: skip
        return hits, version

    def text_search(self, text: str, k: int, where: str | None = None) -> tuple[pa.Table, int]:
        """The shard's BM25 top-k rows for ``text``, and the table version searched."""
        version, indexes = self._current_indexes()
        with _filter_errors(where):
            hits = text_search_shard(
                self.table, text, k=k, shard=self.shard, where=where, columns=indexes.fts_columns
            )
        return hits, version

    def version(self) -> int:
        return self.table.version

    def stats(self) -> dict[str, Any]:
        version, indexes = self._current_indexes()
        return {
            "shard": self.shard,
            "rows": self.table.count_rows(),
            "version": version,
            "vector_index": indexes.vector_kind,
            "fts": list(indexes.fts_columns),
        }


@contextmanager
def _filter_errors(where: str | None) -> Iterator[None]:
    # LanceDB reports a bad predicate as a ValueError "Invalid input, ...".
    try:
        yield
    except NoTextIndexError:
        raise
    except (ValueError, RuntimeError) as exc:  # some bad predicates only fail while executing
        if not where:
            raise
        text = str(exc).removeprefix("Invalid input, ").removeprefix("lance error: ")
        raise FilterError(f"invalid filter: {text.splitlines()[0][:500]}") from None
