"""The Serve application on 127.0.0.1 over a real ingested db, with the real model."""

import json
import socket

import pytest
import requests

from pipelines import index, ingest
from pipelines.config import ServeSettings, load_config
from pipelines.search import Searcher
from tests.conftest import scifact_docs

KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {KEY}"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(ray_local, tmp_path_factory, scifact):
    from ray import serve

    from serve.app import ServeConfig, build_app

    root = tmp_path_factory.mktemp("serve")
    docs = scifact_docs(80)
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(d) + "\n" for d in docs))
    db = root / "db"
    cfg = load_config(None, shards=4, **{"ray.progress_bars": False})
    ingest.build(source=corpus, db=db, cfg=cfg)
    index.build(db, settings=cfg.index)  # small shards: exact search, plus BM25 for hybrid mode
    port = _free_port()
    # No CPU reservations, so that an ingest can run beside the app on the 2-CPU test cluster.
    settings = ServeSettings(
        shard_cpus=0, router_cpus=0, refresh_s=0, max_query_chars=300, max_body_bytes=4096
    )
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(
        build_app(ServeConfig(db=str(db), settings=settings, api_key=KEY, device="cpu", dtype="fp32")),
        name="embedpipe",
        route_prefix="/",
    )
    yield f"http://127.0.0.1:{port}", db, docs, cfg, root
    serve.shutdown()


def _search(url, **body):
    return requests.post(f"{url}/search", json=body, headers=AUTH, timeout=60)


def test_search_matches_local_search(served):
    url, db, docs, *_ = served
    searcher = Searcher(db, device="cpu", dtype="fp32")
    for doc in docs[:12]:
        response = _search(url, query=doc["title"], k=10)
        assert response.status_code == 200, response.text
        body = response.json()
        local = searcher.search(doc["title"], k=10)
        assert [h["chunk_id"] for h in body["results"]] == local["chunk_id"].to_pylist()
        for hit, score in zip(body["results"], local["score"].to_pylist(), strict=True):
            assert abs(hit["score"] - score) < 1e-4
        assert body["results"][0]["doc_id"] == doc["_id"]
        assert body["took_ms"] > 0
        assert len({h["shard"] for h in body["results"]}) >= 1


def test_filter_is_a_prefilter(served):
    url, _, docs, *_ = served
    target = docs[5]["_id"]
    response = _search(url, query="cancer", k=5, filter=f"doc_id = '{target}'")
    assert response.status_code == 200, response.text
    assert {h["doc_id"] for h in response.json()["results"]} == {target}


@pytest.mark.parametrize(
    ("flt", "needle"), [("nosuchcolumn = 1", "nosuchcolumn"), ("doc_id = ", "invalid filter")]
)
def test_bad_filter_is_a_400_naming_the_problem(served, flt, needle):
    url, *_ = served
    response = _search(url, query="x", filter=flt)
    assert response.status_code == 400, response.text
    assert needle in response.json()["detail"]


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        ({"query": "x", "k": 0}, 422, "k"),
        ({"query": "x", "k": 1001}, 422, "k"),
        ({"query": ""}, 422, "query"),
        ({"k": 3}, 422, "query"),
        ({"query": "x", "unknown": 1}, 422, "unknown"),
        ({"query": "x" * 301}, 422, "max_query_chars=300"),
        ({"query": "x", "mode": "sparse"}, 422, "mode"),
    ],
)
def test_bad_requests_are_4xx(served, body, status, needle):
    url, *_ = served
    response = _search(url, **body)
    assert response.status_code == status, response.text
    assert needle in json.dumps(response.json())


def test_body_limits_and_bad_json(served):
    url, *_ = served
    big = requests.post(
        f"{url}/search",
        data=b"{" + b" " * 5000 + b"}",
        headers={**AUTH, "Content-Type": "application/json"},
        timeout=30,
    )
    assert big.status_code == 413 and "max_body_bytes=4096" in big.json()["detail"], big.text
    bad = requests.post(
        f"{url}/search", data=b"{not json", headers={**AUTH, "Content-Type": "application/json"}, timeout=30
    )
    assert bad.status_code == 422


def test_api_key(served):
    url, *_ = served
    assert requests.post(f"{url}/search", json={"query": "x"}, timeout=30).status_code == 401
    wrong = requests.post(
        f"{url}/search", json={"query": "x"}, headers={"Authorization": "Bearer nope"}, timeout=30
    )
    assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
    assert requests.post(f"{url}/search", json={"k": 0}, timeout=30).status_code == 401  # before validation
    assert requests.get(f"{url}/openapi.json", timeout=30).status_code == 401
    assert requests.get(f"{url}/healthz", timeout=30).status_code == 200


