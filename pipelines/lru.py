"""A least-recently-used map bounded by the bytes of what it holds, shared by the caches of searching
processes (rows of recent answers, term counts of rescored rows)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable
from typing import Any


class BytesLRU:
    """Values by key, least recently used out first, at most ``max_bytes`` of them as ``size`` counts
    them; safe to use from many threads.

    Args:
        max_bytes: what it may hold (0: nothing is kept).
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._entries: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self._lock = threading.Lock()

    def size(self, value: Any) -> int:
        """The bytes ``value`` counts for."""
        raise NotImplementedError

    def get(self, keys: list[Hashable]) -> dict[Hashable, Any]:
        """The values of those ``keys`` it holds (each now the most recently used)."""
        with self._lock:
            found = {}
            for key in keys:
                entry = self._entries.get(key)
                if entry is not None:
                    self._entries.move_to_end(key)
                    found[key] = entry[0]
            return found

    def put(self, entries: dict[Hashable, Any]) -> None:
        if self.max_bytes <= 0:
            return
        with self._lock:
            for key, value in entries.items():
                size = self.size(value)
                old = self._entries.pop(key, None)
                if old is not None:
                    self.nbytes -= old[1]
                self._entries[key] = (value, size)
                self.nbytes += size
            while self.nbytes > self.max_bytes and self._entries:
                _, (_, size) = self._entries.popitem(last=False)
                self.nbytes -= size
