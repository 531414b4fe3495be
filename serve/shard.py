"""ShardSearcher: one Serve deployment per shard table, running the same search code as the CLI."""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

import lancedb
import numpy as np
import pyarrow as pa
from ray import serve

from pipelines.search import search_shard

logger = logging.getLogger(__name__)


class FilterError(ValueError):
    """A filter predicate that LanceDB cannot run (bad syntax, unknown column)."""


@serve.deployment(max_ongoing_requests=32)
class ShardSearcher:
    """Holds one shard table open and answers searches on it.

    Args:
        db: the db directory.
        shard: the table name (``shard_000``...).
        refresh_s: how often to look for a newer table version (0: before every query).
    """

    def __init__(self, db: str, shard: str, refresh_s: float = 1.0):
        conn = lancedb.connect(db, read_consistency_interval=timedelta(seconds=refresh_s))
        self.shard = shard
        self.table = conn.open_table(shard)

    def search(self, vector: list[float] | np.ndarray, k: int, where: str | None = None) -> pa.Table:
        """The shard's top-k rows for a unit query vector (see pipelines.search.search_shard)."""
        try:
            return search_shard(
                self.table, np.asarray(vector, dtype=np.float32), k=k, shard=self.shard, where=where
            )
        except ValueError as exc:
            if where:  # LanceDB reports a bad predicate as "Invalid input, ..."
                raise FilterError(_filter_message(str(exc))) from None
            raise

    def stats(self) -> dict[str, Any]:
        return {"shard": self.shard, "rows": self.table.count_rows(), "version": self.table.version}


def _filter_message(text: str) -> str:
    text = text.removeprefix("Invalid input, ")
    return f"invalid filter: {text.splitlines()[0][:500]}"
