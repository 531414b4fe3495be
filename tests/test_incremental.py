"""Incremental ingest with the real model and Ray: unchanged documents skipped, edited ones replaced
with only their changed chunks embedded (the embedding cache has the rest), vanished ones pruned."""

import json
from pathlib import Path

import lancedb
import numpy as np
import pytest

from pipelines import ingest, store
from pipelines.config import load_config
from pipelines.embedding import Embedder, setup
from pipelines.embedding import cache as embed_cache
from pipelines.search import Searcher
from tests.conftest import scifact_docs


def _write(path, docs):
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    return path


def _rows(db):
    rows = []
    for table in store.open_shards(db).values():
        rows += (
            table.search()
            .select(["chunk_id", "doc_id", "text", "content_hash"])
            .limit(None)
            .to_arrow()
            .to_pylist()
        )
    return rows


@pytest.fixture(scope="module")
def runs(ray_local, tmp_path_factory, scifact):
    root = tmp_path_factory.mktemp("incremental")
    docs = scifact_docs(80)
    source = _write(root / "corpus.jsonl", docs)
    db = root / "db"
    cfg = load_config(None, shards=3, **{"ray.progress_bars": False})
    first = ingest.build(source=source, db=db, cfg=cfg)
    again = ingest.build(source=source, db=db, cfg=cfg)

    edited = {d["_id"] for d in docs[:10]}
    removed = {d["_id"] for d in docs[10:15]}
    changed = []
    for doc in docs:
        if doc["_id"] in removed:
            continue
        if doc["_id"] in edited:
            doc = {
                **doc,
                "text": doc["text"] + f" Erratum {doc['_id']}: the quokka zebra assay was repeated.",
            }
        changed.append(doc)
    added = [
        {"_id": f"new-{i}", "title": "Added", "text": f"A new abstract number {i} on tardigrades."}
        for i in range(3)
    ]
    _write(source, changed + added)
    before = {r["chunk_id"]: r for r in _rows(db)}
    third = ingest.build(source=source, db=db, cfg=cfg, prune=True)
    return {
        "db": db,
        "cfg": cfg,
        "docs": docs,
        "first": first,
        "again": again,
        "third": third,
        "edited": edited,
        "removed": removed,
        "added": {d["_id"] for d in added},
        "before": before,
    }


def test_unchanged_rerun_embeds_nothing(runs):
    first, again = runs["first"], runs["again"]
    assert first["docs"]["ingested"] == 80
    assert first["embeddings"]["computed"] == first["chunks"]["written"] > 80
    assert again["docs"] == {"seen": 80, "ingested": 0, "unchanged": 80, "failed": 0}
    assert again["embeddings"]["computed"] == 0 and again["chunks"]["written"] == 0
    dtype = first["backend"]["dtype"]
    print(f"\nfirst run {first['wall_s']:.1f} s ({dtype}), unchanged rerun {again['wall_s']:.1f} s")


def test_edits_replace_exactly_the_edited_documents(runs):
    third, edited, added = runs["third"], runs["edited"], runs["added"]
    assert third["docs"]["ingested"] == len(edited) + len(added)
    assert third["docs"]["unchanged"] == 80 - len(edited) - len(runs["removed"])
    assert third["docs"]["pruned"] == len(runs["removed"])
    rows = _rows(runs["db"])
    ids = [r["chunk_id"] for r in rows]
    assert len(ids) == len(set(ids))  # no duplicate chunks
    stored_docs = {r["doc_id"] for r in rows}
    assert not stored_docs & runs["removed"]
    assert stored_docs == {d["_id"] for d in runs["docs"]} - runs["removed"] | added

    # Only chunks of edited and added documents went through the model; the edited documents'
    # chunks whose text did not change came from the embedding cache.
    new_chunks = [r for r in rows if r["doc_id"] in edited | added]
    emb = third["embeddings"]
    assert emb["computed"] + emb["cache_hits"] == len(new_chunks) == third["chunks"]["written"]
    changed_text = [r for r in new_chunks if runs["before"].get(r["chunk_id"], {}).get("text") != r["text"]]
    assert emb["computed"] == len(changed_text)
    assert emb["computed"] >= len(edited) + len(added)

    # Untouched documents keep their rows from the first run.
    untouched = [r for r in rows if r["doc_id"] not in edited | added]
    assert all(runs["before"][r["chunk_id"]] == r for r in untouched)


def test_search_returns_the_new_text(runs):
    searcher = Searcher(runs["db"])
    doc_id = sorted(runs["edited"])[3]
    hits = searcher.search(f"Erratum {doc_id}: the quokka zebra assay was repeated", k=5).to_pylist()
    assert any(h["doc_id"] == doc_id and "quokka zebra" in h["text"] for h in hits)
    old = [r for r in _rows(runs["db"]) if r["doc_id"] == doc_id]
    assert any("Erratum" in r["text"] for r in old)


def test_cache_holds_every_embedding_once_per_text(runs):
    table = lancedb.connect(str(runs["db"])).open_table(embed_cache.TABLE)
    stored = sum(runs[k]["embeddings"]["computed"] for k in ("first", "again", "third"))
    assert table.count_rows() == stored
    assert any(index.columns == ["key"] for index in table.list_indices())


