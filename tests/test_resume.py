"""Crash safety: a killed embedding actor, a retried write task and a SIGKILLed driver lose nothing.

Each disturbed run is compared with an undisturbed run of the same corpus: the same documents
counted the same way, and the same set of (chunk_id, content_hash) rows, with no duplicates.
"""

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import lancedb
import psutil
import pyarrow as pa
import pytest

from pipelines import ingest, store
from pipelines.config import load_config
from pipelines.search import Searcher
from tests.conftest import scifact_docs

SETTINGS = {
    "shards": 3,
    "read": {"docs_per_block": 6},  # several blocks, so that a run is stopped part-way
    "chunking": {"max_tokens": 128, "docs_per_batch": 6},
    "embedding": {"batch_size": 16, "cache_flush_rows": 16},  # the cache grows batch by batch
    "ray": {"progress_bars": False, "num_cpus": 2},
}


def _rows(db) -> list[tuple[str, str]]:
    return sorted(
        (r["chunk_id"], r["content_hash"])
        for t in store.open_shards(db).values()
        for r in t.to_arrow().select(["chunk_id", "content_hash"]).to_pylist()
    )


def _staged_data(db) -> bool:
    """Whether some write task has staged rows already (the run is past its first blocks)."""
    staged = store.location(db).list(store.STAGING_DIR + "/")
    return any("/data/" in o["path"] and o["path"].endswith(".lance") for o in staged)


def _cached_files(db) -> set[Path]:
    """Data files of the embedding cache, which the run's cache writer appends to every 16 rows here."""
    return set((Path(db) / "_embed_cache.lance" / "data").glob("*.lance"))


def _embedders() -> list[psutil.Process]:
    found = []
    for proc in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if "Embedder" in " ".join(proc.cmdline()) and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
    return found


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, scifact):
    root = tmp_path_factory.mktemp("resume")
    docs = scifact_docs(48)
    full, half = root / "corpus.jsonl", root / "half.jsonl"
    full.write_text("".join(json.dumps(d) + "\n" for d in docs))
    half.write_text("".join(json.dumps(d) + "\n" for d in docs[:24]))
    config = root / "config.yaml"
    config.write_text(json.dumps(SETTINGS))  # JSON is YAML
    return full, half, config


@pytest.fixture(scope="module")
def undisturbed(ray_local, corpus, tmp_path_factory):
    full, _, config = corpus
    db = tmp_path_factory.mktemp("undisturbed") / "db"
    report = ingest.build(source=full, db=db, cfg=load_config(config))
    rows = _rows(db)
    print(f"\nundisturbed: {report['docs']}, {len(rows)} chunks, {report['wall_s']} s")
    return report, rows


# --- no Ray needed -------------------------------------------------------------------------------


def _chunk_batch(doc_ids: list[str], dim: int) -> pa.Table:
    rows = [
        {"chunk_id": f"{d}#0", "doc_id": d, "chunk_index": 0, "title": "", "text": f"text of {d}",
         "vector": [0.5] * dim, "n_tokens": 4, "char_start": 0, "char_end": 9, "source": "s",
         "content_hash": f"h-{d}", "metadata": "{}", "status": "ok", "error": None}
        for d in doc_ids
    ]  # fmt: skip
    schema = store.table_schema(dim)
    fields = [f for f in schema if f.name not in ("model", "run_id")]
    fields += [pa.field("status", pa.string()), pa.field("error", pa.string())]
    return pa.Table.from_pylist(rows, schema=pa.schema(fields))


