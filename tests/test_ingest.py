"""The whole batch pipeline on a real local Ray, real LanceDB on tmp_path, and the bundled model."""

import json

import lancedb
import numpy as np
import pytest

from pipelines import ingest, store
from pipelines.config import load_config
from pipelines.search import Searcher
from tests.conftest import scifact_docs


def _write_jsonl(path, docs):
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    return path


def _all_rows(db):
    rows = []
    for name, table in store.open_shards(db).items():
        for row in table.to_arrow().to_pylist():
            rows.append({**row, "shard": name})
    return rows


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, scifact):
    docs = scifact_docs(60)
    docs.append({"_id": "dup", "text": "first copy"})
    docs.append({"_id": "dup", "text": "second copy"})
    root = tmp_path_factory.mktemp("corpus")
    path = _write_jsonl(root / "corpus.jsonl", docs)
    with path.open("a") as f:
        f.write("{broken json\n")
    return path, docs


@pytest.fixture(scope="module")
def ingested(ray_local, corpus, tmp_path_factory):
    path, docs = corpus
    db = tmp_path_factory.mktemp("db") / "db"
    cfg = load_config(None, shards=3, **{"chunking.max_tokens": 128, "embedding.batch_size": 64})
    return db, ingest.build(source=path, db=db, cfg=cfg), docs, cfg


def test_report_accounts_for_every_document(ingested):
    db, report, docs, _ = ingested
    counts = report["docs"]
    assert counts["seen"] == len(docs) + 1  # + the malformed line
    assert counts["seen"] == counts["ingested"] + counts["unchanged"] + counts["failed"]
    assert counts["ingested"] == 60
    assert counts["failed"] == 3
    reasons = sorted(f["reason"].split(":")[0] for f in report["failures"])
    assert reasons == ["duplicate doc_id", "duplicate doc_id", "line 63"]
    saved = json.loads((db / "_runs" / f"{report['run_id']}.json").read_text())
    assert saved["docs"] == counts
    for key in ("docs_per_min", "chunks_per_s", "embeddings_per_s", "tokens_per_s"):
        assert saved["throughput"][key] > 0
    assert saved["resources"]["peak_rss_mb"] > 0
    assert any("Embedder" in name for name in saved["stages"])
    shares = [stage["cpu_share"] for stage in saved["stages"].values()]
    assert abs(sum(shares) - 1) < 0.01 and all(0 <= x <= 1 for x in shares)


def test_shards_hold_every_chunk_once_and_each_doc_in_one_shard(ingested):
    db, report, _, _ = ingested
    rows = _all_rows(db)
    assert len(report["shards"]) == 3
    assert sum(report["shards"].values()) == report["chunks"]["written"] == len(rows)
    assert len({r["chunk_id"] for r in rows}) == len(rows)
    shards_of_doc = {}
    for r in rows:
        shards_of_doc.setdefault(r["doc_id"], set()).add(r["shard"])
        assert r["shard"] == store.shard_name(store.shard_of(r["doc_id"], 3))
    assert len(shards_of_doc) == 60 and all(len(s) == 1 for s in shards_of_doc.values())
    assert "dup" not in shards_of_doc
    assert {r["run_id"] for r in rows} == {report["run_id"]}
    assert {r["model"] for r in rows} == {"sentence-transformers/all-MiniLM-L6-v2"}
    # The two "dup" copies were embedded (work done) but not written.
    assert 0 < report["tokens_embedded"] - sum(r["n_tokens"] for r in rows) < 50
    assert max(r["n_tokens"] for r in rows) <= 128
    assert any(r["chunk_index"] > 0 for r in rows)  # long abstracts were split
    # No staging left behind.
    assert not (db / store.STAGING_DIR).exists()


def test_readers_see_whole_runs_only(ingested):
    """Every version of every shard holds either none or all of the first run's rows."""
    db, report, _, _ = ingested
    conn = lancedb.connect(str(db))
    run = report["run_id"]
    for name, final in report["shards"].items():
        table = conn.open_table(name)
        counts = set()
        for version in table.list_versions():
            table.checkout(version["version"])
            counts.add(table.count_rows(f"run_id = '{run}'"))
        assert counts <= {0, final}, (name, counts)
        assert final in counts


def test_search_equals_brute_force_over_all_shards(ingested):
    db, _, docs, _ = ingested
    rows = _all_rows(db)
    matrix = np.array([r["vector"] for r in rows], dtype=np.float32)
    searcher = Searcher(db, device="cpu", dtype="fp32")
    for doc in docs[:10]:
        query = doc["title"]
        vector = searcher.embed([query])[0]
        hits = searcher.search_vector(vector, k=5)
        scores = matrix @ vector
        order = np.argsort(-scores)[:5]
        assert hits["chunk_id"].to_pylist() == [rows[i]["chunk_id"] for i in order]
        np.testing.assert_allclose(hits["score"].to_numpy(), scores[order], atol=1e-4)
        assert hits["doc_id"][0].as_py() == doc["_id"]  # a title finds its own document


