"""The Serve application on 127.0.0.1 over a real ingested db, with the real model."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests

from pipelines import index, ingest, store
from pipelines.config import ServeSettings, load_config
from pipelines.search import Searcher
from tests.conftest import scifact_docs

KEY = "test-key-123"
MODEL = "sentence-transformers/all-MiniLM-L6-v2"
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


def test_no_request_is_a_server_error(served, tmp_path):
    # schemathesis (its CLI: its pytest plugin does not run under pytest 9) sends every operation of the
    # OpenAPI schema with bodies, parameters and headers it makes up, valid and invalid (modes,
    # fusions, weights, filters, k, collapse...): each answer must be a 2xx or a 4xx, never a 5xx.
    url, *_ = served
    done = subprocess.run(
        [str(Path(sys.executable).with_name("st")), "run", f"{url}/openapi.json", "--checks",
         "not_a_server_error", "--max-examples", "25", "--request-timeout", "60", "--header",
         f"Authorization: {AUTH['Authorization']}", "--generation-deterministic", "--no-color"],
        capture_output=True, text=True, timeout=900, cwd=tmp_path,
        env={**os.environ, "SCHEMATHESIS_HOOKS": "", "HOME": str(tmp_path)},
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    import re

    cases = re.search(r"(\d+) generated, (\d+) passed", done.stdout)
    assert cases, done.stdout[-3000:]
    print(f"\nschemathesis: {cases.group(0)}")
    assert int(cases.group(1)) == int(cases.group(2)) >= 100, done.stdout[-3000:]


def _search(url, **body):
    return requests.post(f"{url}/search", json=body, headers=AUTH, timeout=60)


def test_search_matches_local_search(served):
    url, db, docs, *_ = served
    searcher = Searcher(db, device="cpu", dtype="fp32")
    shards = store.read_manifest(db).shards
    seen_shards = set()
    for doc in docs[:12]:
        started = time.perf_counter()
        response = _search(url, query=doc["title"], k=10)
        round_trip_ms = (time.perf_counter() - started) * 1000
        assert response.status_code == 200, response.text
        body = response.json()
        local = searcher.search(doc["title"], k=10)
        assert [h["chunk_id"] for h in body["results"]] == local["chunk_id"].to_pylist()
        for hit, score in zip(body["results"], local["score"].to_pylist(), strict=True):
            assert abs(hit["score"] - score) < 1e-4
        assert body["results"][0]["doc_id"] == doc["_id"]
        assert 0 < body["took_ms"] < round_trip_ms  # the server's own time, within what the client saw
        # each hit names the shard its document is stored in
        for hit in body["results"]:
            assert hit["shard"] == store.shard_name(store.shard_of(hit["doc_id"], shards))
        seen_shards.update(h["shard"] for h in body["results"])
    assert len(seen_shards) == shards  # the answers came from every shard


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
        ({"query": "x", "mode": "sparse"}, 422, "'vector', 'text' or 'hybrid'"),
        ({"query": "x", "mode": "hybrid", "fusion": "max"}, 422, "'convex' or 'rrf'"),
        ({"query": "x", "mode": "hybrid", "weight": 1.5}, 422, "less than or equal to 1"),
        ({"query": "x", "mode": "hybrid", "weight": -0.1}, 422, "greater than or equal to 0"),
        ({"query": "x", "collapse": "title"}, 422, "'doc_id'"),
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
    assert requests.get(f"{url}/healthz", timeout=30).json() == {"status": "ok"}  # details need the key
    health = requests.get(f"{url}/healthz", headers=AUTH, timeout=30).json()
    assert health["status"] == "ok" and health["model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert [s["shard"] for s in health["shards"]] == [f"shard_{i:03d}" for i in range(4)]
    from pipelines import store

    assert {s["shard"]: s["rows"] for s in health["shards"]} == store.shard_rows(db)
    # What the router holds for them: the small shards' vectors, ids and shown columns, within the bound.
    from pipelines.index import bytes_per_row

    memory = health["memory"]
    assert memory["rows"] == sum(store.shard_rows(db).values())
    # Per row: a vector of 4 x 384 B and the shown columns, plus a fixed part (LanceDB's table metadata
    # in its caches: ~100 KB a shard) that a db this small spreads over few rows.
    assert memory["bytes_per_row"] > 4 * 384, memory
    assert memory["bytes_held"] <= 4 * 2**18 + memory["rows"] * bytes_per_row("exact", dim=384), memory
    # BM25: the generation's term statistics (`embedpipe index` stored them) and rescored rows' terms.
    assert 0 < memory["bm25_bytes"] <= 32 * 2**20, memory
    # (at or before the shard's version: another test may ingest into this db after its index)
    assert all(0 < s["bm25_version"] <= s["version"] for s in health["shards"]), health["shards"]
    spec = requests.get(f"{url}/openapi.json", headers=AUTH, timeout=30).json()
    assert "/search" in spec["paths"] and "/healthz" in spec["paths"]
    request = spec["components"]["schemas"]["SearchRequest"]["properties"]
    assert request["k"]["maximum"] == 300 and request["query"]["maxLength"] == 300  # the config's limits


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
    unauthorized = runner.invoke(app, ["eval", str(root), "--endpoint", url], env={"EMBEDPIPE_API_KEY": "no"})
    assert unauthorized.exit_code == 1 and "401" in unauthorized.output
    empty = runner.invoke(app, ["eval", str(root), "--endpoint", url], env={"EMBEDPIPE_API_KEY": ""})
    assert empty.exit_code == 1 and "set but empty" in empty.output


@pytest.mark.parametrize("fusion", ["rrf", "convex"])
def test_hybrid_matches_local_hybrid(served, fusion):
    url, db, docs, *_ = served
    searcher = Searcher(db, device="cpu", dtype="fp32")
    for doc in docs[20:26]:
        response = _search(url, query=doc["title"], k=10, mode="hybrid", fusion=fusion, weight=0.6)
        assert response.status_code == 200, response.text
        hits = response.json()["results"]
        local = searcher.search(doc["title"], k=10, mode="hybrid", fusion=fusion, weight=0.6)
        assert [h["chunk_id"] for h in hits] == local["chunk_id"].to_pylist()
        assert hits[0]["doc_id"] == doc["_id"]
        if fusion == "rrf":
            assert all(0 < h["score"] <= 2 / 61 for h in hits)  # fused reciprocal-rank scores
        else:
            assert all(0 < h["score"] <= 1 + 1e-6 for h in hits)  # weights summing to 1 of [0, 1] scores


def test_text_mode_is_bm25_alone_and_matches_local(served):
    url, db, docs, *_ = served
    searcher = Searcher(db, device="cpu", dtype="fp32")
    for doc in docs[30:34]:
        response = _search(url, query=doc["title"], k=5, mode="text")
        assert response.status_code == 200, response.text
        hits = response.json()["results"]
        local = searcher.search(doc["title"], k=5, mode="text")
        assert [h["chunk_id"] for h in hits] == local["chunk_id"].to_pylist()
        np.testing.assert_allclose([h["score"] for h in hits], local["score"].to_pylist(), atol=1e-4)
        assert hits[0]["score"] > 1  # BM25 scores, not cosine similarities or fused ranks


@pytest.mark.parametrize("mode", ["vector", "text", "hybrid"])
def test_collapse_gives_one_chunk_per_document_with_a_filter(served, mode):
    url, *_ = served
    body = {"query": "cancer cells", "k": 5, "mode": mode, "filter": "chunk_index >= 0"}
    chunks = _search(url, **{**body, "k": 40})
    assert chunks.status_code == 200, chunks.text
    ranked = [h["doc_id"] for h in chunks.json()["results"]]
    assert len(set(ranked)) < len(ranked)  # some documents have several matching chunks
    collapsed = _search(url, **body, collapse="doc_id")
    assert collapsed.status_code == 200, collapsed.text
    docs = [h["doc_id"] for h in collapsed.json()["results"]]
    assert len(docs) == len(set(docs)) == 5
    assert docs == list(dict.fromkeys(ranked))[:5]  # each document at the rank of its best chunk


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


# Hostile input: each attack gets its 4xx, nothing of the schema, the server's paths or other columns
# leaks, and the service keeps answering.

LEAKS = ("vector", "metadata", "source", "/tmp", "/home", "/root", "Traceback", "lance", "DataFusion")


def _no_leak(response, db=None, sent=""):
    """Nothing in the body but what the client sent itself: no schema, paths or internals."""
    body = response.text
    for word in LEAKS:
        assert word in sent or word not in body, (word, body)
    if db is not None:
        assert str(db) not in body


@pytest.mark.parametrize(
    ("flt", "needle"),
    [
        ("source LIKE '/home/alice%'", "'source' is not a filterable column"),
        ("metadata LIKE '%secret%'", "'metadata' is not a filterable column"),
        ("vector[1] > 0.5", "subscript"),
        ("nosuchcolumn = 1", "'nosuchcolumn' is not a filterable column"),
        (r"regexp_like(repeat(text,200),'(\w+\s+){1,30}zz')", "REGEXP_LIKE() is not allowed"),
        ("length(repeat(text,1000)) > 0", "LENGTH() is not allowed"),
        ("doc_id = 'a'; DROP TABLE shard_000", "one predicate"),
        ("doc_id IN (SELECT doc_id FROM shard_000)", "subquery"),
        ("chunk_index = 'x'", "holds numbers"),
        ("(" * 600 + "doc_id = 'a'" + ")" * 600, "invalid filter"),
    ],
)
def test_filter_attacks_are_400s_that_leak_nothing(served, flt, needle):
    url, db, *_ = served
    response = _search(url, query="cancer", k=3, filter=flt[:2000])
    assert response.status_code == (400 if len(flt) <= 2000 else 422), response.text
    if len(flt) <= 2000:
        assert needle in response.json()["detail"]
    _no_leak(response, db, sent=flt)


def test_allowed_filters_still_filter(served):
    url, _, docs, *_ = served
    ids = [docs[1]["_id"], docs[2]["_id"]]
    response = _search(
        url, query="cancer", k=20, filter=f"doc_id IN ('{ids[0]}', '{ids[1]}') AND chunk_index >= 0"
    )
    assert response.status_code == 200, response.text
    assert {h["doc_id"] for h in response.json()["results"]} == set(ids)
    quote = _search(url, query="x", k=3, filter="title = 'it''s' OR title LIKE '%''%'")
    assert quote.status_code == 200, quote.text


def test_open_paths_take_no_body_and_bodies_are_cut_at_the_limit(served):
    url, *_ = served

    def chunks(n):
        for _ in range(n):
            yield b"x" * 65536

    for path in ("/healthz", "/", "/runs", "/runs/abc"):
        response = requests.post(f"{url}{path}", data=b"{}", timeout=30)
        assert response.status_code == 405, (path, response.text)
    try:  # 64 MiB, chunked (no Content-Length): refused without being read
        response = requests.post(f"{url}/healthz", data=chunks(1024), timeout=60)
        assert response.status_code == 405
    except requests.ConnectionError:
        pass  # the service answered and closed while the client was still sending: also a refusal
    streamed = requests.post(
        f"{url}/search", data=chunks(2), headers={**AUTH, "Content-Type": "application/json"}, timeout=60
    )
    assert streamed.status_code == 413 and "max_body_bytes=4096" in streamed.text
    assert requests.get(f"{url}/healthz", timeout=30).status_code == 200  # still answering


def test_host_header_is_checked_against_dns_rebinding(served):
    url, *_ = served
    port = url.rsplit(":", 1)[1]
    for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.evil.example"):
        response = requests.post(
            f"{url}/search", json={"query": "x"}, headers={**AUTH, "Host": host}, timeout=30
        )
        assert response.status_code == 400 and "Host" in response.json()["detail"], host
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", "localhost"):
        response = requests.post(
            f"{url}/search", json={"query": "x", "k": 1}, headers={**AUTH, "Host": host}, timeout=30
        )
        assert response.status_code == 200, host


def test_large_k_is_refused_or_not_cached(served):
    url, *_ = served
    assert _search(url, query="x", k=301).status_code == 422  # over the default max_k
    before = requests.get(f"{url}/metrics", headers=AUTH, timeout=30).text
    for _ in range(2):
        assert _search(url, query="cholesterol lowering drugs", k=150).status_code == 200
    after = requests.get(f"{url}/metrics", headers=AUTH, timeout=30).text
    hit = lambda text: _metric(text, "embedpipe_cache_lookups_total", outcome="hit")  # noqa: E731
    assert hit(after) == hit(before)  # k=150 is over cache_max_k=100: computed twice, never kept


def test_error_bodies_carry_no_paths(served):
    url, db, *_ = served
    missing = requests.get(f"{url}/api/runs/20990101-000000-abcdef", headers=AUTH, timeout=30)
    assert missing.status_code == 404
    _no_leak(missing, db)


def test_empty_or_missing_keys_refuse_to_start(tmp_path):
    from pydantic import ValidationError

    from pipelines.config import ConfigError, api_key_from_env
    from serve.app import ServeConfig

    with pytest.raises(ConfigError, match="set but empty"):
        api_key_from_env({"EMBEDPIPE_API_KEY": " "})
    with pytest.raises(ValidationError):
        ServeConfig(db="x", api_key="")
    key_file = tmp_path / "key"
    key_file.write_text("s3cret\n")
    assert api_key_from_env({"EMBEDPIPE_API_KEY_FILE": str(key_file)}) == "s3cret"
    assert api_key_from_env({}) is None
    (tmp_path / "empty").write_text("\n")
    for env, needle in [
        ({"EMBEDPIPE_API_KEY_FILE": str(tmp_path / "empty")}, "is empty"),
        ({"EMBEDPIPE_API_KEY_FILE": str(tmp_path / "nope")}, "Cannot read"),
        ({"EMBEDPIPE_API_KEY_FILE": str(key_file), "EMBEDPIPE_API_KEY": "k"}, "not both"),
    ]:
        with pytest.raises(ConfigError, match=needle):
            api_key_from_env(env)


def test_serve_command_refuses_an_empty_key(tmp_path):
    from typer.testing import CliRunner

    from pipelines.cli import app

    result = CliRunner().invoke(app, ["serve", "--db", str(tmp_path)], env={"EMBEDPIPE_API_KEY": ""})
    assert result.exit_code != 0 and "set but empty" in result.output


def test_eval_scores_the_queries_the_service_answers(served):
    from typer.testing import CliRunner

    from pipelines.cli import app

    url, db, docs, _, root = served
    beir = root / "refused-beir"
    (beir / "qrels").mkdir(parents=True, exist_ok=True)
    (beir / "corpus.jsonl").write_text("")
    queries = [{"_id": f"q{i}", "text": d["title"]} for i, d in enumerate(docs[:5])]
    queries.append({"_id": "long", "text": "word " * 100})  # 500 characters: over max_query_chars=300
    (beir / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    (beir / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\n"
        + "".join(f"q{i}\t{d['_id']}\t1\n" for i, d in enumerate(docs[:5]))
        + f"long\t{docs[0]['_id']}\t1\n"
    )
    result = CliRunner().invoke(
        app, ["eval", str(beir), "--endpoint", url, "--json"], env={"EMBEDPIPE_API_KEY": KEY}
    )
    assert result.exit_code == 0, result.output
    scores = json.loads(result.stdout.strip().splitlines()[-1])
    assert scores["queries"] == 5 and scores["refused"] == 1 and "long" in scores["refused_queries"]
    assert "max_query_chars=300" in scores["refused_queries"]["long"]
    assert "1 of 6 queries refused" in result.output


def test_a_query_past_its_deadline_is_a_504(served):
    from ray import serve

    from serve.app import ServeConfig, build_app

    url, db, *_ = served
    settings = ServeSettings(shard_cpus=0, router_cpus=0, query_timeout_s=0.0005, cache_size=0)
    serve.run(
        build_app(ServeConfig(db=str(db), settings=settings, api_key=KEY, device="cpu", dtype="fp32")),
        name="deadline",
        route_prefix="/deadline",
    )
    try:
        response = requests.post(f"{url}/deadline/search", json={"query": "x"}, headers=AUTH, timeout=60)
        assert response.status_code == 504 and "query_timeout_s" in response.json()["detail"]
        assert _search(url, query="x", k=1).status_code == 200  # the main app is untouched
    finally:
        serve.delete("deadline")


def test_healthz_says_degraded_while_a_shard_cannot_refresh(served):
    url, db, *_ = served
    # Its table versions gone from sight (its data files stay): a refresh cannot find the latest version,
    # while the version being served can still be read (answers read their rows from it).
    shard_dir = db / "shard_001.lance" / "_versions"
    moved = db / "moved-away"
    shard_dir.rename(moved)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            health = requests.get(f"{url}/healthz", timeout=30).json()
            if health["status"] == "degraded":
                break
            time.sleep(0.5)
        assert health == {"status": "degraded"}  # no details without the key
        detailed = requests.get(f"{url}/healthz", headers=AUTH, timeout=30).json()
        failing = [s for s in detailed["shards"] if s.get("refresh_failing_s") is not None]
        assert [s["shard"] for s in failing] == ["shard_001"]
        body = requests.get(f"{url}/healthz", headers=AUTH, timeout=30).text
        assert str(db).lstrip("/") not in body and "lance error" not in body  # the cause is logged only
        assert _search(url, query="cancer", k=3).status_code == 200  # the last good version serves
    finally:
        moved.rename(shard_dir)
    deadline = time.monotonic() + 30
    while requests.get(f"{url}/healthz", timeout=30).json()["status"] != "ok":
        assert time.monotonic() < deadline, "healthz did not recover"
        time.sleep(0.5)


def test_serve_command_refuses_a_busy_port(tmp_path):
    from typer.testing import CliRunner

    from pipelines.cli import app
    from tests.test_index import _db

    db, *_ = _db(tmp_path, rows_per_shard=10, shards=1)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = CliRunner().invoke(app, ["serve", "--db", str(db), "--port", str(port)], env={})
    assert result.exit_code != 0 and f"cannot serve on 127.0.0.1:{port}" in result.output


def test_the_router_embeds_on_a_gpu_only_when_it_reserved_one(tmp_path, monkeypatch):
    import torch

    from pipelines.config import ServeSettings
    from serve.app import ServeConfig, build_app
    from serve.router import _query_embedder
    from tests.test_index import _db

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU node, as torch sees it
    embedder = _query_embedder(MODEL, "auto", ServeSettings(query_engine="torch"))
    assert embedder.device == "cpu" and embedder.dtype == "fp32"  # no GPU reserved: never cuda:0
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU build of torch
    with pytest.raises(RuntimeError, match="reserved a GPU.*sees no CUDA device"):
        _query_embedder(MODEL, "auto", ServeSettings(router_gpus=1))

    import serve.app

    db, *_ = _db(tmp_path, rows_per_shard=5, shards=1)
    monkeypatch.setattr(serve.app, "_cluster_resources", lambda: {"CPU": 2.0, "GPU": 1.0})
    app = build_app(ServeConfig(db=str(db), settings=ServeSettings(router_gpus=1)))
    assert app._bound_deployment.ray_actor_options["num_gpus"] == 1
    monkeypatch.setattr(serve.app, "_cluster_resources", lambda: {"CPU": 2.0})  # no GPU: fails at once
    with pytest.raises(serve.app.LayoutError, match="router_gpus reserves 1 GPUs but the cluster has 0"):
        build_app(ServeConfig(db=str(db), settings=ServeSettings(router_gpus=1)))
    with pytest.raises(ValueError, match="router_gpus"):
        build_app(ServeConfig(db=str(db), device="cuda"))


@pytest.mark.parametrize("precision", ["fp32", "bf16", "int8"])
def test_search_and_local_query_embed_alike_in_every_precision(served, precision):
    """/search and embedpipe query's Searcher give the same chunk ids and scores whatever precision
    embeds the query (bf16 is native on AVX512-BF16/AMX CPUs, where OpenVINO would otherwise run
    fp32 as bf16; int8 is the cached quantized model)."""
    from ray import serve

    from pipelines.embedding import backends
    from serve.app import ServeConfig, build_app

    url, db, docs, *_ = served
    target = backends.int8_dir(backends.cache_root(), MODEL)
    made = precision == "int8" and not (target / "model.xml").exists()
    if made:  # the quantized model an int8 ingest would have cached; removed after, see below
        backends.quantize(MODEL, [d["text"] for d in docs[:64]], target)
    route = f"/p-{precision}"
    settings = ServeSettings(shard_cpus=0, router_cpus=0, cache_size=0)
    serve.run(
        build_app(ServeConfig(db=str(db), settings=settings, api_key=KEY, dtype=precision)),
        name=f"parity-{precision}",
        route_prefix=route,
    )
    try:
        searcher = Searcher(db, device="cpu", dtype=precision)
        assert searcher.embedder.dtype == precision
        for doc in docs[:20]:
            response = requests.post(f"{url}{route}/search", json={"query": doc["title"], "k": 10},
                                     headers=AUTH, timeout=60)  # fmt: skip
            assert response.status_code == 200, response.text
            hits = response.json()["results"]
            local = searcher.search(doc["title"], k=10)
            assert [h["chunk_id"] for h in hits] == local["chunk_id"].to_pylist()
            np.testing.assert_allclose([h["score"] for h in hits], local["score"].to_pylist(), atol=1e-5)
    finally:
        serve.delete(f"parity-{precision}")
        if made:  # calibrated on 64 documents: no later int8 ingest of the suite may reuse it
            shutil.rmtree(target)


def test_queries_follow_the_documents_precision(monkeypatch):
    from pipelines.embedding import backends, query
    from pipelines.embedding.query import query_precision

    monkeypatch.setattr(query, "_int8_model", lambda model: "/cached/int8")
    monkeypatch.setattr(backends, "cpu_has_int8_dot", lambda: True)
    monkeypatch.setattr(backends, "cpu_has_native_bf16", lambda: True)
    auto = {v: query_precision(vectors=v, device="cpu", model=MODEL) for v in ("int8", "bf16", "fp32", None)}
    assert auto == {"int8": "int8", "bf16": "bf16", "fp32": "fp32", None: "fp32"}
    assert query_precision(vectors="int8", device="cpu", dtype="fp32", model=MODEL) == "fp32"  # asked for
    assert query_precision(vectors="int8", device="cuda", model=MODEL) == "fp16"
    monkeypatch.setattr(backends, "cpu_has_int8_dot", lambda: False)  # int8 gains nothing without VNNI/AMX
    monkeypatch.setattr(backends, "cpu_has_native_bf16", lambda: False)
    assert query_precision(vectors="int8", device="cpu", model=MODEL) == "fp32"
    assert query_precision(vectors="bf16", device="cpu", model=MODEL) == "fp32"
    monkeypatch.setattr(backends, "cpu_has_int8_dot", lambda: True)
    monkeypatch.setattr(query, "_int8_model", lambda model: None)  # no quantized model on this machine
    assert query_precision(vectors="int8", device="cpu", model=MODEL) == "fp32"


def test_a_layout_the_cluster_cannot_hold_fails_at_once_saying_what_to_change(tmp_path, monkeypatch):
    import serve.app
    from serve.app import LayoutError, ServeConfig, build_app, shard_groups
    from tests.test_index import _db

    db, *_ = _db(tmp_path, rows_per_shard=5, shards=16)
    monkeypatch.setattr(serve.app, "_cluster_resources", lambda: {"CPU": 2.0})
    monkeypatch.setattr(serve.app, "_alive_nodes", lambda: 1)
    app = build_app(ServeConfig(db=str(db)))  # 16 shards on 2 CPUs: the router holds them all
    assert (
        app._bound_deployment.init_args[0] == []
        and app._bound_deployment.ray_actor_options["num_cpus"] == 0.5
    )
    with pytest.raises(LayoutError, match=r"reserves 8.5 CPUs .* cluster has 2. Lower serve.shard_groups"):
        build_app(ServeConfig(db=str(db), settings=ServeSettings(shard_groups=16, shard_cpus=0.5)))
    with pytest.raises(LayoutError, match="resource 'search_node'"):
        build_app(
            ServeConfig(
                db=str(db), settings=ServeSettings(shard_groups=2, shard_resources={"search_node": 1})
            )
        )
    assert [shard_groups("auto", shards=4, nodes=n) for n in (1, 2, 8)] == [0, 2, 4]
    assert shard_groups(9, shards=4, nodes=1) == 4


def test_sixteen_shards_serve_on_two_cpus_and_answer_as_four(served, tmp_path):
    """The served 4-shard db's rows dealt into 16 shards: the app starts on the 2-CPU test Ray with
    the default reservations (the router holds every shard) and answers exactly as the 4-shard app."""
    import lancedb
    import pyarrow as pa
    from ray import serve

    from pipelines import store
    from serve.app import ServeConfig, build_app

    url, db, docs, *_ = served
    manifest = store.read_manifest(db)
    db16 = tmp_path / "db16"
    store.init_db(
        db16, store.Manifest(shards=16, model=manifest.model, dim=manifest.dim, vectors=manifest.vectors)
    )
    rows = pa.concat_tables(t.to_arrow() for t in store.open_shards(db).values())
    owner = pa.array([store.shard_of(d, 16) for d in rows["doc_id"].to_pylist()])
    conn = lancedb.connect(str(db16))
    for s in range(16):
        part = rows.filter(pa.compute.equal(owner, s))
        if part.num_rows:
            conn.open_table(store.shard_name(s)).add(part)
    settings = ServeSettings(max_query_chars=300, cache_size=0)  # router_cpus 0.5, shard_groups auto
    serve.run(
        build_app(ServeConfig(db=str(db16), settings=settings, api_key=KEY, dtype="fp32")),
        name="sixteen",
        route_prefix="/sixteen",
    )
    try:
        health = requests.get(f"{url}/sixteen/healthz", headers=AUTH, timeout=30).json()
        assert health["status"] == "ok" and len(health["shards"]) == 16 and health["rows"] == rows.num_rows
        for doc in docs[:20]:
            body = {"query": doc["title"], "k": 10}
            four = requests.post(f"{url}/search", json=body, headers=AUTH, timeout=60).json()["results"]
            sixteen = requests.post(f"{url}/sixteen/search", json=body, headers=AUTH, timeout=60).json()[
                "results"
            ]
            assert [h["chunk_id"] for h in sixteen] == [h["chunk_id"] for h in four]
            np.testing.assert_allclose([h["score"] for h in sixteen], [h["score"] for h in four], atol=1e-5)
    finally:
        serve.delete("sixteen")


def test_shard_group_deployments_answer_as_the_router_alone(served):
    """The cluster layout on one node: two shard-group deployments behind the router answer exactly
    as the router holding every shard (vector, hybrid, filtered), and /healthz lists every shard."""
    from ray import serve

    from serve.app import ServeConfig, build_app

    url, db, docs, *_ = served
    settings = ServeSettings(shard_groups=2, shard_cpus=0, router_cpus=0, max_query_chars=300, cache_size=0)
    serve.run(
        build_app(ServeConfig(db=str(db), settings=settings, api_key=KEY, device="cpu", dtype="fp32")),
        name="groups",
        route_prefix="/groups",
    )
    try:
        health = requests.get(f"{url}/groups/healthz", headers=AUTH, timeout=30).json()
        assert health["status"] == "ok" and len(health["shards"]) == 4
        assert health["memory"]["rows"] == sum(s["rows"] for s in health["shards"])  # both groups counted
        bodies = [{"query": d["title"], "k": 5, "mode": m} for d in docs[:6] for m in ("vector", "hybrid")]
        bodies.append({"query": docs[0]["title"], "k": 5, "filter": f"doc_id != '{docs[0]['_id']}'"})
        for body in bodies:
            alone = requests.post(f"{url}/search", json=body, headers=AUTH, timeout=60)
            grouped = requests.post(f"{url}/groups/search", json=body, headers=AUTH, timeout=60)
            assert alone.status_code == grouped.status_code == 200, grouped.text
            a, g = alone.json()["results"], grouped.json()["results"]
            assert [h["chunk_id"] for h in g] == [h["chunk_id"] for h in a]
            np.testing.assert_allclose([h["score"] for h in g], [h["score"] for h in a], atol=1e-5)
        bad = requests.post(
            f"{url}/groups/search", json={"query": "x", "filter": "nope = 1"}, headers=AUTH, timeout=60
        )
        assert bad.status_code == 400
    finally:
        serve.delete("groups")


LEAN_PROBE = """
import json, sys
import ray
from serve import lean

