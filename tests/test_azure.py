"""A db and sources on Azure Blob Storage: Azurite (the Azure Storage emulator) on 127.0.0.1, reached with
the standard variables alone (AZURE_STORAGE_ACCOUNT_NAME, AZURE_STORAGE_ACCOUNT_KEY,
AZURE_STORAGE_USE_EMULATOR, AZURITE_BLOB_STORAGE_URL), as a user points embedpipe at it: no embedpipe
setting. The same checks as the S3 bucket's (tests/test_object_store.py); runs go through the CLI in
processes of their own, whose Ray workers inherit those variables as a user's do."""

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from pipelines import store
from pipelines.cli import app
from pipelines.config import load_config
from tests.conftest import scifact_docs
from tests.helpers import check_store_basics, contend_for_the_writer_lock, kill_once_staged
from tests.test_object_store import _expected_chunks, _rows, _write_corpus

EMBEDPIPE = str(Path(sys.executable).parent / "embedpipe")


def _run(azure, *args: str, config: Path | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **azure.env}
    env.pop("RAY_ADDRESS", None)
    command = [EMBEDPIPE, *args, *(["--config", str(config)] if config else [])]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, check=False)


def _config(tmp_path, **sections) -> Path:
    path = tmp_path / "azure.yaml"
    path.write_text(json.dumps({"shards": 3, "ray": {"progress_bars": False, "num_cpus": 2}, **sections}))
    return path


def test_azurite_honours_create_only_puts_and_lancedb_works_in_it(azure):
    # The second create-only put: Azurite answers 409, Azure 412; both mean taken.
    check_store_basics(store.location(azure.uri("db")), azure.keys)

    fs, path = store.location(azure.uri("db", "a.json")).filesystem()  # the sources' reader
    with fs.open_input_stream(path) as f:
        assert f.read() == b"1"


def test_one_writer_at_a_time_on_azure(azure):
    won, refused = contend_for_the_writer_lock(store.location(azure.uri("db")), contenders=8)
    assert len(won) == 1 and len(refused) == 7, (won, refused)
    assert all(won[0].run_id in message for message in refused)
    won[0].release()


def test_ingest_into_azure_equals_ingest_to_disk(azure, tmp_path):
    docs = scifact_docs(50)
    corpus = _write_corpus(tmp_path, docs)
    azure.put_file("sources/corpus.jsonl", corpus)
    config = _config(tmp_path, read={"docs_per_block": 10})

    local = _run(azure, "ingest", str(corpus), "--db", str(tmp_path / "db"), config=config)
    remote = _run(azure, "ingest", azure.uri("sources/corpus.jsonl"), "--db", azure.uri("db"), config=config)
    assert local.returncode == 0 and remote.returncode == 0, remote.stdout[-3000:] + remote.stderr[-3000:]
    mine, theirs = _rows(tmp_path / "db"), _rows(store.location(azure.uri("db")))
    assert len(mine) >= 50 and mine.keys() == theirs.keys()
    for chunk_id, (content_hash, vector) in mine.items():
        assert theirs[chunk_id][0] == content_hash
        assert np.allclose(theirs[chunk_id][1], vector, atol=0.01)  # int8: batches form as rows arrive

    keys = azure.keys("db/")
    assert "db/embedpipe.json" in keys and any(k.startswith("db/_runs/") for k in keys)
    assert not [k for k in keys if k.startswith("db/_staging/")]

    again = _run(azure, "ingest", azure.uri("sources/corpus.jsonl"), "--db", azure.uri("db"), config=config)
    assert again.returncode == 0, again.stderr[-3000:]
    db = store.location(azure.uri("db"))
    reports = [json.loads(db.read_bytes(o["path"])) for o in db.list("_runs/") if o["path"].endswith(".json")]
    last = max(reports, key=lambda r: r["started_at"])
    assert last["docs"]["unchanged"] == 50 and last["embeddings"]["computed"] == 0
    assert _rows(db).keys() == mine.keys()

    found = CliRunner().invoke(app, ["query", docs[0]["title"], "--db", azure.uri("db"), "-k", "3", "--json"])
    assert found.exit_code == 0, found.output
    assert json.loads(found.output)["results"][0]["doc_id"] == docs[0]["_id"]


