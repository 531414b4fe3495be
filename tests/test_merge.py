"""The top-k merge alone: no Ray, no LanceDB."""

import pyarrow as pa
import pytest

from pipelines.search import merge_topk


def _shard(name, rows):
    return pa.table(
        {
            "chunk_id": [r[0] for r in rows],
            "score": pa.array([r[1] for r in rows], pa.float32()),
            "shard": [name] * len(rows),
        }
    )


def test_global_topk_across_shards():
    a = _shard("a", [("a1", 0.9), ("a2", 0.5), ("a3", 0.1)])
    b = _shard("b", [("b1", 0.95), ("b2", 0.6)])
    c = _shard("c", [("c1", 0.7)])
    merged = merge_topk([a, b, c], k=4)
    assert merged["chunk_id"].to_pylist() == ["b1", "a1", "c1", "b2"]
    assert merged["shard"].to_pylist() == ["b", "a", "c", "b"]


def test_same_result_whatever_the_shard_order():
    shards = [_shard("a", [("x", 0.5), ("y", 0.4)]), _shard("b", [("z", 0.5), ("w", 0.3)])]
    forward = merge_topk(shards, k=3)
    backward = merge_topk(shards[::-1], k=3)
    assert forward.equals(backward)
    # Equal scores are ordered by chunk_id.
    assert forward["chunk_id"].to_pylist() == ["x", "z", "y"]


def test_fewer_rows_than_k_and_empty_shards():
    a = _shard("a", [("a1", 0.2)])
    empty = _shard("b", [])
    merged = merge_topk([empty, a, empty], k=10)
    assert merged["chunk_id"].to_pylist() == ["a1"]
    assert merge_topk([empty], k=3).num_rows == 0


def test_matches_a_full_sort():
    import random

    rng = random.Random(7)
    shards = [
        _shard(str(s), [(f"{s}-{i}", rng.random()) for i in range(rng.randint(0, 50))]) for s in range(6)
    ]
    merged = merge_topk(shards, k=25)
    everything = sorted(
        (
            (cid, score)
            for t in shards
            for cid, score in zip(t["chunk_id"].to_pylist(), t["score"].to_pylist(), strict=True)
        ),
        key=lambda r: (-r[1], r[0]),
    )
    assert merged["chunk_id"].to_pylist() == [cid for cid, _ in everything[:25]]


def test_rejects_bad_k():
    with pytest.raises(ValueError, match="k must be"):
        merge_topk([_shard("a", [("x", 1.0)])], k=0)


def test_rrf_rewards_rows_in_both_rankings():
    from pipelines.search import rrf_fuse

    vector = _shard("a", [("v1", 0.9), ("both", 0.8), ("v3", 0.7)])
    text = _shard("b", [("t1", 12.0), ("both", 9.0)])
    fused = rrf_fuse([vector, text], k=3, rrf_k=60)
    assert fused["chunk_id"].to_pylist() == ["both", "t1", "v1"]  # t1 and v1 tie; chunk_id breaks it
    assert fused["score"].to_pylist()[0] == pytest.approx(2 / 62)
    assert fused["shard"].to_pylist()[0] == "a"  # columns come from the first ranking holding the row


def test_rrf_handles_empty_rankings():
    from pipelines.search import rrf_fuse

    empty = _shard("a", [])
    assert rrf_fuse([empty, empty], k=5).num_rows == 0
    assert rrf_fuse([empty, _shard("b", [("x", 1.0)])], k=5)["chunk_id"].to_pylist() == ["x"]


def test_convex_fusion_weighs_normalized_scores():
    from pipelines.search import convex_fuse

    vector = _shard("a", [("both", 0.8), ("v_only", 0.6), ("v_low", 0.2)])  # cosine: floor -1
    text = _shard("a", [("t_only", 12.0), ("both", 6.0)])  # BM25: floor 0
    fused = convex_fuse(vector, text, k=4, weight=0.5)
    scores = dict(zip(fused["chunk_id"].to_pylist(), fused["score"].to_pylist(), strict=True))
    assert scores["both"] == pytest.approx(0.5 * 1.0 + 0.5 * 0.5)
    # Absent from a ranking: that ranking's lowest scaled score (0.5 here, and 1.2 / 1.8 for vectors).
    assert scores["t_only"] == pytest.approx(0.5 * (1.2 / 1.8) + 0.5 * 1.0)
    assert scores["v_only"] == pytest.approx(0.5 * (1.6 / 1.8) + 0.5 * 0.5)
    assert fused["chunk_id"].to_pylist()[:2] == ["t_only", "both"]
    # The weight moves the order: all vector, then all text.
    assert convex_fuse(vector, text, k=1, weight=1.0)["chunk_id"].to_pylist() == ["both"]
    assert convex_fuse(vector, text, k=1, weight=0.0)["chunk_id"].to_pylist() == ["t_only"]
    # A BM25 ranking shorter than the depth asked holds every row with a query term: a row absent
    # from it scores 0 there (cut at its depth, it would take the lowest, 0.5, as above).
    complete = convex_fuse(vector, text, k=4, weight=0.5, depth=10)
    scores = dict(zip(complete["chunk_id"].to_pylist(), complete["score"].to_pylist(), strict=True))
    assert scores["v_only"] == pytest.approx(0.5 * (1.6 / 1.8) + 0.5 * 0.0)
    assert scores["t_only"] == pytest.approx(0.5 * (1.2 / 1.8) + 0.5 * 1.0)
    cut = convex_fuse(vector, text, k=4, weight=0.5, depth=2)
    assert cut["score"].to_pylist() == fused["score"].to_pylist()
    # combine asked for more rows than the rankings were searched to (benchmarks/fusion.py does): the
    # rankings' own depth says whether one is complete.
    from pipelines.search import Partial, combine

    wide = combine([Partial(vector, text)], k=4, depth=2, weight=0.5)
    assert wide["score"].to_pylist() == fused["score"].to_pylist()
    empty = text.slice(0, 0)
    assert convex_fuse(vector, empty, k=5, weight=0.8)["chunk_id"].to_pylist() == ["both", "v_only", "v_low"]
    with pytest.raises(ValueError, match=r"weight must be in \[0, 1\]"):
        convex_fuse(vector, text, k=3, weight=1.5)
