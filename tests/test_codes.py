"""The in-memory codes `embedpipe index` stores per shard (pipelines/codes.py), on real LanceDB shards:
searched with an exact re-rank, rows committed after them found by a scan, deleted rows never returned,
and brought up to date after a compaction gave every row a new id, without building them again."""

import faiss
import numpy as np
import pyarrow as pa

from pipelines import codes, index, store
from pipelines.config import IndexSettings
from pipelines.search import ShardGroup, shard
from tests.test_index import DIM, _db

SETTINGS = IndexSettings(exact_below_rows=1000, rows_per_partition=100, codes_rows_per_partition=50)


def _top(group, vectors, k=10, exact=False):
    answer = group.search(vectors, [k] * len(vectors), exact=exact)
    return [part.vector["chunk_id"].to_pylist() for part in answer.answers]


def _recall(group, queries):
    ann, exact = _top(group, queries), _top(group, queries, exact=True)
    return np.mean([len(set(a) & set(e)) / len(e) for a, e in zip(ann, exact, strict=True)])


def _rowid(table, chunk_id):
    found = table.search().where(f"chunk_id = '{chunk_id}'").select(["chunk_id"]).with_row_id(True)
    return found.to_arrow()["_rowid"][0].as_py()


def _build_here(monkeypatch):
    """index.build in this process, not in Ray tasks (an earlier test may have left Ray running): the
    thresholds a test lowers on the module apply only here."""
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: False)


def test_codes_follow_new_deleted_and_compacted_rows(tmp_path, monkeypatch):
    db, rng, centers = _db(tmp_path, rows_per_shard=3000, shards=1)
    [first] = index.build(db, settings=SETTINGS)
    assert first["codes"]["action"] == "built" and first["codes"]["rows"] == 3000
    table = store.open_shards(db)["shard_000"]
    group = ShardGroup(str(db), refresh_s=0, index=SETTINGS)
    assert group.stats()[0]["codes"] == {"version": table.version, "new": 0}
    queries = centers[rng.integers(0, 40, 30)] + 0.3 * rng.normal(size=(30, DIM))
    queries = (queries / np.linalg.norm(queries, axis=1, keepdims=True)).astype(np.float32)
    assert _recall(group, queries) >= 0.9

    # 300 new rows far from the clusters, each the answer to a query of its own; 100 old rows deleted,
    # each the answer to its own vector before.
    n = 300
    vectors = rng.normal(size=(n, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    new = table.to_arrow().slice(0, n).set_column(0, "chunk_id", pa.array([f"new-{i}#0" for i in range(n)]))
    new = new.set_column(new.schema.get_field_index("content_hash"), "content_hash", new["chunk_id"])
    column = pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), DIM)
    new = new.set_column(
        new.schema.get_field_index("vector"), "vector", column.cast(new.schema.field("vector").type)
    )
    gone = [f"s0-d{i}" for i in range(1000, 1400)]  # 13%: the compaction rewrites the fragment
    old = (
        table.search().where("doc_id IN ('s0-d1000', 's0-d1200', 's0-d1399')").select(["chunk_id", "vector"])
    )
    old = old.to_arrow()
    old_vectors = np.stack(old["vector"].to_numpy(zero_copy_only=False)).astype(np.float32)
    assert [top[0] for top in _top(group, old_vectors, k=1)] == old["chunk_id"].to_pylist()
    table.add(new)
    table.delete("doc_id IN (" + ", ".join(f"'{d}'" for d in gone) + ")")
    moved = _rowid(table, "s0-d2000#0")

    def check():
        assert [top[0] for top in _top(group, vectors[::30], k=1)] == [f"new-{i}#0" for i in range(0, n, 30)]
        found = {c for top in _top(group, old_vectors) for c in top}
        assert not found & {f"{d}#0" for d in gone}  # deleted rows are never an answer

    assert group.stats()[0]["codes"]["new"] == n  # the same codes, the new rows held beside them
    assert len(group.snapshots()[0].fresh.rowids) == n
    scans, search_shard_async = [], shard.search_shard_async
    monkeypatch.setattr(
        shard, "search_shard_async", lambda *a, **kw: scans.append(kw) or search_shard_async(*a, **kw)
    )
    check()
    assert scans == []  # searched in memory: a LanceDB scan filtered on _rowid reads every row, per query
    monkeypatch.undo()

    # `embedpipe index` compacts (rows get new ids) and then brings the codes up to date.
    [second] = index.build(db, settings=SETTINGS)
    done = second["codes"]
    assert (done["action"], done["added"], done["removed"]) == ("updated", n, len(gone))
    table = store.open_shards(db)["shard_000"]
    assert _rowid(table, "s0-d2000#0") != moved  # the compaction did give rows new ids
    assert group.stats()[0]["codes"] == {"version": table.version, "new": 0}
    check()
    assert _recall(group, queries) >= 0.9
    held = codes.read(store.location(db), "shard_000")[0]
    assert int((held.rowids >= 0).sum()) == 3000 + n - 400 == held.index.ntotal