def test_a_retried_write_task_is_committed_once(tmp_path):
    """Ray reruns a write task whose worker died after staging: only the attempt it used is committed."""
    manifest = store.init_db(tmp_path, store.Manifest(shards=2, model="m", dim=4))
    staging = store.Staging(tmp_path, "run", manifest)
    staging.create()
    batch = _chunk_batch([f"doc{i}" for i in range(10)], dim=4)
    lost = store.write_chunks(batch, staging=staging, model="m")  # its result never reached the driver
    used = store.write_chunks(batch, staging=staging, model="m")
    assert lost["attempt"][0].as_py() != used["attempt"][0].as_py()
    # Nothing is committed by the write tasks themselves: their fragments wait for the driver.
    conn = staging.path.connect()
    assert all(conn.open_table(store.shard_name(i)).count_rows() == 0 for i in range(2))
    fragments = json.loads(used["fragments"][0].as_py())
    assert sum(len(f) for f in fragments.values()) == 2  # one per shard the batch touched
    failed: list[list[str]] = []
    with store.writer_lock(store.location(tmp_path), run_id="run") as lock:
        dropped, committed = ingest._commit(
            staging, failed, {used["attempt"][0].as_py()}, fragments, lock=lock
        )
    assert (dropped, committed, failed) == (0, 10, [])
    assert sorted(r[0] for r in _rows(tmp_path)) == sorted(f"doc{i}#0" for i in range(10))


def test_rows_of_a_lost_attempt_are_dropped_even_when_its_fragments_are_added(tmp_path):
    """The second guard: rows staged under an attempt whose result the run did not use never commit."""
    manifest = store.init_db(tmp_path, store.Manifest(shards=2, model="m", dim=4))
    staging = store.Staging(tmp_path, "run", manifest)
    staging.create()
    batch = _chunk_batch([f"doc{i}" for i in range(10)], dim=4)
    lost = store.write_chunks(batch, staging=staging, model="m")
    used = store.write_chunks(batch, staging=staging, model="m")
    fragments: dict[str, list[str]] = {}
    for summary in (lost, used):
        for name, made in json.loads(summary["fragments"][0].as_py()).items():
            fragments.setdefault(name, []).extend(made)
    with store.writer_lock(store.location(tmp_path), run_id="run") as lock:
        dropped, committed = ingest._commit(staging, [], {used["attempt"][0].as_py()}, fragments, lock=lock)
    assert (dropped, committed) == (0, 10)
    assert sorted(r[0] for r in _rows(tmp_path)) == sorted(f"doc{i}#0" for i in range(10))


def test_writer_lock_is_one_at_a_time_and_a_killed_holders_staging_goes(tmp_path):
    db = store.location(tmp_path / "db")
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from pipelines import store\n"
         "db = store.location(sys.argv[1])\n"
         "with store.writer_lock(db, run_id='other-process'):\n"
         "    db.write_bytes('_staging/other-process/shard_000.lance/x', b'staged')\n"
         "    print('ready', flush=True); time.sleep(120)",
         db.uri],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "ready"
        with pytest.raises(store.LockTimeout, match="other-process"):
            store.writer_lock(db, run_id="this-run", wait_s=0).__enter__()
        holder.send_signal(signal.SIGKILL)
        holder.wait(30)
        started = time.monotonic()
        with store.writer_lock(db, run_id="this-run"):  # its holder is gone: no lease to wait out
            assert time.monotonic() - started < 5
            assert store.clean_staging(db, keep="this-run") == ["other-process"]
    finally:
        holder.kill()
    assert not (db.path / store.STAGING_DIR).exists()


# --- on the session's Ray ------------------------------------------------------------------------


