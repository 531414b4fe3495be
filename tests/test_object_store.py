"""A db and sources on object storage: a real S3 endpoint on 127.0.0.1 (moto's server), the real
LanceDB and Ray. A db in a bucket must hold what the same run writes to a local folder."""

import json
import socket
import time

import numpy as np
import pytest
import requests
from typer.testing import CliRunner

from pipelines import index, ingest, store
from pipelines.cli import app
from pipelines.config import ServeSettings, load_config
from pipelines.search import Searcher
from tests.conftest import scifact_docs, start_moto
from tests.helpers import check_store_basics, contend_for_the_writer_lock, kill_once_staged

SETTINGS = {"ray": {"progress_bars": False}, "read": {"docs_per_block": 10}}


def _config(s3, **extra):
    return load_config(
        None, shards=3, **{"storage.endpoint": s3.endpoint, "storage.region": "us-east-1"}, **extra
    )


def _write_corpus(tmp_path, docs):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(d) + "\n" for d in docs))
    return corpus


def _rows(db) -> dict[str, tuple[str, list[float]]]:
    """chunk_id -> (content_hash, vector) over every shard; fails on a chunk stored twice."""
    rows: dict[str, tuple[str, list[float]]] = {}
    for table in store.open_shards(db).values():
        for row in table.to_arrow().select(["chunk_id", "content_hash", "vector"]).to_pylist():
            assert row["chunk_id"] not in rows, f"{row['chunk_id']} stored twice"
            rows[row["chunk_id"]] = (row["content_hash"], row["vector"])
    return rows


def test_the_endpoint_honours_conditional_writes_and_lancedb_works_in_it(s3):
    import botocore

    client = s3.client()
    client.put_object(Bucket=s3.bucket, Key="k", Body=b"1", IfNoneMatch="*")
    with pytest.raises(botocore.exceptions.ClientError, match="PreconditionFailed"):
        client.put_object(Bucket=s3.bucket, Key="k", Body=b"2", IfNoneMatch="*")

    loc = store.location(s3.uri("db"), load_config(None, **{"storage.endpoint": s3.endpoint}).storage)
    check_store_basics(loc, s3.keys)


def test_one_writer_at_a_time_and_stale_leases_are_taken_over(s3):
    db = store.location(s3.uri("db"), load_config(None, **{"storage.endpoint": s3.endpoint}).storage)
    # Eight contenders at once: the conditional put lets exactly one create the next lease.
    won, refused = contend_for_the_writer_lock(db, contenders=8)
    assert len(won) == 1 and len(refused) == 7, (won, refused)
    assert all(won[0].run_id in message for message in refused)
    won[0].release()

    # A lease held on another machine: waited for while fresh, taken over once it has expired.
    other = {"run_id": "elsewhere", "host": "node-b", "boot_id": "other", "pid": 1, "released": False}
    n = int(s3.keys("db/_lock/writer/")[-1].rsplit("/", 1)[-1][:-5])
    db.write_bytes(
        f"_lock/writer/{n + 1:012d}.json", json.dumps({**other, "expires": time.time() + 60}).encode()
    )
    with pytest.raises(store.LockTimeout, match="elsewhere.*node-b"):
        store.WriterLock(db, run_id="mine", wait_s=0.5).acquire()
    db.write_bytes(
        f"_lock/writer/{n + 1:012d}.json", json.dumps({**other, "expires": time.time() - 1}).encode()
    )
    with store.writer_lock(db, run_id="mine", wait_s=0) as lock:
        assert lock.number == n + 2
        lock.check()
        # Another run took the lock (this one's lease ran out): this run must not commit.
        db.create(
            f"_lock/writer/{n + 3:012d}.json", json.dumps({**other, "expires": time.time() + 60}).encode()
        )
        with pytest.raises(store.LockLost):
            lock.check()


