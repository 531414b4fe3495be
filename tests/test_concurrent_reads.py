"""Searches during an ingest never fail and never see half a document.

The searches go through the shard group that Serve's router and ``embedpipe query`` search with
(pipelines.search.ShardGroup, refreshing on every query) while another ingest adds new documents and
replaces changed ones. Afterwards every table version a search saw is checked: each document in it
whole (chunks 0..n-1, one content_hash, one run).
"""

import json
import threading
import time

import lancedb
import pytest

from pipelines import ingest, store
from pipelines.config import load_config
from pipelines.search import Searcher, ShardGroup
from tests.conftest import scifact_docs


def _write(path, docs):
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    return path


def _whole_documents(table) -> int:
    """Check every document of one table version; returns how many there are."""
    rows = table.to_arrow().select(["doc_id", "chunk_index", "content_hash", "run_id"]).to_pylist()
    docs: dict[str, list[dict]] = {}
    for row in rows:
        docs.setdefault(row["doc_id"], []).append(row)
    for doc_id, chunks in docs.items():
        assert sorted(c["chunk_index"] for c in chunks) == list(range(len(chunks))), doc_id
        assert len({(c["content_hash"], c["run_id"]) for c in chunks}) == 1, doc_id
    return len(docs)


@pytest.mark.slow
def test_searches_during_an_ingest(ray_local, scifact, tmp_path):
    docs = scifact_docs(50)
    db = tmp_path / "db"
    cfg = load_config(None, shards=3, **{"chunking.max_tokens": 128, "ray.progress_bars": False})
    ingest.build(source=_write(tmp_path / "first.jsonl", docs[:20]), db=db, cfg=cfg)
    changed = [{**d, "text": d["text"][: len(d["text"]) // 2] + " (revised)"} for d in docs[:5]]
    second = _write(tmp_path / "second.jsonl", changed + docs[5:50])

    queries = [d["title"] for d in docs[:50:2]]
    vectors = Searcher(db, device="cpu", dtype="fp32").embed(queries)
    group = ShardGroup(str(db), refresh_s=0, memory_rows=100_000)
    result: dict = {}
    run = threading.Thread(target=lambda: result.update(ingest.build(source=second, db=db, cfg=cfg)))
    seen: set[tuple[str, int]] = set()
    errors: list[str] = []
    during = 0
    seen |= set(zip(group.names, group.search(vectors[0], [10]).versions, strict=True))  # before it starts
    run.start()
    deadline = time.monotonic() + 600
    while run.is_alive() and time.monotonic() < deadline:
        for vector in vectors:
            alive = run.is_alive()
            try:
                (part,), versions, _ = group.search(vector, [10])
                assert not isinstance(part, Exception), part
                assert part.vector.num_rows == 10
            except Exception as exc:  # counted, not raised: the test reports how many failed
                errors.append(f"{type(exc).__name__}: {exc}")
                continue
            seen |= set(zip(group.names, versions, strict=True))
            during += alive
            time.sleep(0.01)
    run.join(timeout=max(1.0, deadline - time.monotonic()))
    assert not run.is_alive(), "the ingest did not finish within 600 s"
    seen |= set(zip(group.names, group.search(vectors[0], [10]).versions, strict=True))  # after the commits

    print(f"\n{during} searches during the ingest, {len(errors)} errors; table versions seen: {sorted(seen)}")
    assert result["docs"] == {"seen": 50, "ingested": 35, "unchanged": 15, "failed": 0}
    # ~160 searches on 2 cores under the full suite; a faster machine may run fewer: what matters is
    # that some overlapped the ingest and that each table was searched before and after its commit.
    assert during >= 1 and errors == []
    conn = lancedb.connect(str(db))
    for name in {name for name, _ in seen}:
        versions = sorted(v for n, v in seen if n == name)
        assert len(versions) >= 2, (name, versions)  # searched before and after its commit
        for version in versions:
            table = conn.open_table(name)
            table.checkout(version)
            _whole_documents(table)
    assert sum(_whole_documents(t) for t in store.open_shards(db).values()) == 50
