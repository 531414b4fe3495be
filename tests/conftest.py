"""Shared fixtures: one small real Ray for the session, real LanceDB on tmp_path, real model."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The suite's own model cache (exported, quantized and compiled models, autotune's choices), for this
# process and every process and Ray worker it starts, removed at the end: no test reads or writes the
# user's ~/.cache/embedpipe, so no result depends on what ran on this machine before.
TEST_CACHE = tempfile.mkdtemp(prefix="embedpipe-test-cache-")
os.environ["EMBEDPIPE_CACHE"] = TEST_CACHE
atexit.register(shutil.rmtree, TEST_CACHE, True)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The object-storage tests talk to a local moto server only, never to a cloud account: fake keys for
# this process and every Ray worker it starts (before any starts), and no instance-metadata lookups.
os.environ.update(
    AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_REGION="us-east-1",
    AWS_EC2_METADATA_DISABLED="true",
)  # fmt: skip
for _name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
    os.environ.pop(_name, None)

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"
SCIFACT = SHARED / "scifact"


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray with 2 CPUs, shared by every test that needs one."""
    import ray

    # "local": a fresh Ray even when a `ray start` cluster runs on this machine (ray.init would join it).
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def scifact() -> Path:
    if not (SCIFACT / "corpus.jsonl").exists():
        pytest.skip(f"SciFact not found at {SCIFACT}")
    return SCIFACT


def scifact_docs(n: int) -> list[dict]:
    with (SCIFACT / "corpus.jsonl").open() as f:
        return [json.loads(line) for _, line in zip(range(n), f, strict=False)]


@pytest.fixture(scope="session")
def mini_beir(tmp_path_factory, scifact) -> Path:
    """A real BEIR collection cut from SciFact: the judged docs of 20 queries plus 100 others."""
    qrels = [line.rstrip("\n").split("\t") for line in (scifact / "qrels" / "test.tsv").open()][1:]
    queries = sorted({q for q, _, _ in qrels}, key=int)[:20]
    wanted = {d for q, d, _ in qrels if q in queries}
    docs, others = [], 0
    with (scifact / "corpus.jsonl").open() as f:
        for line in f:
            doc = json.loads(line)
            if doc["_id"] in wanted or others < 100:
                others += doc["_id"] not in wanted
                docs.append(doc)
    root = tmp_path_factory.mktemp("mini-beir")
    (root / "qrels").mkdir()
    (root / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    with (root / "qrels" / "test.tsv").open("w") as f:
        f.write("query-id\tcorpus-id\tscore\n")
        f.writelines(f"{q}\t{d}\t{s}\n" for q, d, s in qrels if q in queries)
    with (root / "queries.jsonl").open("w") as out:
        for line in (scifact / "queries.jsonl").open():
            if json.loads(line)["_id"] in queries:
                out.write(line)
    return root


class S3:
    """A bucket on the local S3 server: its endpoint, name, and the config that reaches it."""

    def __init__(self, endpoint: str, bucket: str):
        self.endpoint, self.bucket = endpoint, bucket
        self.storage = {"endpoint": endpoint, "region": "us-east-1"}  # the config's storage: section

    def uri(self, *parts: str) -> str:
        return "/".join([f"s3://{self.bucket}", *parts])

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1")

    def put_file(self, key: str, path: Path) -> None:
        self.client().upload_file(str(path), self.bucket, key)

    def put_tree(self, prefix: str, folder: Path) -> None:
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            self.put_file(f"{prefix}/{path.relative_to(folder).as_posix()}", path)

    def keys(self, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))


def start_moto(*, env: dict[str, str] | None = None):
    """A moto S3 server on a free 127.0.0.1 port, as a subprocess: (process, endpoint)."""
    import socket
    import subprocess
    import sys
    import time

    import requests

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, **(env or {})},
    )  # fmt: skip
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            requests.get(endpoint + "/moto-api/", timeout=1)
            return proc, endpoint
        except requests.ConnectionError:
            time.sleep(0.2)
    proc.kill()
    pytest.fail("the moto S3 server did not start")


