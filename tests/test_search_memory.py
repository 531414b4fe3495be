"""Search past RAM: what a searching process holds per row stays bounded as rows grow (ANN codes and row
ids, never text), opening an indexed db reads none of its rows (the index `embedpipe index` stored is
opened, not built), and an answer reads the text of its own top-k rows only."""

import lancedb
import numpy as np
import pyarrow as pa
import pytest

from pipelines import index, store
from pipelines.config import IndexSettings
from pipelines.search import Searcher, ShardGroup

DIM = 64
TEXT_BYTES = 2000  # a text per row far larger than what may be held per row
SETTINGS = IndexSettings(exact_below_rows=1000, rows_per_partition=100, fts=False)


def _indexed_db(path, rows, shards=2):
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(50, DIM))
    store.init_db(path, store.Manifest(shards=shards, model="test", dim=DIM))
    conn = lancedb.connect(str(path))
    vectors = []
    for s in range(shards):
        v = centers[rng.integers(0, 50, rows)] + 0.3 * rng.normal(size=(rows, DIM))
        v = (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)
        vectors.append(v)
        ids = [f"s{s}-d{i}" for i in range(rows)]
        table = pa.table({
            "chunk_id": [f"{d}#0" for d in ids], "doc_id": ids,
            "chunk_index": pa.array([0] * rows, pa.int32()),
            "title": [f"title {d}" for d in ids], "text": [f"{d} " + "x" * TEXT_BYTES for d in ids],
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(v.ravel()), DIM),
            "n_tokens": pa.array([5] * rows, pa.int32()), "char_start": pa.array([0] * rows, pa.int32()),
            "char_end": pa.array([5] * rows, pa.int32()), "source": ["s"] * rows, "content_hash": ids,
            "metadata": ["{}"] * rows, "model": ["test"] * rows, "run_id": ["r"] * rows,
        })  # fmt: skip
        conn.open_table(store.shard_name(s)).add(table.cast(store.table_schema(DIM)))
    summaries = index.build(path, settings=SETTINGS)
    assert {s["vector_index"] for s in summaries} == {"IVF_RQ"}
    return np.concatenate(vectors)


def _held(path, vectors):
    group = ShardGroup(str(path), index=SETTINGS, memory_rows=100_000)
    for i in range(0, 64, 16):  # queries load what they touch into the caches
        group.search(vectors[i : i + 16], [10] * 16)
    assert {s["in_memory"] for s in group.stats()} == {False}  # indexed: searched through the index
    return group.memory()


def test_bytes_held_per_row_stay_under_the_bound_as_rows_grow(tmp_path):
    bound = index.bytes_per_row("IVF_RQ", dim=DIM, settings=SETTINGS)
    small = _held(tmp_path / "small", _indexed_db(tmp_path / "small", 3000))
    large = _held(tmp_path / "large", _indexed_db(tmp_path / "large", 12000))
    assert (small["rows"], large["rows"]) == (6000, 24000)
    # Each further row costs what its codes and row id take (no vector, no text: 4 * 64 and 2000 B)...
    per_row = (large["bytes_held"] - small["bytes_held"]) / (large["rows"] - small["rows"])
    assert 0 < per_row <= 1.25 * bound, (per_row, bound, small, large)
    # ...and the whole stays under the bound, but for a fixed part that rows do not grow.
    fixed = small["bytes_held"] - small["rows"] * per_row
    assert large["bytes_held"] <= fixed + 1.25 * bound * large["rows"]
    assert large["bytes_per_row"] < small["bytes_per_row"] < 4 * DIM  # less than a float32 vector


