"""Generations: reshard and reembed from the stored chunks, promote, drop, a killed reembed resumed,
and a running service following the switch. Real Ray, LanceDB on tmp_path, the real model (and a
variant of it as the second model)."""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import lancedb
import numpy as np
import pytest
import requests
from typer.testing import CliRunner

from pipelines import index, ingest, rebuild, store
from pipelines.cli import app
from pipelines.config import ServeSettings, load_config
from pipelines.search import Searcher
from tests.conftest import scifact_docs
from tests.helpers import variant_model, wait_for

SETTINGS = {"embedding.dtype": "fp32", "chunking.docs_per_batch": 8, "ray.progress_bars": False}


def _cfg(**overrides):
    return load_config(None, **{**SETTINGS, **overrides})


def _write(path: Path, docs: list[dict]) -> Path:
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    return path


def _rows(db, generation: int) -> dict[str, dict]:
    """Every chunk of a generation by chunk_id, with its shard."""
    rows = {}
    for name, table in store.open_shards(db, generation).items():
        for row in table.to_arrow().to_pylist():
            rows[row["chunk_id"]] = {**row, "shard": name}
    return rows


@pytest.fixture
def small_db(ray_local, tmp_path, scifact):
    docs = scifact_docs(32)
    corpus = _write(tmp_path / "corpus.jsonl", docs)
    db = tmp_path / "db"
    ingest.build(source=corpus, db=db, cfg=_cfg(shards=4))
    return db, corpus, docs


def test_a_db_made_before_generations_reads_as_generation_1(tmp_path):
    old = {"layout": 1, "shards": 3, "model": "m", "dim": 8, "vectors": "int8"}
    (tmp_path / store.MANIFEST).write_text(json.dumps(old))
    catalog = store.read_catalog(tmp_path)
    assert catalog.live == 1 and list(catalog.generations) == [1]
    first = store.read_manifest(tmp_path)
    assert (first.shards, first.model, first.dim, first.vectors, first.path) == (3, "m", 8, "int8", "")
    assert store.tables_of(tmp_path, first).uri == str(tmp_path)
    store.update_generation(tmp_path, 1, vectors="mixed")  # the first write turns it into layout 2
    data = json.loads((tmp_path / store.MANIFEST).read_text())
    assert data["layout"] == 2 and data["live"] == 1
    assert store.read_manifest(tmp_path).vectors == "mixed" and store.read_manifest(tmp_path).shards == 3