def test_ingest_into_a_bucket_equals_ingest_to_disk(ray_local, s3, tmp_path, scifact):
    docs = scifact_docs(60)
    corpus = _write_corpus(tmp_path, docs)
    s3.put_file("sources/corpus.jsonl", corpus)
    cfg = _config(s3, **{"ray.progress_bars": False, "read.docs_per_block": 10})

    local = ingest.build(source=corpus, db=tmp_path / "db", cfg=cfg)
    remote = ingest.build(source=s3.uri("sources/corpus.jsonl"), db=s3.uri("db"), cfg=cfg)
    assert remote["docs"] == local["docs"] == {"seen": 60, "ingested": 60, "unchanged": 0, "failed": 0}
    mine, theirs = _rows(tmp_path / "db"), _rows(store.location(s3.uri("db"), cfg.storage))
    assert mine.keys() == theirs.keys()
    for chunk_id, (content_hash, vector) in mine.items():
        assert theirs[chunk_id][0] == content_hash
        assert np.allclose(theirs[chunk_id][1], vector, atol=1e-6)

    # Every part of the db is in the bucket: manifest, report, log, the tables; no staging left.
    keys = s3.keys("db/")
    assert "db/embedpipe.json" in keys
    assert f"db/_runs/{remote['run_id']}.json" in keys and f"db/_runs/{remote['run_id']}.log" in keys
    assert any(k.startswith("db/_embed_cache.lance/") for k in keys)
    assert not [k for k in keys if k.startswith("db/_staging/")]
    assert remote["log"] == s3.uri("db", "_runs", f"{remote['run_id']}.log")

    again = ingest.build(source=s3.uri("sources/corpus.jsonl"), db=s3.uri("db"), cfg=cfg)
    assert again["docs"]["unchanged"] == 60 and again["embeddings"]["computed"] == 0
    assert _rows(store.location(s3.uri("db"), cfg.storage)).keys() == mine.keys()

    # The CLI's other commands take the bucket too (the endpoint from the environment here).
    env = {"AWS_ENDPOINT_URL": s3.endpoint}
    runner = CliRunner()
    found = runner.invoke(
        app, ["query", docs[0]["title"], "--db", s3.uri("db"), "-k", "3", "--json"], env=env
    )
    assert found.exit_code == 0, found.output
    assert json.loads(found.output)["results"][0]["doc_id"] == docs[0]["_id"]
    planned = runner.invoke(app, ["plan", "--docs", "100000", "--db", s3.uri("db"), "--json"], env=env)
    assert planned.exit_code == 0, planned.output
    assert json.loads(planned.output)["basis"]["bytes_per_chunk_source"].startswith("measured: db size")


def test_a_folder_of_files_in_a_bucket_is_read_with_its_failures(ray_local, s3, tmp_path):
    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.md").write_text("# Alpha\n\nThe first document is about alpha particles.")
    (folder / "sub" / "b.txt").write_text("The second document is about beta decay.")
    (folder / "empty.txt").write_text("")
    (folder / "c.xyz").write_text("an unsupported kind of file")
    (folder / "big.txt").write_text("x" * 3000)
    s3.put_tree("docs", folder)
    cfg = _config(s3, **{"ray.progress_bars": False, "read.max_doc_mb": 0.002})
    result = ingest.build(source=s3.uri("docs") + "/", db=s3.uri("db"), cfg=cfg)
    assert result["docs"]["ingested"] == 2 and result["docs"]["failed"] == 3
    reasons = {f["doc_id"]: f["reason"] for f in result["failures"]}
    assert reasons.keys() == {"empty.txt", "c.xyz", "big.txt"}, reasons
    assert "over max_doc_mb" in reasons["big.txt"] and "unsupported" in reasons["c.xyz"]
    rows = _rows(store.location(s3.uri("db"), cfg.storage))
    assert {chunk_id.split("#")[0] for chunk_id in rows} == {"a.md", "sub/b.txt"}


