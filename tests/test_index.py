"""Index planning alone, and indexes built on real LanceDB shards (synthetic vectors, no model)."""

import lancedb
import numpy as np
import pyarrow as pa
import pytest

from pipelines import index, store
from pipelines import search as pipelines_search
from pipelines.config import IndexSettings
from pipelines.search import Searcher

DIM = 32


def test_plan_follows_shard_size():
    settings = IndexSettings(exact_below_rows=20_000)
    assert index.plan_vector_index(19_999, dim=384, settings=settings).kind == "exact"
    rq = index.plan_vector_index(1_000_000, dim=384, settings=settings)
    assert (rq.kind, rq.num_partitions, rq.num_bits) == ("IVF_RQ", 1000, 4)  # one per 1000 rows
    assert index.plan_vector_index(10_000_000, dim=384, settings=settings).num_partitions == 4096  # the cap
    hnsw = index.plan_vector_index(1_000_000, dim=384, settings=IndexSettings(vector_index="ivf_hnsw_sq"))
    assert (hnsw.kind, hnsw.num_partitions) == ("IVF_HNSW_SQ", 31)
    pq = index.plan_vector_index(1_000_000, dim=384, settings=IndexSettings(vector_index="ivf_pq"))
    assert (pq.kind, pq.num_partitions, pq.num_sub_vectors) == ("IVF_PQ", 1000, 48)
    # RaBitQ packs 8 dimensions a byte: another dimension gets scalar quantization.
    assert index.plan_vector_index(1_000_000, dim=100, settings=settings).kind == "IVF_SQ"
    # Too few rows to train quantizers: exact whatever the threshold.
    assert index.plan_vector_index(100, dim=384, settings=IndexSettings(exact_below_rows=0)).kind == "exact"


def test_query_params_follow_the_index():
    settings = IndexSettings(refine_factor=5, ef=100)  # ef set low to see it raised to k * refine
    assert index.query_params(index.ShardIndexes("exact", None, ()), k=10, settings=settings) == {}
    hnsw = index.query_params(index.ShardIndexes("IVF_HNSW_SQ", 32, ()), k=50, settings=settings)
    assert hnsw == {"refine_factor": 5, "nprobes": 16, "ef": 250}  # ef covers k * refine_factor
    rq = index.query_params(index.ShardIndexes("IVF_RQ", 1000, ()), k=10, settings=settings)
    assert rq == {"refine_factor": 5, "nprobes": 64}  # 2 x sqrt(1000)
    few = index.query_params(index.ShardIndexes("IVF_RQ", 30, ()), k=10, settings=settings)
    assert few["nprobes"] == 20  # min_nprobes
    assert index.query_params(index.ShardIndexes("IVF_SQ", 8, ()), k=10, settings=settings)["nprobes"] == 8


def test_bytes_held_per_row_is_bounded_by_what_a_row_holds():
    # What `embedpipe plan` predicts: codes and row ids for an index, a float32 vector for exact.
    lancedb = IndexSettings(codes=False)  # searched through LanceDB's index cache
    assert (
        index.bytes_per_row("IVF_RQ", dim=384, settings=lancedb) == 384 * 4 // 8 + 44
    )  # codes, ids, metadata
    assert index.bytes_per_row("exact", dim=384) > 4 * 384
    rq, sq = (index.bytes_per_row(kind, dim=384, settings=lancedb) for kind in ("IVF_RQ", "IVF_SQ"))
    assert rq < sq < 4 * 384
    # The in-memory codes: 212 B of faiss code, its id, the row id, a share of the centroids.
    assert index.bytes_per_row("IVF_RQ", dim=384) == 212 + 8 + 8 + 12 < 4 * 384