def test_a_folder_of_files_in_a_container_is_read_with_its_failures(azure, tmp_path):
    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.md").write_text("# Alpha\n\nThe first document is about alpha particles.")
    (folder / "sub" / "b.html").write_text("<title>Beta</title><p>The second one is about beta decay.</p>")
    (folder / "empty.txt").write_text("")
    (folder / "c.xyz").write_text("an unsupported kind of file")
    azure.put_tree("docs", folder)
    result = _run(azure, "ingest", azure.uri("docs") + "/", "--db", azure.uri("db"), "--report",
                  str(tmp_path / "report.json"), config=_config(tmp_path))  # fmt: skip
    assert result.returncode == 3, result.stdout[-3000:] + result.stderr[-3000:]  # some documents failed
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["docs"]["ingested"] == 2 and report["docs"]["failed"] == 2
    assert {f["doc_id"] for f in report["failures"]} == {"empty.txt", "c.xyz"}
    assert {c.split("#")[0] for c in _rows(store.location(azure.uri("db")))} == {"a.md", "sub/b.html"}


def test_a_missing_container_and_a_refused_key_are_one_error_line_each(azure, tmp_path, monkeypatch):
    corpus = _write_corpus(tmp_path, scifact_docs(3))
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    for env, db, said in (
        ({}, "az://no-such-container/db", "the container does not exist"),
        ({"AZURE_STORAGE_ACCOUNT_KEY": base64.b64encode(b"w" * 64).decode()}, azure.uri("db"), "refused"),
        ({"AZURE_STORAGE_ACCOUNT_KEY": "not base64!"}, azure.uri("db"), "not a valid key"),
    ):
        result = runner.invoke(app, ["ingest", str(corpus), "--db", db], env=env)
        message = " ".join(result.output.split())  # one message, wrapped at the terminal's width
        assert result.exit_code == 1 and result.output.count("error:") == 1 and said in message, result.output
        assert "Traceback" not in result.output
        print(f"\n{message}")
        source = runner.invoke(app, ["ingest", "az://no-such-container/c.jsonl", "--db", str(tmp_path / "d")],
                               env=env)  # fmt: skip
        assert source.exit_code == 1 and source.output.count("error:") == 1, source.output
        print(" ".join(source.output.split()))
    assert azure.keys() == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.jsonl"]  # nothing written locally either


@pytest.mark.slow
def test_sigkilled_driver_on_azure_then_rerun_gives_the_same_rows(azure, tmp_path):
    docs = scifact_docs(60)
    corpus = _write_corpus(tmp_path, docs)
    azure.put_file("sources/corpus.jsonl", corpus)
    config = _config(
        tmp_path,
        storage={"lock_lease_s": 10},
        read={"docs_per_block": 5},
        chunking={"docs_per_batch": 5},
        embedding={"batch_size": 16},
    )
    command = [EMBEDPIPE, "ingest", azure.uri("sources/corpus.jsonl"), "--db", azure.uri("db"),
               "--config", str(config)]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **azure.env}
    env.pop("RAY_ADDRESS", None)
    kill_once_staged(command, env, lambda: azure.keys("db/_staging/"))
    stale = {k.split("/")[2] for k in azure.keys("db/_staging/")}
    assert len(stale) == 1
    db = store.location(azure.uri("db"))
    assert sum(store.shard_rows(db).values()) == 0  # nothing committed: every shard at its last commit

    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900, check=False)
    assert rerun.returncode == 0, rerun.stderr[-4000:]
    assert f"removed the staging of run {stale.pop()}" in rerun.stderr + rerun.stdout
    assert "waiting for run" not in rerun.stderr + rerun.stdout  # a dead holder's lease is not waited out
    assert set(_rows(db)) == _expected_chunks(corpus, load_config(config))  # and none twice (_rows)
    assert not azure.keys("db/_staging/")
