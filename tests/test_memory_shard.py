"""Small shards searched from memory give LanceDB's exact answers; a shard group (the search code of
``embedpipe query`` and Serve alike) follows new table versions, sends filtered queries to LanceDB,
answers each query of a batch alone, and tells a bad filter from a fault of its own."""

import asyncio
import threading

import lancedb
import numpy as np
import pyarrow as pa
import pytest

import pipelines.search.shard
from pipelines import store
from pipelines.filters import FilterError
from pipelines.search import MemoryShard, QueryTimeout, ShardError, ShardGroup, search_shard
from tests.test_index import DIM, _db


def _search(group, vector, k, where=None):
    """One query's rows and the version searched; its error raised."""
    answer = group.search(vector, [k], [where])
    (part,) = answer.answers
    if isinstance(part, Exception):
        raise part
    return part.vector, answer.versions[0]


def _rows(part):
    if isinstance(part, Exception):
        raise part
    return part.vector


def _queries(rng, table, n):
    stored = np.stack(table.to_arrow().column("vector").to_numpy(zero_copy_only=False))
    near = stored[rng.integers(0, len(stored), n // 2)] + 0.05 * rng.normal(size=(n // 2, DIM))
    far = rng.normal(size=(n - n // 2, DIM))
    queries = np.vstack([near, far]).astype(np.float32)
    return queries / np.linalg.norm(queries, axis=1, keepdims=True)


def _with_ties(table):
    # Rows 0-4 copied under new ids: exact ties, which both searches must cut by chunk_id alike.
    copies = table.to_arrow().slice(0, 5)
    ids = [f"tie-{i}#0" for i in range(5)]
    table.add(copies.set_column(0, "chunk_id", pa.array(ids)))


@pytest.mark.parametrize("k", [1, 10, 700])
def test_memory_search_equals_lancedb_exact_search(tmp_path, k):
    db, rng, _ = _db(tmp_path, rows_per_shard=600, shards=1)
    table = lancedb.connect(str(db)).open_table(store.shard_name(0))
    _with_ties(table)
    memory = MemoryShard(table, shard="shard_000")
    queries = _queries(rng, table, 40)
    queries[0] = np.asarray(table.to_arrow().column("vector")[0].values, np.float32)  # hits the ties
    for query, hits in zip(queries, memory.search(queries, [k] * len(queries)), strict=True):
        exact = search_shard(table, query, k=k, shard="shard_000", exact=True)
        assert hits.schema == exact.schema
        assert hits.num_rows == exact.num_rows == min(k, 605)
        got, want = hits["score"].to_numpy(), exact["score"].to_numpy()
        np.testing.assert_allclose(got, want, atol=1e-5)
        # The same rows, up to which copy of an exact tie at the cut is kept (LanceDB leaves that
        # open); memory orders ties by chunk_id, as the merge does.
        ids, want_ids = hits["chunk_id"].to_pylist(), exact["chunk_id"].to_pylist()
        above = want[-1] + 1e-5
        assert {c for c, g in zip(ids, got, strict=True) if g > above} == {
            c for c, w in zip(want_ids, want, strict=True) if w > above
        }
        order = list(zip(-got, ids, strict=True))
        assert order == sorted(order)
    assert sum("tie-" in c for c in memory.search(queries[:1], [10])[0]["chunk_id"].to_pylist()) >= 1


def test_shard_searcher_follows_new_versions_and_filters(tmp_path):
    db, rng, _ = _db(tmp_path, rows_per_shard=400, shards=1)
    table = lancedb.connect(str(db)).open_table(store.shard_name(0))
    shard = ShardGroup(str(db), refresh_s=0, memory_rows=10_000)
    assert shard.stats()[0]["in_memory"] is True
    query = _queries(rng, table, 2)[0]
    hits, version = _search(shard, query, 10)
    exact = search_shard(table, query, k=10, shard="shard_000", exact=True)
    assert hits["chunk_id"].to_pylist() == exact["chunk_id"].to_pylist()

    # A new row equal to the query is the best hit as soon as it is committed.
    new = table.to_arrow().slice(0, 1)
    new = new.set_column(0, "chunk_id", pa.array(["fresh#0"])).set_column(
        new.schema.get_field_index("vector"),
        "vector",
        pa.FixedSizeListArray.from_arrays(pa.array(query), DIM).cast(new.schema.field("vector").type),
    )
    table.add(new)
    hits2, version2 = _search(shard, query, 10)
    assert version2 > version and hits2["chunk_id"][0].as_py() == "fresh#0"

    # A filter goes through LanceDB (prefilter), with the same scores.
    filtered, _ = _search(shard, query, 5, "doc_id != 's0-d1'")
    assert filtered.num_rows == 5 and "s0-d1#0" not in filtered["chunk_id"].to_pylist()
    with pytest.raises(FilterError, match="invalid filter"):
        _search(shard, query, 5, "no_such_column = 1")

    # Batched: one call answers many queries, a bad filter fails only its own query.
    answers, _, _ = shard.search(np.stack([query, query]), [3, 3], [None, "no_such_column = 1"])
    assert _rows(answers[0])["chunk_id"][0].as_py() == "fresh#0"
    with pytest.raises(FilterError):
        _rows(answers[1])


def test_large_shards_are_not_held_in_memory(tmp_path):
    db, *_ = _db(tmp_path, rows_per_shard=300, shards=1)
    assert ShardGroup(str(db), memory_rows=100).stats()[0]["in_memory"] is False
    assert ShardGroup(str(db), memory_rows=0).stats()[0]["in_memory"] is False
    assert ShardGroup(str(db), memory_rows=300).stats()[0]["in_memory"] is True


def test_a_shard_answers_from_one_version_until_it_refreshes(tmp_path):
    db, rng, _ = _db(tmp_path, rows_per_shard=200, shards=1)
    table = lancedb.connect(str(db)).open_table(store.shard_name(0))
    for memory_rows in (10_000, 0):  # from memory, and through LanceDB
        shard = ShardGroup(str(db), refresh_s=3600, memory_rows=memory_rows)
        query = _queries(rng, table, 2)[0]
        before, version = _search(shard, query, 1000)
        new = pa.array([f"new{memory_rows}-{i}" for i in range(3)])
        table.add(table.to_arrow().slice(0, 3).set_column(0, "chunk_id", new))
        during, same = _search(shard, query, 1000)
        assert same == version and during.num_rows == before.num_rows  # the commit is not seen yet
        shard.shards[0].expire()  # as if the refresh interval had passed
        after, newer = _search(shard, query, 1000)
        assert newer > version and after.num_rows == before.num_rows + 3


def test_a_failing_query_fails_alone(tmp_path, monkeypatch):
    db, rng, _ = _db(tmp_path, rows_per_shard=100, shards=1)
    real = pipelines.search.shard.search_shard_async

    async def flaky(table, vectors, *, k, **kw):
        if k == 7:  # the batch's call (k: the largest of the batch), then the first query alone
            raise RuntimeError("disk on fire")
        return await real(table, vectors, k=k, **kw)

    monkeypatch.setattr(pipelines.search.shard, "search_shard_async", flaky)
    shard = ShardGroup(str(db), memory_rows=0)
    table = lancedb.connect(str(db)).open_table(store.shard_name(0))
    answers, _, _ = shard.search(_queries(rng, table, 2), [7, 3], [None, None])
    with pytest.raises(ShardError, match="disk on fire"):
        _rows(answers[0])
    assert _rows(answers[1]).num_rows == 3


def test_a_slow_query_times_out_alone_and_a_failing_refresh_shows(tmp_path, monkeypatch):
    db, rng, _ = _db(tmp_path, rows_per_shard=100, shards=1)
    real = pipelines.search.shard.search_shard_async
    release, slow_finished = threading.Event(), threading.Event()

    async def slow(table, vectors, *, k, **kw):
        if k == 7:  # runs until the test has its answers (60 s at most, so that a failure ends)
            for _ in range(600):
                if release.is_set():
                    break
                await asyncio.sleep(0.1)
            slow_finished.set()
        return await real(table, vectors, k=k, **kw)

    monkeypatch.setattr(pipelines.search.shard, "search_shard_async", slow)
    shard = ShardGroup(str(db), memory_rows=0, refresh_s=0)
    table = lancedb.connect(str(db)).open_table(store.shard_name(0))
    vectors = _queries(rng, table, 2)
    answers, _, _ = shard.search(vectors, [7, 3], [None, "chunk_index >= 0"], timeout_s=0.3)
    assert not slow_finished.is_set()  # answered at the deadline, while the slow query still ran
    release.set()
    with pytest.raises(QueryTimeout):
        _rows(answers[0])
    assert _rows(answers[1]).num_rows == 3

    assert shard.stats()[0]["refresh_failing_s"] is None
    only = shard.shards[0]
    monkeypatch.setattr(only, "_load_latest", lambda: (_ for _ in ()).throw(OSError("disk gone")))
    (stats,) = shard.stats()  # the last good version still serves, and says its refreshes fail
    assert stats["refresh_failing_s"] is not None and stats["refresh_error"] == "OSError"
    assert stats["rows"] == 100


def test_a_failing_filter_runs_once_and_its_error_names_no_schema(tmp_path, monkeypatch):
    db, rng, _ = _db(tmp_path, rows_per_shard=50, shards=1)
    calls = []
    real = pipelines.search.shard.search_shard_async

    async def rejecting(table, vectors, *, k, where=None, **kw):
        calls.append(where)
        if where:
            raise ValueError("Invalid input, No field named nope. Valid fields are vector, source, metadata")
        return await real(table, vectors, k=k, **kw)

    monkeypatch.setattr(pipelines.search.shard, "search_shard_async", rejecting)
    shard = ShardGroup(str(db), memory_rows=0, refresh_s=3600)
    counted = []
    monkeypatch.setattr(type(shard.snapshots()[0].table), "count_rows", lambda *a, **kw: counted.append(a))
    table = lancedb.connect(str(db)).open_table(store.shard_name(0))
    answers, _, _ = shard.search(_queries(rng, table, 1), [3], ["`doc_id` = 'x'"])
    with pytest.raises(FilterError) as error:
        _rows(answers[0])
    assert calls == ["`doc_id` = 'x'"] and counted == []  # run once; no second run to assign blame
    assert "vector" not in str(error.value) and "metadata" not in str(error.value)


@pytest.mark.parametrize("k", [1, 10, 250])
def test_a_group_held_in_memory_answers_as_its_shards_through_lancedb(tmp_path, k):
    """Several shards held as one in memory give the rows, scores and order of each shard's exact
    LanceDB search merged, ties across shards included; a filtered query still goes to LanceDB."""
    db, rng, _ = _db(tmp_path, rows_per_shard=120, shards=3)
    conn = lancedb.connect(str(db))
    first = conn.open_table(store.shard_name(0))
    # An exact copy of shard 0's first row in shard 2, under another id: a tie across shards.
    copy = first.to_arrow().slice(0, 1)
    conn.open_table(store.shard_name(2)).add(copy.set_column(0, "chunk_id", pa.array(["a-tie#0"])))
    held = ShardGroup(str(db), memory_rows=10_000)
    lance = ShardGroup(str(db), memory_rows=0)
    assert [s["in_memory"] for s in held.stats()] == [True] * 3
    queries = _queries(rng, first, 20)
    queries[0] = np.asarray(copy.column("vector")[0].values, np.float32)
    got, _, _ = held.search(queries, [k] * len(queries))
    want, _, _ = lance.search(queries, [k] * len(queries))
    for g, w in zip(got, want, strict=True):
        assert g.vector.column_names == w.vector.column_names and g.vector.num_rows == w.vector.num_rows
        np.testing.assert_allclose(g.vector["score"].to_numpy(), w.vector["score"].to_numpy(), atol=1e-5)
        # The same rows and shards, up to which copy of an exact tie at the cut is kept (a matrix
        # product may score two equal rows an ulp apart); each ordered by score, then chunk_id.
        above = w.vector["score"].to_numpy()[-1] + 1e-5
        rows = {(r["chunk_id"], r["shard"]) for r in g.vector.to_pylist() if r["score"] > above}
        assert rows == {(r["chunk_id"], r["shard"]) for r in w.vector.to_pylist() if r["score"] > above}
        order = [(-r["score"], r["chunk_id"]) for r in g.vector.to_pylist()]
        assert order == sorted(order)
    assert {"a-tie#0", "s0-d0#0"} & set(got[0].vector["chunk_id"].to_pylist()[:2])
    (filtered,), _, _ = held.search(queries[1:2], [5], ["chunk_index >= 0"])
    (exact,), _, _ = lance.search(queries[1:2], [5])
    assert filtered.vector["chunk_id"].to_pylist() == exact.vector["chunk_id"].to_pylist()


def test_a_held_group_answers_rows_from_memory_as_lancedb_reads_them(tmp_path, monkeypatch):
    """Small shards held in memory keep the columns an answer shows: their answers read nothing from
    the tables, and the rows equal those LanceDB reads by row id; other columns are read from it."""
    from pipelines.search import combine, fetch_rows

    db, rng, _ = _db(tmp_path, rows_per_shard=300, shards=3)
    held = ShardGroup(str(db), memory_rows=10_000)
    lance = ShardGroup(str(db), memory_rows=0)
    table = lancedb.connect(str(db)).open_table(store.shard_name(0))
    queries = _queries(rng, table, 6)
    takes = []
    real_take = type(table._table).take_row_ids
    monkeypatch.setattr(
        type(table._table), "take_row_ids", lambda self, ids: takes.append(ids) or real_take(self, ids)
    )
    columns = ["chunk_id", "doc_id", "title", "text"]
    got_answer, want_answer = held.search(queries, [8] * 6), lance.search(queries, [8] * 6)
    got = fetch_rows([combine([p], k=8) for p in got_answer.answers], got_answer.tables, columns)
    assert takes == []  # every row from memory
    want = fetch_rows([combine([p], k=8) for p in want_answer.answers], want_answer.tables, columns)
    assert takes  # read from the tables
    for g, w in zip(got, want, strict=True):
        assert g.drop_columns(["score"]).to_pylist() == w.drop_columns(["score"]).to_pylist()
    takes.clear()
    (source,) = fetch_rows([combine([got_answer.answers[0]], k=8)], got_answer.tables, ["source"])
    assert takes and source["source"].to_pylist() == ["synthetic"] * 8  # not held: read from the table
