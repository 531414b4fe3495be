"""Files kept per shard beside a generation's tables (a shard's in-memory codes, its BM25 statistics):
each version's files, and a small pointer file naming the current ones, written after them, so that a
reader sees whole files or the previous ones."""

from __future__ import annotations

import json
from typing import Any

from pipelines.store.location import Location


class ShardFiles:
    """The files of one kind under ``folder``: ``<folder>/<shard>-v<version>.<ext>`` and the pointer
    ``<folder>/<shard>.json`` (``{"format", "file", ...}``).

    Args:
        folder: the folder under the generation's tables.
        fmt: the format number a pointer must carry to be read.
    """

    def __init__(self, folder: str, fmt: int):
        self.folder, self.format = folder, fmt

    def pointer(self, at: Location, shard: str) -> dict[str, Any] | None:
        """The pointer naming ``shard``'s current files (None: it has none)."""
        found = at.read_json(f"{self.folder}/{shard}.json")
        return found if found and found.get("format") == self.format else None

    def publish(self, at: Location, shard: str, name: str, meta: dict[str, Any]) -> None:
        """Point ``shard`` at the files named ``name`` (written already) and remove its older ones; the
        ones before stay for a reader that read the old pointer a moment ago."""
        old = self.pointer(at, shard)
        record = {"format": self.format, "file": name, **meta}
        at.write_bytes(f"{self.folder}/{shard}.json", json.dumps(record).encode())
        keep = {name, old["file"] if old else None}
        for obj in at.list(f"{self.folder}/"):
            base = obj["path"].rsplit("/", 1)[-1]
            if base.startswith(f"{shard}-v") and base.split(".", 1)[0] not in keep:
                at.delete(obj["path"])

    def drop(self, at: Location, shard: str) -> None:
        """Remove ``shard``'s files and pointer."""
        at.delete(f"{self.folder}/{shard}.json")
        for obj in at.list(f"{self.folder}/"):
            if obj["path"].rsplit("/", 1)[-1].startswith(f"{shard}-v"):
                at.delete(obj["path"])
