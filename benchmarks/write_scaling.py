"""Many write tasks staging small batches at once: committed appends (the code before) vs fragments.

N Ray tasks start together and each stages ``--batches`` small batches of chunk rows (384-d vectors,
spread over the db's shards) into one run's staging tables, as ingest's write tasks do:

- ``append``: each batch is a LanceDB ``table.add`` per shard, a commit each, all tasks at once: the
  write path before fragments (``Staging.append`` at 08fe9f5). Lance retries a commit that lost a race,
  and many small concurrent commits exhaust the retries (lancedb#725).
- ``fragments``: each batch is written as uncommitted Lance fragments (``Staging.append`` now); the
  driver then adds every task's fragments with one commit per shard (``Staging.add``).

For each, in one run: failed batches (and the first error), rows staged against rows sent, commits per
shard, and the time per commit (an ``add`` call's time for ``append``; the driver's commit for
``fragments``). ``--store s3`` stages in a local S3 server (moto), where a commit is a conditional put.

    python benchmarks/write_scaling.py --tasks 16,64 --store local
    python benchmarks/write_scaling.py --tasks 16,64 --store s3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipelines import store  # noqa: E402

DIM = 384


def rows_for(task: int, batch: int, n: int, shards: int) -> pa.Table:
    doc_ids = [f"t{task}-b{batch}-d{i}" for i in range(n)]
    rng = np.random.default_rng(task * 100_003 + batch)
    schema = store.table_schema(DIM)
    data = {
        "chunk_id": [f"{d}#0" for d in doc_ids],
        "doc_id": doc_ids,
        "chunk_index": [0] * n,
        "title": ["title"] * n,
        "text": ["some chunk text " * 20] * n,
        "vector": list(rng.standard_normal((n, DIM), dtype=np.float32)),
        "n_tokens": [100] * n,
        "char_start": [0] * n,
        "char_end": [320] * n,
        "source": ["bench"] * n,
        "content_hash": ["h"] * n,
        "metadata": ["{}"] * n,
        "model": ["m"] * n,
        "run_id": ["bench"] * n,
    }
    table = pa.table({k: pa.array(v, schema.field(k).type) for k, v in data.items()}, schema=schema)
    shard = pa.array([store.shard_of(d, shards) for d in doc_ids], pa.int32())
    return table.append_column("shard", shard).append_column("attempt", pa.array([f"t{task}"] * n))


@ray.remote(num_cpus=0.01, max_retries=0)
def write_task(staging: store.Staging, task: int, batches: int, rows: int, mode: str, start: float) -> dict:
    while time.time() < start:  # every task begins its writes at the same moment
        time.sleep(0.005)
    failed, first_error, add_s = 0, None, []
    fragments: dict[str, list[str]] = {}
    conn = staging.path.connect() if mode == "append" else None
    schema = store._staging_schema(DIM)
    for b in range(batches):
        part_rows = rows_for(task, b, rows, staging.manifest.shards)
        try:
            if mode == "append":  # Staging.append before fragments: one commit per shard per batch
                shards = part_rows.column("shard")
                for shard in sorted(set(shards.to_pylist())):
                    part = part_rows.filter(pa.compute.equal(shards, shard)).select(schema.names)
                    began = time.perf_counter()
                    conn.open_table(store.shard_name(shard)).add(part.cast(schema))
                    add_s.append(time.perf_counter() - began)
            else:
                _, made = staging.append(part_rows)
                for name, frags in made.items():
                    fragments.setdefault(name, []).extend(frags)
        except Exception as exc:  # noqa: BLE001  (counted: the figure this benchmark reports)
            failed += 1
            first_error = first_error or f"{type(exc).__name__}: {str(exc)[:300]}"
    return {"failed": failed, "first_error": first_error, "add_s": add_s, "fragments": fragments}


def run(db: store.Location, tasks: int, batches: int, rows: int, shards: int, mode: str) -> dict:
    manifest = store.Manifest(shards=shards, model="m", dim=DIM)
    staging = store.Staging(db, f"{mode}-{tasks}", manifest)
    staging.create()
    start = time.time() + 3 + tasks * 0.05
    results = ray.get([write_task.remote(staging, t, batches, rows, mode, start) for t in range(tasks)])
    commit_s: list[float] = []
    if mode == "fragments":
        merged: dict[str, list[str]] = {}
        for result in results:
            for name, frags in result["fragments"].items():
                merged.setdefault(name, []).extend(frags)
        for shard in range(shards):
            t = time.perf_counter()
            staging.add(shard, merged.get(store.shard_name(shard), []))
            commit_s.append(time.perf_counter() - t)
    wall_s = time.time() - start  # from the moment every task began writing to the last commit
    conn = staging.path.connect()
    staged = sum(conn.open_table(store.shard_name(s)).count_rows() for s in range(shards))
    versions = [conn.open_table(store.shard_name(s)).version for s in range(shards)]
    timings = commit_s if mode == "fragments" else [s for r in results for s in r["add_s"]]
    out = {
        "mode": mode,
        "tasks": tasks,
        "batches_sent": tasks * batches,
        "failed_batches": sum(r["failed"] for r in results),
        "first_error": next((r["first_error"] for r in results if r["first_error"]), None),
        "rows_sent": tasks * batches * rows,
        "rows_staged": staged,
        "commits_per_shard": round(statistics.mean(v - 1 for v in versions), 1),  # version 1: create
        "commit_s_p50": round(statistics.median(timings), 4) if timings else None,
        "commit_s_max": round(max(timings), 4) if timings else None,
        "wall_s": round(wall_s, 1),
    }
    staging.discard()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default="16,64", help="concurrent write tasks, comma-separated")
    parser.add_argument("--batches", type=int, default=10, help="batches each task stages")
    parser.add_argument("--rows", type=int, default=20, help="rows per batch (small, as on many nodes)")
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--store", choices=["local", "s3"], default="local")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/write-scaling"))
    args = parser.parse_args()

    from pipelines.embedding.autotune import cpu_signature

    counts = [int(n) for n in args.tasks.split(",")]
    shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True)
    moto = None
    if args.store == "s3":
        import boto3

        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from object_store import start_moto

        moto, endpoint = start_moto()
        os.environ.update(
            AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_REGION="us-east-1",
            AWS_ENDPOINT_URL=endpoint, AWS_EC2_METADATA_DISABLED="true",
        )  # fmt: skip
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="bench")
        db = store.location("s3://bench/db")
    else:
        db = store.location(args.workdir / "db")
    # Enough logical CPUs that every task of the largest count runs at once (they mostly wait on I/O).
    ray.init(num_cpus=max(counts) + 2, include_dashboard=False, logging_level="WARNING")
    results = []
    try:
        for tasks in counts:
            for mode in ("append", "fragments"):
                results.append(run(db, tasks, args.batches, args.rows, args.shards, mode))
                print(json.dumps(results[-1]), flush=True)
    finally:
        ray.shutdown()
        if moto is not None:
            moto.terminate()
    print(json.dumps({"cpu": cpu_signature(), "store": args.store, "results": results}, indent=2))


if __name__ == "__main__":
    main()