def test_codes_made_stale_by_a_compaction_are_set_aside(tmp_path, monkeypatch):
    """A compaction that `embedpipe index` did not follow (every row has a new id) leaves codes that
    describe no row: the shard is searched through LanceDB's own index until they are updated."""
    db, rng, centers = _db(tmp_path, rows_per_shard=3000, shards=1)
    index.build(db, settings=SETTINGS)
    monkeypatch.setattr(shard, "CODES_NEW_ROWS_MAX", 0)
    table = store.open_shards(db)["shard_000"]
    table.delete("chunk_index = 0 AND doc_id < 's0-d1500'")  # ~half the rows: the fragment is rewritten
    table.optimize()
    group = ShardGroup(str(db), refresh_s=0, index=SETTINGS)
    assert group.stats()[0]["codes"] is None and group.stats()[0]["vector_index"] == "IVF_RQ"
    queries = centers[rng.integers(0, 40, 20)].astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    assert _recall(group, queries) >= 0.8  # LanceDB's own index, which lost half its rows
    assert all(c >= "s0-d1500" for top in _top(group, queries) for c in top)  # none of the deleted rows
    [again] = index.build(db, settings=SETTINGS)
    assert again["codes"]["action"] == "updated"
    assert group.stats()[0]["codes"] == {"version": store.open_shards(db)["shard_000"].version, "new": 0}


def test_a_shard_back_to_exact_search_loses_its_codes(tmp_path):
    db, *_ = _db(tmp_path, rows_per_shard=3000, shards=1)
    index.build(db, settings=SETTINGS)
    loc = store.location(db)
    assert codes.pointer(loc, "shard_000") is not None
    index.build(db, settings=SETTINGS.model_copy(update={"exact_below_rows": 10_000}))
    assert codes.pointer(loc, "shard_000") is None and not loc.list(codes.DIR + "/")


def test_large_shards_get_fewer_bits_a_two_level_kmeans_and_a_graph_of_centroids(tmp_path, monkeypatch):
    """Past codes.LARGE_SHARD_ROWS a shard's codes take 2 bits a dimension and a query re-ranks 5 x k
    candidates; with many partitions they are trained in two levels and found through an HNSW graph.
    The thresholds are lowered here so that 3,000 rows (60 partitions) cross all three."""
    _build_here(monkeypatch)
    monkeypatch.setattr(codes, "LARGE_SHARD_ROWS", 2000)
    monkeypatch.setattr(codes, "TWO_LEVEL_FROM", 16)
    monkeypatch.setattr(codes, "HNSW_QUANTIZER_FROM", 16)
    db, rng, centers = _db(tmp_path, rows_per_shard=3000, shards=1)
    index.build(db, settings=SETTINGS)
    held = codes.read(store.location(db), "shard_000")[0]
    assert held.bits == 2 and held.partitions == 60
    assert isinstance(faiss.downcast_index(held.index.quantizer), faiss.IndexHNSWFlat)
    asked = []
    search = codes.ShardCodes.search
    monkeypatch.setattr(codes.ShardCodes, "search", lambda s, v, c, n: asked.append(c) or search(s, v, c, n))
    group = ShardGroup(str(db), refresh_s=0, index=SETTINGS)
    queries = centers[rng.integers(0, 40, 30)] + 0.3 * rng.normal(size=(30, DIM))
    queries = (queries / np.linalg.norm(queries, axis=1, keepdims=True)).astype(np.float32)
    assert _recall(group, queries) >= 0.9
    assert asked and set(asked) == {10 * SETTINGS.codes_low_bits_refine} != {10 * SETTINGS.refine_factor}
    assert index.bytes_per_row("IVF_RQ", dim=384, settings=SETTINGS, rows=3000) < index.bytes_per_row(
        "IVF_RQ", dim=384, settings=SETTINGS, rows=1000
    )