def test_reingest_skips_unchanged_and_replaces_changed(ingested, tmp_path):
    db, first, docs, cfg = ingested
    before = {r["chunk_id"]: r for r in _all_rows(db)}
    edited = [dict(d) for d in docs[:60]]
    edited[0]["text"] = "Completely new text about zebrafish fin regeneration."
    path = _write_jsonl(tmp_path / "corpus.jsonl", edited)
    report = ingest.build(source=path, db=db, cfg=cfg)
    assert report["docs"] == {"seen": 60, "ingested": 1, "unchanged": 59, "failed": 0}
    after = {r["chunk_id"]: r for r in _all_rows(db)}
    changed = edited[0]["_id"]
    assert [cid for cid in after if after[cid]["doc_id"] == changed] == [f"{changed}#0"]
    assert after[f"{changed}#0"]["text"] == edited[0]["text"]
    assert len(after) == len(before) - sum(1 for r in before.values() if r["doc_id"] == changed) + 1
    untouched = [cid for cid, r in before.items() if r["doc_id"] != changed]
    assert all(after[cid]["run_id"] == first["run_id"] for cid in untouched)
    hits = Searcher(db, device="cpu", dtype="fp32").search("zebrafish fin regeneration", k=1)
    assert hits["doc_id"][0].as_py() == changed


def test_db_rejects_another_shard_count(ingested, tmp_path):
    db, _, _, cfg = ingested
    with pytest.raises(store.StoreError, match="has 3 shards"):
        ingest.build(
            source=_write_jsonl(tmp_path / "x.jsonl", [{"_id": "a", "text": "b"}]),
            db=db,
            cfg=cfg.model_copy(update={"shards": 5}),
        )


def test_one_db_never_mixes_vector_formats_unasked(ray_local, tmp_path, scifact):
    """The db records the format of its vectors; auto keeps it, another one is an error naming both
    (fp16 on a GPU and int8 on a CPU once mixed silently across runs), unless mixing is allowed."""
    docs = scifact_docs(12)
    db = tmp_path / "db"
    quiet = {"ray.progress_bars": False}
    first = ingest.build(
        source=_write_jsonl(tmp_path / "a.jsonl", docs[:4]),
        db=db,
        cfg=load_config(None, shards=2, **quiet, **{"embedding.dtype": "fp32"}),
    )
    assert first["backend"]["dtype"] == "fp32" and store.read_manifest(db).vectors == "fp32"
    assert 0 < first["embeddings"]["busy_fraction"] <= 1 and first["embeddings"]["busy_s"] > 0
    with pytest.raises(ValueError, match="holds fp32 vectors.*would add bf16"):
        ingest.build(
            source=_write_jsonl(tmp_path / "b.jsonl", docs[4:8]),
            db=db,
            cfg=load_config(None, shards=2, **quiet, **{"embedding.dtype": "bf16"}),
        )
    assert sum(store.shard_rows(db).values()) == first["chunks"]["written"]  # nothing half-written
    auto = ingest.build(  # auto follows the db, whatever this CPU would pick for a new one
        source=_write_jsonl(tmp_path / "b.jsonl", docs[4:8]), db=db, cfg=load_config(None, shards=2, **quiet)
    )
    assert auto["backend"]["dtype"] == "fp32" and auto["docs"]["ingested"] == 4
    mixed = ingest.build(
        source=_write_jsonl(tmp_path / "c.jsonl", docs[8:]),
        db=db,
        cfg=load_config(
            None, shards=2, **quiet, **{"embedding.dtype": "bf16", "embedding.allow_mixed_dtypes": True}
        ),
    )
    assert mixed["backend"]["db_vectors"] == "mixed" and store.read_manifest(db).vectors == "mixed"


def test_fp32_on_openvino_in_the_pipeline_stores_torch_fp32_vectors(ray_local, tmp_path, scifact):
    """engine: openvino runs the fp32 export in throughput mode (two streams) in the actors."""
    from pipelines.embedding import Embedder
    from pipelines.models import embed_input

    db = tmp_path / "db"
    overrides = {"embedding.dtype": "fp32", "embedding.engine": "openvino", "ray.progress_bars": False}
    report = ingest.build(
        source=_write_jsonl(tmp_path / "a.jsonl", scifact_docs(10)),
        db=db,
        cfg=load_config(None, shards=2, **overrides),
    )
    assert (report["backend"]["dtype"], report["backend"]["engine"]) == ("fp32", "openvino")
    rows = [r for t in store.open_shards(db).values() for r in t.to_arrow().to_pylist()]
    assert len(rows) == report["chunks"]["written"] > 10
    torch_fp32 = Embedder(model=report["model"], device="cpu", dtype="fp32")
    expected = torch_fp32.encode([embed_input(r["title"], r["text"]) for r in rows])
    np.testing.assert_allclose(np.array([r["vector"] for r in rows]), expected, atol=2e-5)