def test_reshard_copies_every_chunk_once_without_the_model(small_db):
    db, corpus, _ = small_db
    index.build(db, settings=_cfg().index)  # BM25 on generation 1: the new one must get it too
    before = _rows(db, 1)
    report = rebuild.reshard(db=str(db), shards=7, cfg=_cfg())
    assert report["indexes"] and all(s["fts"] for s in report["indexes"])
    assert report["generation"] == 2 and report["embeddings"]["computed"] == 0 and report["backend"] is None
    assert report["check"]["chunks"] == len(before) and report["check"]["duplicates"] == 0
    after = _rows(db, 2)
    assert set(after) == set(before)
    for chunk_id, row in before.items():
        moved = after[chunk_id]
        assert moved["content_hash"] == row["content_hash"] and moved["text"] == row["text"]
        assert np.array_equal(np.asarray(moved["vector"]), np.asarray(row["vector"]))
        assert moved["shard"] == store.shard_name(store.shard_of(row["doc_id"], 7))
    # Built, not live: ingest and search still use generation 1 until promote.
    assert store.read_manifest(db).generation == 1
    assert Searcher(db, device="cpu", dtype="fp32").manifest.shards == 4
    old = Searcher(db, device="cpu", dtype="fp32")
    queries = ["vitamin D", "stem cells and regeneration", "cancer risk in women"]
    expected = {q: old.search(q, k=10) for q in queries}

    result = rebuild.promote(db=str(db), generation=2, cfg=_cfg())
    assert (result["live"], result["previous"], result["caught_up"]) == (2, 1, None)
    new = Searcher(db, device="cpu", dtype="fp32")
    assert new.manifest.generation == 2 and new.manifest.shards == 7
    for query in queries:
        hits = new.search(query, k=10)
        assert hits["chunk_id"].to_pylist() == expected[query]["chunk_id"].to_pylist()
        assert np.allclose(hits["score"].to_numpy(), expected[query]["score"].to_numpy(), atol=1e-6)
    assert new.search("vitamin D", k=5, mode="hybrid").num_rows == 5

    # Ingest follows the live generation's shard count when the config does not set one.
    again = ingest.build(source=corpus, db=db, cfg=_cfg())
    assert again["docs"]["unchanged"] == again["docs"]["seen"] and sorted(again["shards"]) == [
        store.shard_name(i) for i in range(7)
    ]
    with pytest.raises(store.StoreError, match="reshard"):
        ingest.build(source=corpus, db=db, cfg=_cfg(shards=4))  # set explicitly: it must match

    # Back to generation 1 after an edit went into generation 2: promote copies it over first.
    _, _, docs = small_db
    edited = [dict(d) for d in docs]
    edited[3]["text"] = "Sea urchins regrow spines within weeks."
    ingest.build(source=_write(corpus, edited), db=db, cfg=_cfg())
    back = rebuild.promote(db=str(db), generation=1, cfg=_cfg())
    assert (back["live"], back["caught_up"]["docs"], back["caught_up"]["stale_docs"]) == (1, 1, 1)
    one, two = _rows(db, 1), _rows(db, 2)
    assert one[f"{edited[3]['_id']}#0"]["text"] == edited[3]["text"]
    assert one[f"{edited[3]['_id']}#0"]["vector"] == two[f"{edited[3]['_id']}#0"]["vector"]
    assert set(one) == set(two)
    assert rebuild.promote(db=str(db), generation=2, cfg=_cfg())["caught_up"] is None  # nothing to catch up

    dropped = rebuild.drop(db=str(db), generation=1, cfg=_cfg())
    assert dropped.shards == 4
    assert [g["generation"] for g in rebuild.generations(str(db), _cfg())] == [2]
    assert not any(name.startswith("shard_") for name in lancedb.connect(str(db)).list_tables().tables)


def test_bad_generation_commands_are_one_clear_error_and_change_nothing(small_db):
    db, _, _ = small_db
    building = store.new_generation(db, shards=2, model="m", dim=4, made_by="reshard of 1")
    store.create_tables(db, building)
    manifest = (db / store.MANIFEST).read_bytes()
    tables = sorted(p.name for p in db.rglob("*.lance"))
    runner = CliRunner()
    cases = [
        (["promote", "9", "--db", str(db)], "has no generation 9"),
        (["promote", str(building.generation), "--db", str(db)], "still building"),
        (["drop", "1", "--db", str(db)], "is live"),
        (["drop", "9", "--db", str(db)], "has no generation 9"),
        (["reshard", "--db", str(db), "--shards", "0"], "at least 1"),
        (["reshard", "--db", str(db), "--shards", "-3"], "at least 1"),
        (["reshard", "--db", str(db), "--shards", "4"], "has 4 shards already"),
        (["reembed", "--db", str(db), "--model", "all-MiniLM-L6-v2"], "embedded with"),
        (["reembed", "--db", str(db), "--model", str(db / "no-such-model")], "cannot load the model"),
        (["eval", str(db), "--endpoint", "http://127.0.0.1:9", "--generation", "2"], "--generation"),
    ]
    for args, message in cases:
        result = runner.invoke(app, args)
        assert result.exit_code in (1, 2), (args, result.output)
        assert message in " ".join(result.output.split()), (args, result.output)
        assert (db / store.MANIFEST).read_bytes() == manifest, args
        assert sorted(p.name for p in db.rglob("*.lance")) == tables, args
    with pytest.raises(store.StoreError, match="still building"):
        Searcher(db, generation=building.generation)
    # A dropped generation's number is not given again (a server may still hold it open).
    rebuild.drop(db=str(db), generation=building.generation, cfg=_cfg())
    assert not (db / building.path).exists()
    again = store.new_generation(db, shards=2, model="m", dim=4, made_by="reshard of 1")
    assert again.generation == building.generation + 1