@pytest.fixture(scope="session")
def s3_server():
    """One local S3 endpoint (moto) for the session; each test takes a bucket of its own (``s3``)."""
    proc, endpoint = start_moto()
    yield endpoint
    proc.terminate()
    proc.wait(10)


@pytest.fixture
def s3(s3_server) -> S3:
    """A fresh, empty bucket on the session's local S3 server."""
    import secrets

    place = S3(s3_server, f"test-{secrets.token_hex(4)}")
    place.client().create_bucket(Bucket=place.bucket)
    return place


# --- Azure: Azurite, the Azure Storage emulator (npm; `make test` installs it into .venv/azurite) ----

AZURITE_ACCOUNT = "devstoreaccount1"
# Azurite's one development account key, documented in its README: not a secret.
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
AZURITE_BIN = (
    Path(__file__).resolve().parents[1] / ".venv" / "azurite" / "node_modules" / ".bin" / "azurite-blob"
)


class Azure:
    """A container on the local Azurite: the standard variables a user sets to reach it, and helpers."""

    def __init__(self, url: str, container: str):
        self.url, self.container = url, container
        # Only the variables the Rust object_store crate (LanceDB, obstore) reads: no embedpipe setting.
        self.env = {
            "AZURE_STORAGE_ACCOUNT_NAME": AZURITE_ACCOUNT,
            "AZURE_STORAGE_ACCOUNT_KEY": AZURITE_KEY,
            "AZURE_STORAGE_USE_EMULATOR": "true",
            "AZURITE_BLOB_STORAGE_URL": url,
        }

    def uri(self, *parts: str) -> str:
        return "/".join([f"az://{self.container}", *parts])

    def fs(self, key: str = AZURITE_KEY):
        from urllib.parse import urlsplit

        import pyarrow.fs as pafs

        host, scheme = urlsplit(self.url).netloc, urlsplit(self.url).scheme
        return pafs.AzureFileSystem(
            account_name=AZURITE_ACCOUNT, account_key=key, blob_storage_authority=host,
            blob_storage_scheme=scheme, dfs_storage_authority=host, dfs_storage_scheme=scheme,
        )  # fmt: skip

    def put_file(self, key: str, path: Path) -> None:
        with self.fs().open_output_stream(f"{self.container}/{key}") as out:
            out.write(path.read_bytes())

    def put_tree(self, prefix: str, folder: Path) -> None:
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            self.put_file(f"{prefix}/{path.relative_to(folder).as_posix()}", path)

    def keys(self, prefix: str = "") -> list[str]:
        import pyarrow.fs as pafs

        selector = pafs.FileSelector(self.container, recursive=True)
        names = [
            i.path.split("/", 1)[1] for i in self.fs().get_file_info(selector) if i.type == pafs.FileType.File
        ]
        return sorted(n for n in names if n.startswith(prefix))


@pytest.fixture(scope="session")
def azurite_server(tmp_path_factory):
    """One Azurite blob endpoint for the session; each test takes a container of its own (``azure``)."""
    import socket
    import subprocess
    import time

    import requests

    if not AZURITE_BIN.exists():
        message = f"Azurite is not installed at {AZURITE_BIN} (`make test` installs it with npm)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [str(AZURITE_BIN), "--blobHost", "127.0.0.1", "--blobPort", str(port), "--location",
         str(tmp_path_factory.mktemp("azurite")), "--silent", "--skipApiVersionCheck", "--disableTelemetry"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        try:
            requests.get(f"{url}/{AZURITE_ACCOUNT}?comp=list", timeout=1)  # any answer (403) means up
            break
        except requests.ConnectionError:
            time.sleep(0.1)
    else:
        proc.kill()
        pytest.fail("Azurite did not start")
    yield url
    proc.terminate()
    proc.wait(30)


@pytest.fixture
def azure(azurite_server, monkeypatch) -> Azure:
    """A fresh, empty container on the session's Azurite, and its variables in this process's environment."""
    import secrets

    place = Azure(azurite_server, f"test-{secrets.token_hex(4)}")
    place.fs().create_dir(place.container)
    for name, value in place.env.items():
        monkeypatch.setenv(name, value)
    return place
