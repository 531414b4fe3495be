"""A BEIR corpus ingested into a local S3 server (moto) and into a local folder, as a user runs it.

Starts ``moto.server`` on 127.0.0.1, uploads the corpus, then runs the CLI side by side: ``embedpipe
ingest`` to disk and to the bucket (time ratio S3/local), the unchanged re-ingest on the bucket, the same
(chunk_id, content_hash) set and vectors on both, and ``embedpipe eval`` nDCG@10 of both dbs. A warm-up
ingest of a slice first fills this machine's model caches (int8 model, autotune), so neither timed run
pays for them; a second local ingest shows how far two runs' vectors differ without S3.

    python benchmarks/object_store.py ../shared/datasets/scifact --workdir /tmp/bench-s3
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
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench-s3"))
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument(
        "--config", type=Path, help="an embedpipe config for every run (e.g. embedding.dtype: fp32)"
    )
    args = parser.parse_args()

    import boto3

    from pipelines.embedding.autotune import cpu_signature

    if args.config:
        CONFIG.extend(["--config", str(args.config.resolve())])
    shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True)
    moto, endpoint = start_moto()
    try:
        fake = {
            "AWS_ACCESS_KEY_ID": "bench",
            "AWS_SECRET_ACCESS_KEY": "bench",
            "AWS_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_EC2_METADATA_DISABLED": "true",
        }
        os.environ.update(fake)  # this process reads both dbs too
        env = dict(os.environ)
        bucket = f"bench-{secrets.token_hex(3)}"
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        s3.create_bucket(Bucket=bucket)
        corpus = args.beir / "corpus.jsonl"
        s3.upload_file(str(corpus), bucket, "corpus.jsonl")
        warm = args.workdir / "warm.jsonl"
        with corpus.open() as src:
            warm.write_text("".join(line for _, line in zip(range(300), src, strict=False)))
        timed(["ingest", str(warm), "--db", str(args.workdir / "warm-db")], env)

        local_db, remote_db = str(args.workdir / "local-db"), f"s3://{bucket}/db"
        local_s, _ = timed(["ingest", str(corpus), "--db", local_db], env)
        # A second local run: how far two runs' vectors differ on disk alone (batches form as rows
        # arrive, and int8 activations see each batch's padding), to read the S3 figure against.
        timed(["ingest", str(corpus), "--db", str(args.workdir / "local-db-2")], env)
        remote_s, _ = timed(["ingest", f"s3://{bucket}/corpus.jsonl", "--db", remote_db], env)
        again_s, _ = timed(["ingest", f"s3://{bucket}/corpus.jsonl", "--db", remote_db], env)
        again = last_report(remote_db)

        mine, theirs, again_local = rows(local_db), rows(remote_db), rows(str(args.workdir / "local-db-2"))
        same_keys = mine.keys() == theirs.keys()
        same_hashes = same_keys and all(mine[c][0] == theirs[c][0] for c in mine)
        a = np.stack([mine[c][1] for c in sorted(mine)]) if same_keys else None
        b = np.stack([theirs[c][1] for c in sorted(mine)]) if same_keys else None
        scores = {}
        for name, db in (("local", local_db), ("s3", remote_db)):
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
            "ingest_s3_s": round(remote_s, 1),
            "ratio_s3_vs_local": round(remote_s / local_s, 3),
            "reingest_s3_unchanged_s": round(again_s, 1),
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
            "bucket_objects": sum(
                page.get("KeyCount", 0)
                for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
            ),
        }
    finally:
        moto.terminate()
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
