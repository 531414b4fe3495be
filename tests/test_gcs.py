"""What of gs:// can be tested here: reading a source file through pyarrow's GCS filesystem, against
gcp-storage-emulator (PyPI) found through STORAGE_EMULATOR_HOST, as Google's own libraries find one.

A db on gs:// is not tested: no GCS emulator installable here honours the conditional create
(``ifGenerationMatch=0``) that the writer lock and Lance's commits rely on. A folder source is not
either: listing a prefix of this emulator aborts pyarrow's GCS client (a null JSON field that GCS itself
always fills).
"""

import json
import os
import socket
import subprocess
import sys
import time

import pytest
import requests

from pipelines import ingest, store
from pipelines.config import load_config
from tests.conftest import scifact_docs


@pytest.fixture
def gcs(tmp_path, monkeypatch):
    """A GCS emulator on 127.0.0.1 with a bucket ``src``; STORAGE_EMULATOR_HOST points at it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "gcp_storage_emulator", "start", "--host", "127.0.0.1", "--port", str(port),
         "--in-memory", "--default-bucket", "src"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path, env={**os.environ},
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:
        try:
            requests.get(url, timeout=1)
            break
        except requests.ConnectionError:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                pytest.fail("the GCS emulator did not start")
            time.sleep(0.1)
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", url)
    yield url
    proc.terminate()
    proc.wait(10)


def test_a_jsonl_source_on_gcs_ingests_as_from_disk(ray_local, gcs, tmp_path):
    docs = scifact_docs(30)
    body = "".join(json.dumps(d) + "\n" for d in docs).encode()
    # With its content type: this emulator leaves it null otherwise (GCS never does), which pyarrow aborts on.
    uploaded = requests.post(
        f"{gcs}/upload/storage/v1/b/src/o?uploadType=media&name=corpus.jsonl",
        data=body,
        headers={"Content-Type": "application/x-ndjson"},
    )
    assert uploaded.status_code == 200
    (tmp_path / "corpus.jsonl").write_bytes(body)
    cfg = load_config(None, shards=2, **{"ray.progress_bars": False, "read.docs_per_block": 10})

    remote = ingest.build(source="gs://src/corpus.jsonl", db=tmp_path / "from-gcs", cfg=cfg)
    local = ingest.build(source=tmp_path / "corpus.jsonl", db=tmp_path / "from-disk", cfg=cfg)
    assert remote["docs"] == local["docs"] == {"seen": 30, "ingested": 30, "unchanged": 0, "failed": 0}

    def chunks(db):
        return sorted(
            (r["chunk_id"], r["content_hash"])
            for t in store.open_shards(db).values()
            for r in t.to_arrow().select(["chunk_id", "content_hash"]).to_pylist()
        )

    assert chunks(tmp_path / "from-gcs") == chunks(tmp_path / "from-disk")
    with pytest.raises(Exception, match="does not exist"):
        ingest.build(source="gs://src/missing.jsonl", db=tmp_path / "none", cfg=cfg)