ray.init(
    address="local", num_cpus=1, include_dashboard=False,
    runtime_env={"worker_process_setup_hook": lean.HOOK},
)

@ray.remote(num_cpus=0)
class Probe:
    def modules(self):
        before = {m: m in sys.modules for m in ("pandas", "pyarrow")}
        import ray.serve._private.utils as serve_utils  # imports pandas where it can
        import lancedb, pyarrow.dataset  # the router's LanceDB still imports pyarrow
        pandas = "pandas" in sys.modules
        return {"before": before, "serve_pandas": serve_utils.pd is not None, "pandas": pandas}

print(json.dumps(ray.get(Probe.remote().modules.remote())))
"""


def test_the_service_workers_load_neither_pandas_nor_arrow_for_ray():
    """`embedpipe serve`'s worker setup hook (serve.lean): Ray's serialization context is set up
    without pyarrow, Serve's utilities without pandas (~100 MB of RSS in each of Serve's own actors),
    and LanceDB still imports pyarrow."""
    import os
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory(prefix="ep-") as short:  # Ray's socket paths must stay short
        env = {**os.environ, "RAY_TMPDIR": short, "PYTHONPATH": str(Path(__file__).parents[1])}
        probe = [sys.executable, "-c", LEAN_PROBE]
        out = subprocess.run(probe, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen == {"before": {"pandas": False, "pyarrow": False}, "serve_pandas": False, "pandas": False}
