"""Index planning alone, and indexes built on real LanceDB shards (synthetic vectors, no model)."""

import lancedb
import numpy as np
import pyarrow as pa
import pytest

from pipelines import index, store
from pipelines.config import IndexSettings
from pipelines.search import Searcher

DIM = 32


def test_plan_follows_shard_size():
    settings = IndexSettings(exact_below_rows=20_000)
    assert index.plan_vector_index(19_999, dim=384, settings=settings).kind == "exact"
    hnsw = index.plan_vector_index(1_000_000, dim=384, settings=settings)
    assert (hnsw.kind, hnsw.num_partitions) == ("IVF_HNSW_SQ", 31)
    pq = index.plan_vector_index(1_000_000, dim=384, settings=IndexSettings(vector_index="ivf_pq"))
    assert (pq.kind, pq.num_partitions, pq.num_sub_vectors) == ("IVF_PQ", 1000, 48)
    # Too few rows to train quantizers: exact whatever the threshold.
    assert index.plan_vector_index(100, dim=384, settings=IndexSettings(exact_below_rows=0)).kind == "exact"


def test_query_params_follow_the_index():
    settings = IndexSettings(refine_factor=5, ef=100)  # ef set low to see it raised to k * refine
    assert index.query_params(index.ShardIndexes("exact", None, ()), k=10, settings=settings) == {}
    hnsw = index.query_params(index.ShardIndexes("IVF_HNSW_SQ", 32, ()), k=50, settings=settings)
    assert hnsw == {"refine_factor": 5, "nprobes": 16, "ef": 250}  # ef covers k * refine_factor
    pq = index.query_params(index.ShardIndexes("IVF_PQ", 1000, ()), k=10, settings=settings)
    assert pq["nprobes"] == 100


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


@pytest.mark.parametrize("kind", ["ivf_hnsw_sq", "ivf_pq"])
def test_ann_index_recall_against_exact(tmp_path, kind):
    db, rng, centers = _db(tmp_path)
    settings = IndexSettings(exact_below_rows=1000, vector_index=kind)
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
        # Refined ANN scores are exact cosine similarities.
        truth = dict(zip(exact["chunk_id"].to_pylist(), exact["score"].to_pylist(), strict=True))
        for chunk_id, score in zip(ann["chunk_id"].to_pylist(), ann["score"].to_pylist(), strict=True):
            if chunk_id in truth:
                assert abs(score - truth[chunk_id]) < 1e-4
    # At dim 32, IVF_PQ has only 4 sub-vectors: coarse codes that refine cannot fully repair.
    assert np.mean(recalls) >= (0.9 if kind == "ivf_hnsw_sq" else 0.75), np.mean(recalls)


def test_small_shards_stay_exact_and_text_search_works(tmp_path):
    db, *_ = _db(tmp_path, rows_per_shard=500)
    summaries = index.build(db, settings=IndexSettings())
    assert {s["vector_index"] for s in summaries} == {"exact"}
    (part,), _ = Searcher(db).group.search(None, [5], texts=["number 42"])  # BM25 alone
    assert "s0-d42#0" in part.text["chunk_id"].to_pylist() or "s1-d42#0" in part.text["chunk_id"].to_pylist()
    # A second run finds nothing to build; dropping back to exact removes an ANN index.
    index.build(db, settings=IndexSettings(exact_below_rows=0))
    assert {index.read_indexes(t).vector_kind for t in store.open_shards(db).values()} == {"IVF_HNSW_SQ"}
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
    assert have.num_partitions == summary["num_partitions"] == 1
    # A vector index made outside embedpipe, under a name of its own, is found and dropped by it.
    table.drop_index(have.vector_index_name)
    table.create_index(
        "vector", config=IvfPq(distance_type="cosine", num_partitions=2, num_sub_vectors=4), name="mine"
    )
    assert index.read_indexes(table).vector_kind == "IVF_PQ"
    index.build(db, settings=IndexSettings())  # 1500 rows: below the default threshold, exact
    assert index.read_indexes(store.open_shards(db)["shard_000"]).vector_kind == "exact"
