"""The router's query cache alone: LRU + TTL, in-flight sharing, failures and stale versions not kept."""

import asyncio

import pytest

from serve.cache import QueryCache


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def _counting(value="v", cacheable=True, delay=0.0):
    calls = []

    async def compute():
        calls.append(1)
        await asyncio.sleep(delay)
        return value, cacheable

    return compute, calls


def test_hit_then_expiry_after_ttl():
    clock = Clock()
    cache = QueryCache(maxsize=10, ttl_s=5, timer=clock)
    compute, calls = _counting()

    async def run():
        assert await cache.get_or_compute("k", compute) == ("v", "miss")
        assert await cache.get_or_compute("k", compute) == ("v", "hit")
        clock.now = 6
        assert await cache.get_or_compute("k", compute) == ("v", "miss")

    asyncio.run(run())
    assert len(calls) == 2


def test_identical_concurrent_requests_share_one_computation():
    cache = QueryCache(maxsize=10, ttl_s=60)
    compute, calls = _counting(delay=0.05)

    async def run():
        return await asyncio.gather(*(cache.get_or_compute(("q", 10), compute) for _ in range(8)))

    results = asyncio.run(run())
    assert len(calls) == 1
    assert sorted(outcome for _, outcome in results) == ["miss"] + ["shared"] * 7
    assert all(value == "v" for value, _ in results)


def test_failure_reaches_every_sharer_and_is_not_cached():
    cache = QueryCache(maxsize=10, ttl_s=60)
    calls = []

    async def boom():
        calls.append(1)
        await asyncio.sleep(0.02)
        raise ValueError("bad filter")

    async def run():
        results = await asyncio.gather(
            *(cache.get_or_compute("k", boom) for _ in range(3)), return_exceptions=True
        )
        assert all(isinstance(r, ValueError) for r in results)
        with pytest.raises(ValueError):
            await cache.get_or_compute("k", boom)

    asyncio.run(run())
    assert len(calls) == 2 and len(cache) == 0


def test_results_from_other_table_versions_are_not_kept():
    cache = QueryCache(maxsize=10, ttl_s=60)
    compute, calls = _counting(cacheable=False)

    async def run():
        await cache.get_or_compute("k", compute)
        return await cache.get_or_compute("k", compute)

    assert asyncio.run(run()) == ("v", "miss")
    assert len(calls) == 2


def test_lru_bound_and_off_switch():
    cache = QueryCache(maxsize=2, ttl_s=60)
    off = QueryCache(maxsize=0, ttl_s=60)
    compute, calls = _counting()

    async def run():
        for key in ("a", "b", "c"):
            await cache.get_or_compute(key, compute)
        assert (await cache.get_or_compute("a", compute))[1] == "miss"  # evicted as least recent
        assert (await cache.get_or_compute("c", compute))[1] == "hit"
        await off.get_or_compute("x", compute)
        assert (await off.get_or_compute("x", compute))[1] == "miss"

    asyncio.run(run())
    assert len(cache) == 2 and len(off) == 0


def test_bytes_bound_keeps_memory_flat_and_skips_entries_too_large():
    # Values of 1,000 bytes in a cache of 4,500 bytes: at most 4 stay, however many entries are allowed.
    cache = QueryCache(maxsize=1000, ttl_s=60, max_bytes=4500, sizeof=lambda key, value: len(value))

    async def run():
        for i in range(50):
            await cache.get_or_compute(f"k{i}", _counting(value=b"x" * 1000)[0])
        assert len(cache) == 4 and cache.nbytes == 4000
        assert (await cache.get_or_compute("k49", _counting(value=b"x" * 1000)[0]))[1] == "hit"
        huge, calls = _counting(value=b"y" * 5000)
        assert (await cache.get_or_compute("huge", huge))[1] == "miss"
        assert (await cache.get_or_compute("huge", huge))[1] == "miss"  # too large to keep
        assert len(calls) == 2 and cache.nbytes <= 4500

    asyncio.run(run())