def test_cache_gets_few_large_appends_not_one_per_batch(ray_local, tmp_path, scifact):
    source = _write(tmp_path / "c.jsonl", scifact_docs(40))
    cfg = load_config(
        None, **{"embedding.batch_size": 8, "chunking.docs_per_batch": 4, "ray.progress_bars": False}
    )
    report = ingest.build(source=source, db=tmp_path / "db", cfg=cfg)
    emb = report["embeddings"]
    assert emb["batches"] >= 5
    assert 1 <= emb["cache_appends"] < emb["batches"]
    table = lancedb.connect(str(tmp_path / "db")).open_table(embed_cache.TABLE)
    assert table.count_rows() == emb["computed"] == report["chunks"]["written"]


def test_tiny_token_budget_embeds_every_row_once_and_in_place(ray_local, tmp_path, scifact):
    """A budget of 256 padded tokens forces about one chunk per forward pass."""
    docs = scifact_docs(12)
    source = _write(tmp_path / "c.jsonl", docs)
    overrides = {
        "embedding.dtype": "fp32",
        "embedding.batch_tokens": 256,
        "embedding.min_batch_tokens": 256,
        "embedding.max_batch_tokens": 256,
        "embedding.cache": False,
        "ray.progress_bars": False,
    }
    report = ingest.build(source=source, db=tmp_path / "db", cfg=load_config(None, shards=2, **overrides))
    emb = report["embeddings"]
    assert emb["computed"] == report["chunks"]["written"]
    assert emb["passes"] >= emb["computed"] // 2
    assert all(p["token_budget"] == 256 for p in report["batching"]["timeline"])
    rows = []
    for table in store.open_shards(tmp_path / "db").values():
        rows += table.search().select(["title", "text", "vector"]).limit(None).to_arrow().to_pylist()
    embedder = Embedder(model=report["model"], device="cpu", dtype="fp32")
    expected = embedder.encode([f"{r['title']} {r['text']}" if r["title"] else r["text"] for r in rows])
    np.testing.assert_allclose(np.array([r["vector"] for r in rows]), expected, atol=1e-4)


def test_int8_backend_end_to_end(ray_local, tmp_path, scifact):
    """dtype int8: quantized with NNCF on the corpus (once, cached), shipped to the actor through Ray."""
    docs = scifact_docs(60)
    source = _write(tmp_path / "c.jsonl", docs)
    cfg = load_config(None, shards=2, **{"embedding.dtype": "int8", "ray.progress_bars": False})
    report = ingest.build(source=source, db=tmp_path / "db", cfg=cfg)
    assert report["backend"]["dtype"] == "int8"
    assert report["backend"]["int8"]["calibration_texts"] >= setup.MIN_CALIBRATION
    assert report["embeddings"]["computed"] == report["chunks"]["written"]
    rows = []
    for table in store.open_shards(tmp_path / "db").values():
        rows += (
            table.search().select(["doc_id", "title", "text", "vector"]).limit(None).to_arrow().to_pylist()
        )
    fp32 = Embedder(model=report["model"], device="cpu", dtype="fp32")
    expected = fp32.encode([f"{r['title']} {r['text']}" if r["title"] else r["text"] for r in rows])
    cosine = np.sum(np.array([r["vector"] for r in rows]) * expected, axis=1)
    print(f"\nint8 vs fp32 cosine: mean {cosine.mean():.4f}, min {cosine.min():.4f}")
    assert cosine.mean() > 0.98 and cosine.min() > 0.9
    searcher = Searcher(tmp_path / "db")
    top = [searcher.search(d["title"], k=1).to_pylist()[0]["doc_id"] for d in docs[:20]]
    assert sum(t == d["_id"] for t, d in zip(top, docs[:20], strict=True)) >= 18


def test_unchanged_reingest_is_a_quick_check_without_ray_and_fails_what_the_full_run_fails(
    ray_local, tmp_path, scifact
):
    docs = scifact_docs(30)
    source = tmp_path / "c.jsonl"
    source.write_text("".join(json.dumps(d) + "\n" for d in docs) + "{not json\n")
    db = tmp_path / "db"
    cfg = load_config(None, shards=2, **{"ray.progress_bars": False})
    first = ingest.build(source=source, db=db, cfg=cfg)
    assert first["docs"]["ingested"] == 30 and first["stages"]  # the full pipeline ran

    again = ingest.build(source=source, db=db, cfg=cfg)
    assert again["backend"] == {"quick_check": True, "db_vectors": first["backend"]["db_vectors"]}
    assert again["stages"] == {} and again["embeddings"]["computed"] == 0
    assert (again["docs"]["unchanged"], again["docs"]["ingested"], again["docs"]["failed"]) == (30, 0, 1)
    assert again["failures"] == first["failures"]  # the same document, the same reason
    assert Path(again["log"]).exists()

    docs[7]["text"] += " An erratum: the assay was repeated."
    source.write_text("".join(json.dumps(d) + "\n" for d in docs))
    third = ingest.build(source=source, db=db, cfg=cfg)
    assert "quick_check" not in third["backend"] and third["stages"]
    assert (third["docs"]["ingested"], third["docs"]["unchanged"], third["docs"]["failed"]) == (1, 29, 0)
    assert "quick check stopped" in Path(third["log"]).read_text()

    off = ingest.build(source=source, db=db, cfg=load_config(None, shards=2, **{"read.quick_check_s": 0}))
    assert off["stages"] and off["docs"]["unchanged"] == 30