def test_opening_an_indexed_db_reads_no_rows_and_an_answer_reads_only_its_own(tmp_path, monkeypatch):
    """What a new replica does at start: open each table at its version, read its index list, prewarm
    the index `embedpipe index` stored. It scans no table (none is held in memory), builds nothing,
    and a query's answer reads the text of its top-k rows alone."""
    vectors = _indexed_db(tmp_path, 3000)
    scans, takes, built = [], [], []
    table = store.open_shards(tmp_path)["shard_000"]
    table_type, async_type = type(table), type(table._table)  # LanceDB's table and the async one inside
    real_search, real_take = table_type.search, async_type.take_row_ids

    def search(self, query=None, *args, **kwargs):
        if query is None:
            scans.append(self.name)
        return real_search(self, query, *args, **kwargs)

    def take(self, row_ids):
        takes.append([len(row_ids), None])
        return real_take(self, row_ids)

    take_type = type(table._table.take_row_ids([0]))
    real_select = take_type.select

    def select(self, columns):
        takes[-1][1] = "vector" if "vector" in columns else "text"
        return real_select(self, columns)

    monkeypatch.setattr(table_type, "search", search)
    monkeypatch.setattr(async_type, "take_row_ids", take)
    monkeypatch.setattr(take_type, "select", select)
    monkeypatch.setattr(table_type, "create_index", lambda *a, **kw: built.append(a))
    searcher = Searcher(tmp_path, index=SETTINGS)  # ShardGroup inside, as a router replica holds it
    assert scans == [] and built == [] and takes == []
    assert searcher.group.memory()["bytes_per_row"] < 4 * DIM
    hits = searcher.search_vector(vectors[5], k=7)
    text = sum(n for n, what in takes if what == "text")
    refine = [n for n, what in takes if what == "vector"]
    assert hits.num_rows == 7 and scans == [] and text == 7  # 7 rows' text read, over the shards they are in
    # The exact re-rank reads the vectors of refine_factor * k candidates a shard (from the table), no more.
    assert len(refine) == 2 and all(0 < n <= SETTINGS.refine_factor * 7 for n in refine), takes
    assert hits["chunk_id"][0].as_py() == "s0-d5#0"
    assert all(
        t.startswith(d) for d, t in zip(hits["doc_id"].to_pylist(), hits["text"].to_pylist(), strict=True)
    )


@pytest.mark.parametrize("k", [1, 10])
def test_rows_read_for_an_answer_are_the_rows_found(tmp_path, k):
    """The text, title and ids read after the search belong to the rows the search found, in its
    order, whichever shards they came from."""
    vectors = _indexed_db(tmp_path, 2000, shards=3)
    searcher = Searcher(tmp_path, index=SETTINGS)
    for v in vectors[::500]:
        (part,), _, tables = searcher.group.search(v, [k])
        hits = searcher.search_vector(v, k=k)
        assert hits["chunk_id"].to_pylist() == part.vector["chunk_id"].to_pylist()
        assert hits["shard"].to_pylist() == part.vector["shard"].to_pylist()
        for row in hits.to_pylist():
            assert row["chunk_id"] == f"{row['doc_id']}#0" and row["title"] == f"title {row['doc_id']}"
            assert row["doc_id"].startswith(row["shard"].replace("shard_00", "s"))


def test_the_row_cache_serves_answers_again_without_a_read_and_stays_under_its_bound(tmp_path, monkeypatch):
    from pipelines.search import RowCache, combine, fetch_rows

    vectors = _indexed_db(tmp_path, 2000)
    group = ShardGroup(str(tmp_path), index=SETTINGS)
    table = store.open_shards(tmp_path)["shard_000"]
    takes = []
    real_take = type(table._table).take_row_ids
    monkeypatch.setattr(
        type(table._table), "take_row_ids", lambda self, ids: takes.append(len(ids)) or real_take(self, ids)
    )
    answer = group.search(vectors[:3], [10] * 3)
    hits = [combine([part], k=10) for part in answer.answers]
    takes.clear()  # the search's own reads (its candidates' vectors, for the exact re-rank)
    cache = RowCache(10 * 2**20)
    first = fetch_rows(hits, answer.tables, ["doc_id", "title"], cache)
    read = sum(takes)
    assert 0 < read <= 30 and cache.nbytes > 0
    again = fetch_rows(hits, answer.tables, ["doc_id", "title"], cache)
    assert sum(takes) == read  # every row from the cache: nothing read
    assert [t.to_pylist() for t in again] == [t.to_pylist() for t in first]
    small = RowCache(3 * (RowCache.ENTRY_OVERHEAD + 40))  # room for about three rows
    fetch_rows(hits, answer.tables, ["doc_id", "title"], small)
    assert 0 < small.nbytes <= small.max_bytes
