"""A BEIR corpus ingested into a local object store and into a local folder, as a user runs it.

Starts a local S3 server (``moto.server``) or Azure's emulator (Azurite, ``--store azure``; `make test`
installs it into .venv/azurite) on 127.0.0.1, uploads the corpus, then runs the CLI side by side:
``embedpipe ingest`` to disk and to the bucket (time ratio bucket/local), the unchanged re-ingest on the
bucket, the same (chunk_id, content_hash) set and vectors on both, and ``embedpipe eval`` nDCG@10 of both
dbs. A warm-up ingest of a slice first fills this machine's model caches (int8 model, autotune), so neither
timed run pays for them; a second local ingest shows how far two runs' vectors differ without the store.
The CLI reaches the store through the standard variables only (AWS_ENDPOINT_URL...; for Azure
AZURE_STORAGE_ACCOUNT_NAME, AZURE_STORAGE_ACCOUNT_KEY, AZURE_STORAGE_USE_EMULATOR, AZURITE_BLOB_STORAGE_URL).

    python benchmarks/object_store.py ../shared/datasets/scifact --workdir /tmp/bench-s3
    python benchmarks/object_store.py ../shared/datasets/scifact --store azure --workdir /tmp/bench-az
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
EMBEDPIPE = str(Path(sys.executable).parent / "embedpipe")


def start_moto() -> tuple[subprocess.Popen, str]:
    import requests

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            requests.get(endpoint + "/moto-api/", timeout=1)
            return proc, endpoint
        except requests.ConnectionError:
            time.sleep(0.2)
    raise SystemExit("moto did not start")


AZURITE = Path(__file__).resolve().parents[1] / ".venv" / "azurite" / "node_modules" / ".bin" / "azurite-blob"
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


def start_azurite(workdir: Path) -> tuple[subprocess.Popen, str]:
    import requests

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [str(AZURITE), "--blobHost", "127.0.0.1", "--blobPort", str(port),
         "--location", str(workdir / "azurite"), "--silent", "--skipApiVersionCheck", "--disableTelemetry"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            requests.get(f"{url}/devstoreaccount1?comp=list", timeout=1)
            return proc, url
        except requests.ConnectionError:
            time.sleep(0.2)
    raise SystemExit("Azurite did not start")


class S3Store:
    scheme = "s3"

    def __init__(self, workdir: Path) -> None:
        import boto3

        self.proc, endpoint = start_moto()
        self.env = {
            "AWS_ACCESS_KEY_ID": "bench",
            "AWS_SECRET_ACCESS_KEY": "bench",
            "AWS_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_EC2_METADATA_DISABLED": "true",
        }
        self.bucket = f"bench-{secrets.token_hex(3)}"
        self.client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        self.client.create_bucket(Bucket=self.bucket)

    def upload(self, path: Path, key: str) -> None:
        self.client.upload_file(str(path), self.bucket, key)

    def objects(self) -> int:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket)
        return sum(page.get("KeyCount", 0) for page in pages)


class AzureStore:
    scheme = "az"

    def __init__(self, workdir: Path) -> None:
        import pyarrow.fs as pafs

        self.proc, url = start_azurite(workdir)
        self.env = {
            "AZURE_STORAGE_ACCOUNT_NAME": "devstoreaccount1",
            "AZURE_STORAGE_ACCOUNT_KEY": AZURITE_KEY,
            "AZURE_STORAGE_USE_EMULATOR": "true",
            "AZURITE_BLOB_STORAGE_URL": url,
        }
        host = url.split("://", 1)[1]
        self.fs = pafs.AzureFileSystem(
            account_name="devstoreaccount1", account_key=AZURITE_KEY, blob_storage_authority=host,
            blob_storage_scheme="http", dfs_storage_authority=host, dfs_storage_scheme="http",
        )  # fmt: skip
        self.bucket = f"bench-{secrets.token_hex(3)}"
        self.fs.create_dir(self.bucket)

    def upload(self, path: Path, key: str) -> None:
        with self.fs.open_output_stream(f"{self.bucket}/{key}") as out:
            out.write(path.read_bytes())

    def objects(self) -> int:
        import pyarrow.fs as pafs

        infos = self.fs.get_file_info(pafs.FileSelector(self.bucket, recursive=True))
        return sum(i.type == pafs.FileType.File for i in infos)


CONFIG: list[str] = []  # --config FILE for every command, when given


def timed(args: list[str], env: dict[str, str]) -> tuple[float, dict]:
    args = [*args, *CONFIG]
    started = time.perf_counter()
    out = subprocess.run([EMBEDPIPE, *args], env=env, capture_output=True, text=True, check=False)
    took = time.perf_counter() - started
    if out.returncode not in (0, 3):
        raise SystemExit(f"embedpipe {' '.join(args)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return took, {"stdout": out.stdout}


def rows(db) -> dict[str, tuple[str, np.ndarray]]:
    from pipelines import store

    found: dict[str, tuple[str, np.ndarray]] = {}
    for table in store.open_shards(db).values():
        data = table.to_arrow().select(["chunk_id", "content_hash", "vector"])
        vectors = np.asarray(data["vector"].to_pylist(), dtype=np.float32)
        for i, (chunk_id, content_hash) in enumerate(
            zip(data["chunk_id"].to_pylist(), data["content_hash"].to_pylist(), strict=True)
        ):
            if chunk_id in found:
                raise SystemExit(f"{chunk_id} stored twice")
            found[chunk_id] = (content_hash, vectors[i])
    return found


def last_report(db) -> dict:
    from pipelines import store

    loc = store.location(db)
    reports = [
        json.loads(loc.read_bytes(o["path"])) for o in loc.list("_runs/") if o["path"].endswith(".json")
    ]
    return max(reports, key=lambda r: r["started_at"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("beir", type=Path, help="a BEIR folder: corpus.jsonl, queries.jsonl, qrels/")
    parser.add_argument("--store", choices=["s3", "azure"], default="s3", help="moto's S3 or Azurite")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench-s3"))
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument(
        "--config", type=Path, help="an embedpipe config for every run (e.g. embedding.dtype: fp32)"
    )
    args = parser.parse_args()

    from pipelines.embedding.autotune import cpu_signature

    if args.config:
        CONFIG.extend(["--config", str(args.config.resolve())])
    shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True)
    bucket_store = (AzureStore if args.store == "azure" else S3Store)(args.workdir)
    try:
        os.environ.update(bucket_store.env)  # this process reads both dbs too
        env = dict(os.environ)
        bucket, scheme = bucket_store.bucket, bucket_store.scheme
        corpus = args.beir / "corpus.jsonl"
        bucket_store.upload(corpus, "corpus.jsonl")
        warm = args.workdir / "warm.jsonl"
        with corpus.open() as src:
            warm.write_text("".join(line for _, line in zip(range(300), src, strict=False)))
        timed(["ingest", str(warm), "--db", str(args.workdir / "warm-db")], env)

        local_db, remote_db = str(args.workdir / "local-db"), f"{scheme}://{bucket}/db"
        local_s, _ = timed(["ingest", str(corpus), "--db", local_db], env)
        # A second local run: how far two runs' vectors differ on disk alone (batches form as rows
        # arrive, and int8 activations see each batch's padding), to read the S3 figure against.
        timed(["ingest", str(corpus), "--db", str(args.workdir / "local-db-2")], env)
        remote_s, _ = timed(["ingest", f"{scheme}://{bucket}/corpus.jsonl", "--db", remote_db], env)
        again_s, _ = timed(["ingest", f"{scheme}://{bucket}/corpus.jsonl", "--db", remote_db], env)
        again = last_report(remote_db)

        mine, theirs, again_local = rows(local_db), rows(remote_db), rows(str(args.workdir / "local-db-2"))
        same_keys = mine.keys() == theirs.keys()
        same_hashes = same_keys and all(mine[c][0] == theirs[c][0] for c in mine)
        a = np.stack([mine[c][1] for c in sorted(mine)]) if same_keys else None
        b = np.stack([theirs[c][1] for c in sorted(mine)]) if same_keys else None
        scores = {}
        for name, db in (("local", local_db), (args.store, remote_db)):
            out = subprocess.run(
                [EMBEDPIPE, "eval", str(args.beir), "--db", db, "--json", *CONFIG],
                env=env, capture_output=True, text=True, check=True,
            )  # fmt: skip
            scores[name] = json.loads(out.stdout.strip().splitlines()[-1])["ndcg@10"]
        result = {
            "cpu": cpu_signature(),
            "config": str(args.config) if args.config else None,
            "dtype": last_report(local_db)["backend"]["dtype"],
            "docs": last_report(local_db)["docs"]["ingested"],
            "chunks": len(mine),
            "ingest_local_s": round(local_s, 1),
            "store": args.store,
            "ingest_bucket_s": round(remote_s, 1),
            "ratio_bucket_vs_local": round(remote_s / local_s, 3),
            "reingest_bucket_unchanged_s": round(again_s, 1),
            "reingest_speedup": round(remote_s / again_s, 1),
            "reingest_embeddings": again["embeddings"]["computed"],
            "reingest_unchanged": again["docs"]["unchanged"],
            "same_chunk_ids": same_keys,
            "same_content_hashes": same_hashes,
            "vectors_max_abs_diff": float(np.abs(a - b).max()) if same_keys else None,
            "vectors_min_cosine": float((a * b).sum(1).min()) if same_keys else None,
            "local_vs_local_max_abs_diff": float(
                max(np.abs(mine[c][1] - again_local[c][1]).max() for c in mine)
            )
            if again_local.keys() == mine.keys()
            else None,
            "ndcg@10": scores,
            "bucket_objects": bucket_store.objects(),
        }
    finally:
        bucket_store.proc.terminate()
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