@pytest.mark.slow
def test_reembed_rechunks_catches_up_an_ingest_made_meanwhile_and_promote_one_made_after(small_db, tmp_path):
    """The first ingest runs (its own process and Ray) while the reembed's first pass is under way:
    the build holds only its generation's lock then, so the ingest goes ahead, and the build's last
    pass, under the db's lock, brings the generation in line before it is ready. An ingest after the
    build is caught up by promote."""
    db, corpus, docs = small_db
    model = variant_model(tmp_path / "minilm-max-128")  # max pooling, 128 tokens: chunks of 256 must split
    during = [dict(d) for d in docs[1:]]  # docs[0] goes
    during[0]["text"] = "Planarians regrow a whole body from a small fragment."
    during.append({"_id": "late-doc", "title": "Hydra regeneration", "text": "Hydra regenerate their heads."})
    config = tmp_path / "config.yaml"
    config.write_text("embedding:\n  dtype: fp32\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("RAY_ADDRESS", None)
    ingests = []

    def ingest_once(counts: dict) -> None:
        if not ingests:
            command = [str(Path(sys.executable).parent / "embedpipe"), "ingest", str(_write(corpus, during)),
                       "--db", str(db), "--prune", "--config", str(config)]  # fmt: skip
            ingests.append(subprocess.run(command, env=env, capture_output=True, text=True, timeout=600))

    report = rebuild.reembed(db=str(db), model=model, cfg=_cfg(), progress=ingest_once)
    assert ingests and ingests[0].returncode == 0, ingests[0].stderr[-3000:]
    assert report["passes"][0]["docs"] == len(docs)  # planned before the ingest
    assert report["passes"][1]["docs"] >= 1  # at least the new document came in the last pass
    live, built = _rows(db, 1), _rows(db, 2)
    assert store.read_manifest(db, 2).state == store.READY and store.read_manifest(db).generation == 1
    doc_ids = {r["doc_id"] for r in built.values()}
    assert "late-doc" in doc_ids and docs[0]["_id"] not in doc_ids
    assert built[f"{during[0]['_id']}#0"]["text"] == during[0]["text"]
    assert report["model"] == model and report["dim"] == 384
    assert report["embeddings"]["computed"] >= len(built) > len(live)
    assert max(r["n_tokens"] for r in built.values()) <= 128 < max(r["n_tokens"] for r in live.values())
    assert {r["model"] for r in built.values()} == {model}
    # A document whose chunks all fit the new model keeps them; the others were chunked anew.
    fits = {r["doc_id"] for r in live.values()} - {r["doc_id"] for r in live.values() if r["n_tokens"] > 120}
    kept = [c for c, r in live.items() if r["doc_id"] in fits]
    assert kept and all(c in built and built[c]["text"] == live[c]["text"] for c in kept)
    cosines = [float(np.dot(live[c]["vector"], built[c]["vector"])) for c in kept]
    assert max(cosines) < 0.9999  # another pooling: other vectors
    by_doc = {}
    for row in built.values():
        by_doc.setdefault(row["doc_id"], []).append(row["chunk_index"])
    assert all(sorted(ix) == list(range(len(ix))) for ix in by_doc.values())

    # Ingests into the live generation after the build: an edit, a new document, a removed one.
    after = [dict(d) for d in during[1:]]  # during[0] goes
    after[0]["text"] = "Zebrafish regrow their fins after amputation through blastema formation."
    after.append({"_id": "new-doc", "title": "Axolotl limb regeneration", "text": "Axolotls regrow limbs."})
    ingest.build(source=_write(corpus, after), db=db, cfg=_cfg(), prune=True)
    result = rebuild.promote(db=str(db), generation=2, cfg=_cfg())
    assert result["caught_up"]["docs"] == 2  # the edited and the new document
    assert result["caught_up"]["stale_docs"] == 2  # the edited one's old version, and the removed one
    built = _rows(db, 2)
    doc_ids = {r["doc_id"] for r in built.values()}
    assert during[0]["_id"] not in doc_ids and "new-doc" in doc_ids and "late-doc" in doc_ids
    assert built[f"{after[0]['_id']}#0"]["text"].startswith("Zebrafish regrow")
    searcher = Searcher(db, device="cpu", dtype="fp32")
    assert searcher.manifest.model == model
    assert searcher.search("axolotl limbs", k=1)["doc_id"][0].as_py() == "new-doc"


@pytest.mark.slow
def test_sigkilled_reembed_resumes_and_equals_an_undisturbed_build(ray_local, tmp_path, scifact):
    docs = scifact_docs(64)
    corpus = _write(tmp_path / "corpus.jsonl", docs)
    db, reference = tmp_path / "db", tmp_path / "reference"
    ingest.build(source=corpus, db=db, cfg=_cfg(shards=3))
    shutil.copytree(db, reference)
    model = variant_model(tmp_path / "minilm-max-128")
    rebuild.reembed(db=str(reference), model=model, cfg=_cfg())  # undisturbed

    config = tmp_path / "config.yaml"
    config.write_text("embedding:\n  dtype: fp32\nchunking:\n  docs_per_batch: 8\n")
    command = [str(Path(sys.executable).parent / "embedpipe"), "reembed", "--db", str(db), "--model", model,
               "--config", str(config), "--commit-every-s", "0", "--json"]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("RAY_ADDRESS", None)
    driver = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        committed = 0
        while committed == 0 and driver.poll() is None and time.time() < deadline:
            time.sleep(0.3)
            with contextlib.suppress(Exception):  # the generation's tables may not exist yet
                committed = sum(store.shard_rows(db, 2).values())
        assert driver.poll() is None, "the reembed ended before it could be killed"
        driver.send_signal(signal.SIGKILL)
        driver.wait(30)
    finally:
        with contextlib.suppress(ProcessLookupError):
            driver.kill()
    partial = sum(store.shard_rows(db, 2).values())
    assert partial > 0 and store.read_manifest(db, 2).state == store.BUILDING
    print(f"\nSIGKILLed the reembed with {partial} chunks committed")

    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert rerun.returncode == 0, rerun.stderr[-4000:]
    report = json.loads(rerun.stdout)
    assert report["resumed"] and report["generation"] == 2
    assert report["passes"][0]["docs"] < len(docs)  # only what the killed run had not committed
    assert [g["generation"] for g in rebuild.generations(str(db), _cfg())] == [1, 2]
    resumed, undisturbed = _rows(db, 2), _rows(reference, 2)
    assert set(resumed) == set(undisturbed)
    worst = max(
        float(np.max(np.abs(np.asarray(resumed[c]["vector"]) - np.asarray(undisturbed[c]["vector"]))))
        for c in resumed
    )
    assert worst < 1e-4, worst
    for chunk_id, row in resumed.items():
        other = undisturbed[chunk_id]
        assert (row["text"], row["content_hash"], row["shard"]) == (
            other["text"],
            other["content_hash"],
            other["shard"],
        )


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_a_running_service_follows_promote_without_a_failed_or_mixed_answer(small_db, tmp_path):
    from ray import serve

    from serve.app import ServeConfig, build_app

    db, _, docs = small_db
    model = variant_model(tmp_path / "minilm-max-128")
    rebuild.reembed(db=str(db), model=model, cfg=_cfg())
    port = _free_port()
    settings = ServeSettings(shard_cpus=0, router_cpus=0, refresh_s=0, generation_poll_s=0.2)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(
        build_app(ServeConfig(db=str(db), settings=settings, device="cpu", dtype="fp32")),
        name="generations",
        route_prefix="/",
    )
    url = f"http://127.0.0.1:{port}"
    try:
        queries = [d["title"] for d in docs[:6]]

        def ask(query: str, generation: int | None = None) -> dict:
            body = {"query": query, "k": 5} | ({"generation": generation} if generation else {})
            response = requests.post(f"{url}/search", json=body, timeout=60)
            assert response.status_code == 200, response.text
            return response.json()

        expected = {g: {q: ask(q, g)["results"] for q in queries} for g in (1, 2)}
        assert all(expected[1][q] != expected[2][q] for q in queries)  # two models, two answers
        listed = requests.get(f"{url}/api/generations", timeout=10).json()
        assert listed["live"] == 1 and [g["generation"] for g in listed["generations"]] == [1, 2]
        assert 'id="generation"' in requests.get(url, timeout=10).text

        answers: list[tuple[str, int, list]] = []
        failures: list[str] = []
        stop = threading.Event()

        def load(worker: int) -> None:
            i = worker
            while not stop.is_set():
                query = queries[i % len(queries)]
                i += 1
                try:
                    body = ask(query)
                    answers.append((query, body["generation"], body["results"]))
                except Exception as exc:  # noqa: BLE001 - counted, then asserted on
                    failures.append(repr(exc))

        threads = [threading.Thread(target=load, args=(w,)) for w in range(4)]
        for thread in threads:
            thread.start()
        # Waits for conditions, each with a deadline: answers of generation 1 first, then the switch,
        # then enough answers after it for the check below.
        assert wait_for(lambda: len(answers) >= 8 or failures, 120) and not failures, failures[:3]
        rebuild.promote(db=str(db), generation=2, cfg=_cfg())
        assert wait_for(lambda: requests.get(f"{url}/healthz", timeout=10).json().get("generation") == 2, 120)
        switched = len(answers)
        assert wait_for(lambda: len(answers) >= switched + 24 or failures, 120), failures[:3]
        stop.set()
        for thread in threads:
            thread.join(60)
        assert not failures, failures[:3]
        generations = [g for _, g, _ in answers]
        assert 1 in generations[:switched] and set(generations[switched + 8 :]) == {2}
        for query, generation, results in answers:  # each answer wholly one generation's
            want = expected[generation][query]
            assert [h["chunk_id"] for h in results] == [h["chunk_id"] for h in want]
            assert np.allclose([h["score"] for h in results], [h["score"] for h in want], atol=1e-4)
        health = requests.get(f"{url}/healthz", timeout=10).json()
        assert health["generation"] == 2 and health["model"] == model and health["status"] == "ok"
    finally:
        serve.shutdown()


def test_check_generation_finds_a_lost_and_a_doubled_chunk(small_db):
    db, _, _ = small_db
    rebuild.reshard(db=str(db), shards=2, cfg=_cfg())
    live, built = store.read_manifest(db, 1), store.read_manifest(db, 2)
    table = store.open_shards(db, 2)[store.shard_name(0)]
    row = table.search().where("chunk_index = 0").limit(1).to_arrow()
    table.add(row)  # the same chunk twice
    with pytest.raises(rebuild.RebuildError, match="1 chunks stored more than once"):
        rebuild.check_generation(store.location(db), live, built)
    table.delete(f"chunk_id = '{row['chunk_id'][0].as_py()}'")  # now lost
    with pytest.raises(rebuild.RebuildError, match="missing"):
        rebuild.check_generation(store.location(db), live, built)
    table.add(row)  # once again: every chunk stored exactly once, and the check passes
    rebuild.check_generation(store.location(db), live, built)