def test_an_hnsw_quantizer_returns_every_partition_a_query_probes(tmp_path, monkeypatch):
    """A query that probes more partitions than the graph's default breadth still gets them all: with
    every partition probed, the codes searched are the same as with a breadth far beyond it."""
    _build_here(monkeypatch)
    monkeypatch.setattr(codes, "HNSW_QUANTIZER_FROM", 16)
    monkeypatch.setattr(codes, "HNSW_EF_SEARCH", 4)
    db, rng, centers = _db(tmp_path, rows_per_shard=3000, shards=1)
    index.build(db, settings=SETTINGS.model_copy(update={"codes_rows_per_partition": 16}))
    held = codes.read(store.location(db), "shard_000")[0]
    assert held.partitions == 188 and codes._hnsw(held.index).hnsw.efSearch == 4
    queries = rng.normal(size=(20, DIM)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    found = held.search(queries, 30, nprobe=held.partitions)
    codes._hnsw(held.index).hnsw.efSearch = 10_000
    params = faiss.IVFRaBitQSearchParameters()
    params.nprobe = held.partitions
    _, every = held.index.search(queries, 30, params=params)
    assert np.array_equal(found, held.rowids[every])


def test_codes_bits_follow_the_shard_with_a_margin_and_the_build_survives_a_failed_two_level_kmeans(
    monkeypatch,
):
    auto = IndexSettings()
    line = codes.LARGE_SHARD_ROWS
    assert [codes.bits_for(rows, auto) for rows in (line - 1, line)] == [4, 2]
    assert codes.bits_for(int(line * 1.05), auto, held=4) == 4  # near the line: the codes keep their bits
    assert codes.bits_for(int(line * 1.2), auto, held=4) == 2
    assert codes.bits_for(10, auto.model_copy(update={"codes_bits": 3}), held=4) == 3

    def refuse(*args, **kwargs):
        raise RuntimeError("Error: 'clus.k > 0' failed")

    monkeypatch.setattr("faiss.contrib.clustering.two_level_clustering", refuse)
    monkeypatch.setattr(codes, "TWO_LEVEL_FROM", 16)
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(2000, 32)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    built = codes.build(vectors, 20, 4)  # trained in one level instead
    assert built.is_trained and built.quantizer.ntotal == 20 and built.ntotal == 2000


def test_new_rows_held_beside_the_codes_are_bounded_by_a_count_not_by_the_shard(tmp_path, monkeypatch):
    """Past CODES_NEW_ROWS_MAX new rows (here 100 of a 3,000-row shard: a tenth, less than the fifth the
    bound once allowed), the shard holds none of them and LanceDB's index serves it, new rows included."""
    db, rng, _ = _db(tmp_path, rows_per_shard=3000, shards=1)
    index.build(db, settings=SETTINGS)
    monkeypatch.setattr(shard, "CODES_NEW_ROWS_MAX", 100)
    table = store.open_shards(db)["shard_000"]
    n = 300
    vectors = rng.normal(size=(n, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    new = table.to_arrow().slice(0, n).set_column(0, "chunk_id", pa.array([f"new-{i}#0" for i in range(n)]))
    column = pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), DIM)
    new = new.set_column(
        new.schema.get_field_index("vector"), "vector", column.cast(new.schema.field("vector").type)
    )
    table.add(new)
    group = ShardGroup(str(db), refresh_s=0, index=SETTINGS)
    assert group.stats()[0]["codes"] is None and group.snapshots()[0].fresh is None
    assert group.memory()["bytes_held"] < 3300 * 4 * DIM  # no vectors of the new rows held
    assert [top[0] for top in _top(group, vectors[::30], k=1)] == [f"new-{i}#0" for i in range(0, n, 30)]
