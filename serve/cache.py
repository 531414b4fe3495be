"""The router's query cache: LRU with a TTL, and one computation for identical concurrent requests.

Keys hold the table version of every shard, so a new ingest (or index) changes the key and a
response never outlives the data it came from. Plain asyncio; no Ray, tested alone.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Hashable
from typing import Any, Literal

from cachetools import TTLCache

Outcome = Literal["hit", "shared", "miss"]


class QueryCache:
    """Args:
    maxsize: entries kept (least recently used go first); 0 turns caching and sharing off.
    ttl_s: seconds an entry lives.
    max_bytes: what the entries may hold in all, by ``sizeof``; one larger than this is not kept.
    sizeof: an entry's size in bytes, from its key and value (default: 1, so only maxsize counts).
    timer: the clock (tests pass a fake one).
    """

    def __init__(
        self,
        maxsize: int,
        ttl_s: float,
        *,
        max_bytes: int | None = None,
        sizeof: Callable[[Hashable, Any], int] | None = None,
        timer: Callable[[], float] = time.monotonic,
    ):
        self.enabled = maxsize > 0
        self.maxsize = max(maxsize, 1)
        self._sizeof = sizeof or (lambda key, value: 1)
        # TTLCache bounds one measure: bytes here (getsizeof), entries by evicting below.
        self._done: TTLCache = TTLCache(
            maxsize=max_bytes if max_bytes is not None else self.maxsize,
            ttl=ttl_s,
            timer=timer,
            getsizeof=lambda entry: entry[1],
        )
        self._running: dict[Hashable, asyncio.Future] = {}

    def __len__(self) -> int:
        return len(self._done)

    @property
    def nbytes(self) -> int:
        return int(self._done.currsize)

    def _keep(self, key: Hashable, value: Any) -> None:
        size = self._sizeof(key, value)
        if size > self._done.maxsize:
            return
        self._done[key] = (value, size)
        while len(self._done) > self.maxsize:
            self._done.popitem()  # the least recently used

    async def get_or_compute(
        self, key: Hashable, compute: Callable[[], Awaitable[tuple[Any, bool]]]
    ) -> tuple[Any, Outcome]:
        """The value for ``key``: cached, shared with an identical request in flight, or computed.

        Args:
            key: what identifies the request, table versions included.
            compute: returns ``(value, cacheable)``; a value computed on other table versions than
                the key names, or too large to keep, is returned but not kept.

        Returns:
            ``(value, outcome)``; an exception from ``compute`` reaches every request sharing it and
            nothing is cached.
        """
        if not self.enabled:
            return (await compute())[0], "miss"
        entry = self._done.get(key)
        if entry is not None:
            return entry[0], "hit"
        running = self._running.get(key)
        if running is not None:
            return await asyncio.shield(running), "shared"
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        self._running[key] = future
        try:
            value, cacheable = await compute()
        except asyncio.CancelledError:
            future.cancel()
            raise
        except Exception as exc:
            future.set_exception(exc)
            future.exception()  # retrieved here, so an unshared failure is not logged as unhandled
            raise
        finally:
            del self._running[key]
        if cacheable:
            self._keep(key, value)
        future.set_result(value)
        return value, "miss"