def test_healthz_and_openapi(served):
    url, db, *_ = served
    health = requests.get(f"{url}/healthz", timeout=30).json()
    assert health["model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert [s["shard"] for s in health["shards"]] == [f"shard_{i:03d}" for i in range(4)]
    from pipelines import store

    assert {s["shard"]: s["rows"] for s in health["shards"]} == store.shard_rows(db)
    spec = requests.get(f"{url}/openapi.json", headers=AUTH, timeout=30).json()
    assert "/search" in spec["paths"] and "/healthz" in spec["paths"]


def test_eval_through_the_endpoint_equals_local(served):
    from typer.testing import CliRunner

    from pipelines.cli import app

    url, db, docs, _, root = served
    # A small BEIR collection over the served corpus: each title should find its own document.
    (root / "qrels").mkdir(exist_ok=True)
    (root / "queries.jsonl").write_text(
        "".join(json.dumps({"_id": f"q{i}", "text": d["title"]}) + "\n" for i, d in enumerate(docs[:15]))
    )
    (root / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\t{d['_id']}\t1\n" for i, d in enumerate(docs[:15]))
    )
    runner = CliRunner()
    remote = runner.invoke(
        app, ["eval", str(root), "--endpoint", url, "--json"], env={"EMBEDPIPE_API_KEY": KEY}
    )
    assert remote.exit_code == 0, remote.output
    local = runner.invoke(app, ["eval", str(root), "--db", str(db), "--json"])
    assert local.exit_code == 0, local.output
    remote_scores = json.loads(remote.stdout.strip().splitlines()[-1])
    assert remote_scores == json.loads(local.stdout.strip().splitlines()[-1])
    assert remote_scores["queries"] == 15 and remote_scores["ndcg@10"] > 0.9
    unauthorized = runner.invoke(app, ["eval", str(root), "--endpoint", url], env={"EMBEDPIPE_API_KEY": ""})
    assert unauthorized.exit_code == 1 and "401" in unauthorized.output


def test_hybrid_matches_local_hybrid(served):
    url, db, docs, *_ = served
    searcher = Searcher(db, device="cpu", dtype="fp32")
    for doc in docs[20:26]:
        response = _search(url, query=doc["title"], k=10, mode="hybrid")
        assert response.status_code == 200, response.text
        hits = response.json()["results"]
        local = searcher.search(doc["title"], k=10, mode="hybrid")
        assert [h["chunk_id"] for h in hits] == local["chunk_id"].to_pylist()
        assert hits[0]["doc_id"] == doc["_id"]
        assert all(0 < h["score"] <= 2 / 61 for h in hits)  # fused reciprocal-rank scores


def _metric(text, name, **labels):
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(f"{name}{{{wanted}}} ") or (not labels and line.startswith(f"{name} ")):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_metrics_count_requests_and_cache_hits(served):
    url, *_ = served
    assert requests.get(f"{url}/metrics", timeout=30).status_code == 401
    before = requests.get(f"{url}/metrics", headers=AUTH, timeout=30).text
    for _ in range(3):
        assert _search(url, query="statins and heart disease", k=7).status_code == 200
    after = requests.get(f"{url}/metrics", headers=AUTH, timeout=30)
    assert after.status_code == 200 and after.headers["content-type"].startswith("text/plain")
    text = after.text
    hits = _metric(text, "embedpipe_cache_lookups_total", outcome="hit")
    assert hits - _metric(before, "embedpipe_cache_lookups_total", outcome="hit") == 2
    ok = _metric(text, "embedpipe_requests_total", path="/search", status="200")
    assert ok - _metric(before, "embedpipe_requests_total", path="/search", status="200") == 3
    assert _metric(text, "embedpipe_embed_batch_size_count") >= 1
    assert _metric(text, "embedpipe_request_seconds_count", path="/search") >= 3


def test_new_ingest_invalidates_the_cache(served, tmp_path):
    url, db, _, cfg, _ = served
    query = "axolotl limb regrowth"
    before = _search(url, query=query, k=1).json()["results"]
    assert before and before[0]["doc_id"] != "new-doc"
    assert _search(url, query=query, k=1).json()["results"] == before  # now cached
    corpus = tmp_path / "new.jsonl"
    corpus.write_text(
        json.dumps({"_id": "new-doc", "title": "Axolotl limb regrowth", "text": "Axolotls regrow limbs."})
        + "\n"
    )
    ingest.build(source=corpus, db=db, cfg=cfg)
    hits = _search(url, query=query, k=1).json()["results"]
    assert hits[0]["doc_id"] == "new-doc"
    # Rows not yet in the full-text index are still found by hybrid search.
    hybrid = _search(url, query="axolotls regrow", k=3, mode="hybrid").json()["results"]
    assert hybrid[0]["doc_id"] == "new-doc"


def test_build_app_takes_serve_run_arguments(tmp_path):
    # `serve run serve.app:build_app db=DIR` hands the builder a dict of strings.
    from ray.serve import Application

    from serve.app import build_app
    from tests.test_index import _db

    db, *_ = _db(tmp_path, rows_per_shard=10, shards=3)
    app = build_app({"db": str(db), "settings": {"memory_rows": "0"}})
    assert isinstance(app, Application)
    with pytest.raises(ValueError, match="db"):
        build_app({"settings": {}})