def test_bad_buckets_are_one_clear_error_and_nothing_is_written(s3, tmp_path, monkeypatch):
    corpus = _write_corpus(tmp_path, scifact_docs(3))
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    cases = [
        ({"AWS_ENDPOINT_URL": s3.endpoint}, "s3://no-such-bucket-here/db", "the bucket does not exist"),
        (
            {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{closed_port}"},
            s3.uri("db"),
            "the endpoint does not answer",
        ),
    ]
    for env, db, said in cases:
        started = time.monotonic()
        result = runner.invoke(app, ["ingest", str(corpus), "--db", db], env=env)
        assert result.exit_code != 0
        message = " ".join(result.output.split())  # one message, wrapped at the terminal's width
        assert result.output.count("error:") == 1 and said in message, result.output
        assert message.startswith("error: Cannot reach") and "Traceback" not in result.output
        assert time.monotonic() - started < 60
    assert s3.keys() == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.jsonl"]  # no local "s3:" folder


def test_refused_credentials_are_one_clear_error(tmp_path, monkeypatch):
    import boto3

    # A second server that checks signatures: its first three calls make a user and its key.
    proc, endpoint = start_moto(env={"INITIAL_NO_AUTH_ACTION_COUNT": "3"})
    try:
        iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1")
        iam.create_user(UserName="embedpipe")
        key = iam.create_access_key(UserName="embedpipe")["AccessKey"]
        policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
        iam.put_user_policy(UserName="embedpipe", PolicyName="all", PolicyDocument=json.dumps(policy))
        good = {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}
        owner = boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name="us-east-1",
            aws_access_key_id=good["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=good["AWS_SECRET_ACCESS_KEY"],
        )
        owner.create_bucket(Bucket="locked")
        corpus = _write_corpus(tmp_path, scifact_docs(3))
        runner = CliRunner()
        for env, said in (
            ({**good, "AWS_SECRET_ACCESS_KEY": "wrong"}, "credentials were refused"),
            ({**good, "AWS_ACCESS_KEY_ID": "AKIANOSUCHKEY"}, "access key is not known"),
        ):
            result = runner.invoke(
                app,
                ["ingest", str(corpus), "--db", "s3://locked/db"],
                env={**env, "AWS_ENDPOINT_URL": endpoint},
            )
            message = " ".join(result.output.split())
            assert result.exit_code != 0 and result.output.count("error:") == 1 and said in message, (
                result.output
            )
        assert owner.list_objects_v2(Bucket="locked").get("KeyCount", 0) == 0  # nothing half-written
    finally:
        proc.terminate()
        proc.wait(10)


def test_serve_and_index_from_a_bucket_answer_as_from_disk(ray_local, s3, tmp_path):
    from ray import serve

    from serve.app import ServeConfig, build_app

    docs = scifact_docs(40)
    corpus = _write_corpus(tmp_path, docs)
    cfg = _config(s3, **{"ray.progress_bars": False})
    for db in (tmp_path / "db", s3.uri("db")):
        ingest.build(source=corpus, db=db, cfg=cfg)
        index.build(store.location(db, cfg.storage), settings=cfg.index, lock=cfg.storage)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = ServeSettings(shard_cpus=0, router_cpus=0, refresh_s=0)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        for name, db in (("disk", str(tmp_path / "db")), ("bucket", s3.uri("db"))):
            serve.run(
                build_app(
                    ServeConfig(db=db, settings=settings, storage=cfg.storage, device="cpu", dtype="fp32")
                ),
                name=name,
                route_prefix=f"/{name}",
            )
        local = Searcher(tmp_path / "db", device="cpu", dtype="fp32")
        for doc in docs[:6]:
            for mode in ("vector", "hybrid"):
                answers = [
                    requests.post(
                        f"http://127.0.0.1:{port}/{name}/search",
                        json={"query": doc["title"], "k": 5, "mode": mode},
                        timeout=60,
                    ).json()["results"]
                    for name in ("disk", "bucket")
                ]
                assert [h["chunk_id"] for h in answers[0]] == [h["chunk_id"] for h in answers[1]]
                assert answers[1][0]["doc_id"] == doc["_id"]
                expected = local.search(doc["title"], k=5, mode=mode)["chunk_id"].to_pylist()
                assert [h["chunk_id"] for h in answers[1]] == expected

        # A new ingest into the bucket: the replicas follow the new table versions, no restart.
        new = tmp_path / "new.jsonl"
        new.write_text(
            json.dumps({"_id": "new-doc", "title": "Axolotl limb regrowth", "text": "Axolotls regrow."})
        )
        ingest.build(source=new, db=s3.uri("db"), cfg=cfg)
        query = {"query": "axolotl limb regrowth", "k": 1}
        deadline, hits = time.time() + 30, []
        while time.time() < deadline and not (hits and hits[0]["doc_id"] == "new-doc"):
            hits = requests.post(f"http://127.0.0.1:{port}/bucket/search", json=query, timeout=60).json()[
                "results"
            ]
            time.sleep(0.2)
        assert hits[0]["doc_id"] == "new-doc"
    finally:
        serve.shutdown()


# --- whole runs as a user starts them: the CLI, in processes of their own ---------------------------


def _cli_setup(s3, tmp_path, n_docs: int):
    """A corpus in the bucket, a config that reaches the bucket, and the CLI's command and env."""
    import os
    import sys
    from pathlib import Path

    corpus = _write_corpus(tmp_path, scifact_docs(n_docs))
    s3.put_file("sources/corpus.jsonl", corpus)
    config = tmp_path / "s3.yaml"
    config.write_text(
        json.dumps(
            {
                "shards": 3,
                "storage": {"endpoint": s3.endpoint, "region": "us-east-1", "lock_lease_s": 10},
                "read": {"docs_per_block": 5},
                "chunking": {"docs_per_batch": 5},
                "embedding": {"batch_size": 16},
                "ray": {"progress_bars": False, "num_cpus": 2},
            }
        )
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("RAY_ADDRESS", None)
    command = [str(Path(sys.executable).parent / "embedpipe"), "ingest", s3.uri("sources/corpus.jsonl"),
               "--db", s3.uri("db"), "--config", str(config)]  # fmt: skip
    return corpus, config, command, env


def _expected_chunks(corpus, cfg) -> set[str]:
    import pyarrow as pa

    from pipelines import chunking, sources

    docs = pa.Table.from_pylist(
        [sources.record_to_doc(json.loads(line), source="", where="") for line in corpus.open()],
        schema=sources.DOC_SCHEMA,
    )
    return set(chunking.chunk_docs(docs, model=cfg.embedding.model)["chunk_id"].to_pylist())


@pytest.mark.slow
def test_two_runs_started_together_on_one_bucket_commit_once(s3, tmp_path):
    import subprocess

    corpus, config, command, env = _cli_setup(s3, tmp_path, 40)
    runs = [
        subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(2)
    ]
    outputs = [run.communicate(timeout=900)[0] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs
    waited = [out for out in outputs if "waiting for run" in out]
    assert len(waited) == 1, outputs  # the other run waited for the first's lock, then found its work done

    cfg = load_config(config)
    db = store.location(s3.uri("db"), cfg.storage)
    reports = [json.loads(db.read_bytes(o["path"])) for o in db.list("_runs/") if o["path"].endswith(".json")]
    assert sorted(r["docs"]["ingested"] for r in reports) == [0, 40]
    assert sorted(r["docs"]["unchanged"] for r in reports) == [0, 40]
    rows = _rows(db)
    assert set(rows) == _expected_chunks(corpus, cfg)
    writers = {
        r["run_id"]
        for t in store.open_shards(db).values()
        for r in t.to_arrow().select(["run_id"]).to_pylist()
    }
    assert len(writers) == 1  # exactly one run's rows
    assert not s3.keys("db/_staging/")


@pytest.mark.slow
def test_sigkilled_driver_on_a_bucket_then_rerun_gives_the_same_rows(s3, tmp_path):
    import subprocess

    corpus, config, command, env = _cli_setup(s3, tmp_path, 60)
    cfg = load_config(config)
    kill_once_staged(command, env, lambda: s3.keys("db/_staging/"))
    stale = {k.split("/")[2] for k in s3.keys("db/_staging/")}
    assert len(stale) == 1
    db = store.location(s3.uri("db"), cfg.storage)
    assert sum(store.shard_rows(db).values()) == 0  # nothing committed: every shard at its last commit

    started = time.monotonic()
    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900, check=False)
    assert rerun.returncode == 0, rerun.stderr[-4000:]
    assert f"removed the staging of run {stale.pop()}" in rerun.stderr + rerun.stdout
    assert "waiting for run" not in rerun.stderr + rerun.stdout  # a dead holder's lease is not waited out
    print(f"\nrerun after the kill: {time.monotonic() - started:.1f} s")
    assert set(_rows(db)) == _expected_chunks(corpus, cfg)  # and no chunk twice (_rows checks)
    assert not s3.keys("db/_staging/")


def test_reading_a_db_that_is_not_there_creates_nothing(tmp_path, s3):
    missing = tmp_path / "typo-db"
    for db in (missing, s3.uri("typo-db")):
        with pytest.raises(store.StoreError, match="not an embedpipe db"):
            store.read_manifest(
                store.location(db, load_config(None, **{"storage.endpoint": s3.endpoint}).storage)
            )
    assert not store.is_db(missing) and store.location(missing).list() == []
    runner = CliRunner()
    for command in (["index", "--db", str(missing)], ["query", "x", "--db", str(missing)]):
        assert runner.invoke(app, command).exit_code != 0
    assert not missing.exists() and s3.keys() == []


def test_parquet_in_a_bucket_with_a_broken_file_fails_that_file_only(ray_local, s3, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "pq"
    folder.mkdir()
    docs = [{k: d[k] for k in ("_id", "title", "text")} for d in scifact_docs(12)]
    for i in range(2):
        pq.write_table(pa.Table.from_pylist(docs[i * 6 : (i + 1) * 6]), folder / f"part-{i}.parquet")
    (folder / "part-9.parquet").write_bytes(b"PAR1 not really parquet")
    s3.put_tree("pq", folder)
    cfg = _config(s3, **{"ray.progress_bars": False})
    result = ingest.build(source=s3.uri("pq"), db=s3.uri("db"), cfg=cfg)
    assert result["docs"]["ingested"] == 12 and result["docs"]["failed"] == 1
    assert result["failures"][0]["doc_id"] == s3.uri("pq", "part-9.parquet")
    assert "unreadable Parquet file" in result["failures"][0]["reason"]
    again = ingest.build(source=s3.uri("pq"), db=s3.uri("db"), cfg=cfg)  # the quick check reads it too
    assert again["docs"] == {"seen": 13, "ingested": 0, "unchanged": 12, "failed": 1}


def test_lease_edge_cases_containers_and_stalled_contenders(tmp_path, monkeypatch):
    from pipelines.store import lock as lock_module

    db = store.location(tmp_path / "db")
    here = lock_module._machine()
    dead = {"run_id": "gone", "pid": 2**22 + 12345, "released": False, "expires": time.time() + 60}
    # Same host and boot but another pid namespace (a container beside us): its pid means nothing
    # here, so the lease is waited for, not taken.
    db.write_bytes("_lock/writer/000000000001.json", json.dumps({**dead, **here, "pid_ns": "other"}).encode())
    with pytest.raises(store.LockTimeout, match="gone"):
        store.WriterLock(db, run_id="mine", wait_s=0).acquire()
    # The same machine and namespace, and the process is gone: taken at once.
    db.write_bytes("_lock/writer/000000000001.json", json.dumps({**dead, **here}).encode())
    with store.writer_lock(db, run_id="first", wait_s=0) as first:
        assert first.number == 2
    with store.writer_lock(db, run_id="second", wait_s=0) as second:
        assert second.number == 3
        assert not db.create("_lock/writer/000000000002.json", b"{}")  # the lease before the top stays
        # A contender that looked long ago (top was 0) creates lease 1, which is no longer the top:
        # it must not take the lock, and it removes what it made.
        stale = store.WriterLock(db, run_id="stalled", wait_s=0)
        views = iter([(0, None)])
        real = stale.holder
        monkeypatch.setattr(stale, "holder", lambda: next(views, None) or real())
        with pytest.raises(store.LockTimeout, match="second"):
            stale.acquire()
        assert not db.exists("_lock/writer/000000000001.json")
        second.check()  # the holder still holds


def test_a_run_that_will_not_wait_for_the_lock_says_who_holds_it(tmp_path):
    corpus = _write_corpus(tmp_path, scifact_docs(3))
    config = tmp_path / "nowait.yaml"
    config.write_text("storage:\n  lock_wait_s: 0\n")
    db = store.location(tmp_path / "db")
    with store.writer_lock(db, run_id="holder-run"):
        result = CliRunner().invoke(app, ["ingest", str(corpus), "--db", db.uri, "--config", str(config)])
    message = " ".join(result.output.split())
    assert result.exit_code == 1 and result.output.count("error:") == 1, result.output
    assert "is being written by run holder-run" in message and "Traceback" not in result.output
    assert not (db.path / "embedpipe.json").exists()


def test_generations_in_a_bucket_reshard_promote_and_drop(ray_local, s3, tmp_path, scifact):
    from pipelines import rebuild

    docs = scifact_docs(20)
    cfg = _config(s3, **{"ray.progress_bars": False})
    ingest.build(source=_write_corpus(tmp_path, docs), db=s3.uri("db"), cfg=cfg)
    db = store.location(s3.uri("db"), cfg.storage)
    before = _rows(db)
    report = rebuild.reshard(db=s3.uri("db"), shards=2, cfg=cfg)
    assert report["embeddings"]["computed"] == 0 and report["check"]["chunks"] == len(before)
    assert db.exists("_gen/2/build.json")
    rebuild.promote(db=s3.uri("db"), generation=2, cfg=cfg)
    assert store.read_manifest(db).shards == 2 and _rows(db) == before
    rebuild.drop(db=s3.uri("db"), generation=1, cfg=cfg)
    assert [g["generation"] for g in rebuild.generations(s3.uri("db"), cfg)] == [2]
    assert not [o for o in db.list() if o["path"].startswith("shard_")]  # generation 1's tables are gone
    hits = Searcher(db, device="cpu", dtype="fp32").search(docs[0]["title"], k=1)
    assert hits["doc_id"][0].as_py() == docs[0]["_id"]