def _db(tmp_path, rows_per_shard=3000, shards=2):
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(40, DIM))
    manifest = store.init_db(tmp_path, store.Manifest(shards=shards, model="test", dim=DIM))
    conn = lancedb.connect(str(tmp_path))
    words = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot"]
    for s in range(manifest.shards):
        n = rows_per_shard
        vectors = centers[rng.integers(0, 40, n)] + 0.3 * rng.normal(size=(n, DIM))
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        ids = [f"s{s}-d{i}" for i in range(n)]
        conn.open_table(store.shard_name(s)).add(
            pa.table(
                {
                    "chunk_id": [f"{d}#0" for d in ids],
                    "doc_id": ids,
                    "chunk_index": pa.array([0] * n, pa.int32()),
                    "title": [f"doc {d}" for d in ids],
                    "text": [f"{words[i % 6]} {words[(i * 7) % 6]} number {i}" for i in range(n)],
                    "vector": pa.FixedSizeListArray.from_arrays(
                        pa.array(vectors.astype(np.float32).ravel()), DIM
                    ),
                    "n_tokens": pa.array([5] * n, pa.int32()),
                    "char_start": pa.array([0] * n, pa.int32()),
                    "char_end": pa.array([5] * n, pa.int32()),
                    "source": ["synthetic"] * n,
                    "content_hash": ids,
                    "metadata": ["{}"] * n,
                    "model": ["test"] * n,
                    "run_id": ["r"] * n,
                }
            ).cast(store.table_schema(DIM))
        )
    return tmp_path, rng, centers


@pytest.mark.parametrize("kind", ["ivf_rq", "ivf_sq", "ivf_hnsw_sq", "ivf_pq"])
def test_ann_index_recall_against_exact(tmp_path, kind):
    db, rng, centers = _db(tmp_path)
    refine = 5 if kind in ("ivf_pq", "ivf_hnsw_sq") else 2  # as the README advises for each
    settings = IndexSettings(
        exact_below_rows=1000, vector_index=kind, rows_per_partition=100, refine_factor=refine
    )
    summaries = index.build(db, settings=settings)
    assert [s["vector_index"] for s in summaries] == [kind.upper()] * 2
    assert all(s["fts"] == ["title", "text"] for s in summaries)
    searcher = Searcher(db, index=settings)
    recalls = []
    for _ in range(30):
        # Queries look like the data (near one of its clusters), as real queries do.
        q = (centers[rng.integers(0, 40)] + 0.3 * rng.normal(size=DIM)).astype(np.float32)
        q /= np.linalg.norm(q)
        ann = searcher.search_vector(q, k=10)
        exact = searcher.search_vector(q, k=10, exact=True)
        recalls.append(len(set(ann["chunk_id"].to_pylist()) & set(exact["chunk_id"].to_pylist())) / 10)
        # Refined ANN scores are exact cosine similarities, and the rows read for them are theirs.
        truth = dict(zip(exact["chunk_id"].to_pylist(), exact["score"].to_pylist(), strict=True))
        for row in ann.to_pylist():
            assert row["title"] == f"doc {row['doc_id']}" and row["chunk_id"] == f"{row['doc_id']}#0"
            if row["chunk_id"] in truth:
                assert abs(row["score"] - truth[row["chunk_id"]]) < 1e-4
    # At dim 32, IVF_PQ has only 4 sub-vectors: coarse codes that refine cannot fully repair.
    assert np.mean(recalls) >= (0.75 if kind == "ivf_pq" else 0.9), np.mean(recalls)