@pytest.mark.slow
def test_killed_embedding_actor_is_restarted_and_nothing_is_lost(ray_local, corpus, undisturbed, tmp_path):
    full, _, config = corpus
    db = tmp_path / "db"
    result: dict = {}
    run = threading.Thread(
        target=lambda: result.update(ingest.build(source=full, db=db, cfg=load_config(config)))
    )
    run.start()
    deadline = time.time() + 300
    while not (_staged_data(db) and _embedders()) and run.is_alive() and time.time() < deadline:
        time.sleep(0.2)
    victims = _embedders()
    assert run.is_alive() and victims, "the run ended before an embedding actor could be killed"
    for proc in victims:
        proc.kill()  # SIGKILL: the actor process dies mid-batch
    print(f"\nkilled embedding actor pid(s) {[p.pid for p in victims]} part-way through the run")
    replacements: set[int] = set()
    while run.is_alive():
        replacements |= {p.pid for p in _embedders()} - {p.pid for p in victims}
        time.sleep(0.2)
    run.join()
    report, rows = undisturbed
    print(f"after the kill: {result['docs']}, restarted actor pid(s) {sorted(replacements)}")
    assert replacements, "no embedding actor came back"
    assert result["docs"] == report["docs"]
    assert result["chunks"] == report["chunks"] and result["tokens_embedded"] == report["tokens_embedded"]
    assert _rows(db) == rows


def _descendants(pid: int) -> list[psutil.Process]:
    with contextlib.suppress(psutil.Error):
        return psutil.Process(pid).children(recursive=True)
    return []


def _alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    alive = []
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc)
    return alive


@pytest.mark.slow
def test_sigkilled_driver_then_rerun_equals_an_undisturbed_run(ray_local, corpus, undisturbed, tmp_path):
    full, half, config = corpus
    db = tmp_path / "db"
    first = ingest.build(source=half, db=db, cfg=load_config(config))  # what the kill must not touch
    tables = store.open_shards(db)
    committed = {name: (t.version, t.count_rows()) for name, t in tables.items()}

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("RAY_ADDRESS", None)
    command = [str(Path(sys.executable).parent / "embedpipe"), "ingest", str(full), "--db", str(db),
               "--config", str(config)]  # fmt: skip
    cached_before = _cached_files(db)
    driver = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    children: list[psutil.Process] = []
    try:
        deadline = time.time() + 300
        # Mid-run: new embeddings reached the cache or rows were staged; the commit comes only
        # after the last batch is written.
        while (
            not (_staged_data(db) or _cached_files(db) - cached_before)
            and driver.poll() is None
            and time.time() < deadline
        ):
            children = _descendants(driver.pid) or children
            time.sleep(0.2)
        children = _descendants(driver.pid) or children
        assert driver.poll() is None, "the run ended before it could be killed"
        driver.send_signal(signal.SIGKILL)
        driver.wait(30)
        killed_at = time.time()
        stale = [p.name for p in (db / store.STAGING_DIR).iterdir() if p.is_dir()]
        print(f"\nSIGKILLed the driver (pid {driver.pid}, {len(children)} Ray processes under it) mid-run")

        # Every shard is readable at its last committed version, and searchable.
        conn = lancedb.connect(str(db))
        for name, (version, count) in committed.items():
            table = conn.open_table(name)
            assert (table.version, table.count_rows()) == (version, count), name
            assert len(table.to_arrow()) == count
        assert Searcher(db, device="cpu", dtype="fp32").search("cancer", k=3).num_rows == 3
        assert len(stale) == 1

        # Ray's agents outlive a SIGKILLed driver for a while (about a minute here); the rerun starts its
        # own Ray beside them.
        lingering = _alive(children)
        print(f"still alive when the rerun starts: {[p.name() for p in lingering]}")
        rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, check=False)
        assert rerun.returncode == 0, rerun.stderr[-4000:]
        assert f"removed the staging of run {stale[0]}" in rerun.stderr
        left = _alive(children)
        print(f"still alive {round(time.time() - killed_at)} s after the kill: {[p.name() for p in left]}")
    finally:
        with contextlib.suppress(ProcessLookupError):
            driver.kill()
        for proc in _alive(children):  # only processes this test started
            proc.kill()

    report, rows = undisturbed
    resumed = _rows(db)
    assert not (db / store.STAGING_DIR).exists()
    assert not [cid for cid, n in Counter(cid for cid, _ in resumed).items() if n > 1]
    assert resumed == rows
    assert first["docs"]["ingested"] == 24
    print(f"rerun: {len(resumed)} chunks, identical to the undisturbed run")