def test_new_rows_are_found_before_and_after_the_incremental_index_update(tmp_path):
    """Rows committed after the index was built are searched by LanceDB's scan of them at once; the
    next `embedpipe index` adds them to the index it keeps (no rebuild: same index, new rows only)."""
    db, rng, centers = _db(tmp_path, rows_per_shard=3000, shards=1)
    settings = IndexSettings(exact_below_rows=1000, rows_per_partition=100)
    [first] = index.build(db, settings=settings)
    assert (first["vector_index"], first["action"]) == ("IVF_RQ", "built")
    table = store.open_shards(db)["shard_000"]
    name = index.read_indexes(table).vector_index_name
    group = pipelines_search.ShardGroup(str(db), refresh_s=0, index=settings)
    # 300 new rows (10%), each far from the clusters, pointing where a query will look.
    n = 300
    new = table.to_arrow().slice(0, n)
    vectors = rng.normal(size=(n, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    new = new.set_column(0, "chunk_id", pa.array([f"new-{i}#0" for i in range(n)]))
    column = pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), DIM)
    new = new.set_column(
        new.schema.get_field_index("vector"), "vector", column.cast(new.schema.field("vector").type)
    )
    table.add(new)
    assert index.read_indexes(store.open_shards(db)["shard_000"]).unindexed_rows == n

    def top(i):
        (part,), _, _ = group.search(vectors[i], [1])
        return part.vector["chunk_id"][0].as_py()

    assert [top(i) for i in range(0, n, 30)] == [f"new-{i}#0" for i in range(0, n, 30)]  # by the scan
    [second] = index.build(db, settings=settings)
    assert (second["action"], second["new_rows"]) == ("updated", n)
    after = index.read_indexes(store.open_shards(db)["shard_000"])
    assert after.vector_index_name == name and after.unindexed_rows == 0  # the same index, now holding them
    assert [top(i) for i in range(0, n, 30)] == [f"new-{i}#0" for i in range(0, n, 30)]  # by the index
    # Twice the rows the index was planned for: built again, with the partitions they call for.
    table.add(
        table.to_arrow().slice(0, 3300).set_column(0, "chunk_id", pa.array([f"x{i}" for i in range(3300)]))
    )
    [third] = index.build(db, settings=settings)
    assert third["action"] == "built" and third["num_partitions"] == 66


def test_small_shards_stay_exact_and_text_search_works(tmp_path):
    db, *_ = _db(tmp_path, rows_per_shard=500)
    summaries = index.build(db, settings=IndexSettings())
    assert {s["vector_index"] for s in summaries} == {"exact"}
    (part,), _, _ = Searcher(db).group.search(None, [5], texts=["number 42"])  # BM25 alone
    assert "s0-d42#0" in part.text["chunk_id"].to_pylist() or "s1-d42#0" in part.text["chunk_id"].to_pylist()
    # A second run finds nothing to build; dropping back to exact removes an ANN index.
    index.build(db, settings=IndexSettings(exact_below_rows=0))
    assert {index.read_indexes(t).vector_kind for t in store.open_shards(db).values()} == {"IVF_RQ"}
    index.build(db, settings=IndexSettings())
    assert {index.read_indexes(t).vector_kind for t in store.open_shards(db).values()} == {"exact"}


def test_text_search_without_fts_index_is_a_clear_error(tmp_path):
    from pipelines.search import NoTextIndexError

    db, *_ = _db(tmp_path, rows_per_shard=300)
    with pytest.raises(NoTextIndexError, match="embedpipe index"):
        Searcher(db).search("alpha", k=3, mode="hybrid", vector=np.full(DIM, DIM**-0.5, np.float32))


def test_index_name_records_partitions_and_foreign_indexes_are_dropped(tmp_path):
    from lancedb.index import IvfPq

    db, *_ = _db(tmp_path, rows_per_shard=1500, shards=1)
    [summary] = index.build(db, settings=IndexSettings(exact_below_rows=1000))
    table = store.open_shards(db)["shard_000"]
    have = index.read_indexes(table)
    assert have.vector_index_name == f"vector_idx_p{summary['num_partitions']}"
    assert have.num_partitions == summary["num_partitions"] == 2  # 1500 rows, one partition per 1000
    # A vector index made outside embedpipe, under a name of its own, is found and dropped by it.
    table.drop_index(have.vector_index_name)
    table.create_index(
        "vector", config=IvfPq(distance_type="cosine", num_partitions=2, num_sub_vectors=4), name="mine"
    )
    assert index.read_indexes(table).vector_kind == "IVF_PQ"
    index.build(db, settings=IndexSettings())  # 1500 rows: below the default threshold, exact
    assert index.read_indexes(store.open_shards(db)["shard_000"]).vector_kind == "exact"
