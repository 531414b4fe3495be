"""Load-test a running ``embedpipe serve`` with wrk: p50/p95/p99, QPS and errors per concurrency, and
the cache hit rate from the service's own /metrics.

python benchmarks/load.py ../shared/datasets/scifact --url http://127.0.0.1:8000 --seconds 30

Needs ``wrk`` (Debian: apt-get install wrk). Requests cycle through the collection's queries; set
EMBEDPIPE_API_KEY_FILE or EMBEDPIPE_API_KEY if the service wants one.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import requests

LUA = Path(__file__).with_name("search.lua")


def _cache_counts(url: str, headers: dict[str, str]) -> dict[str, float]:
    counts = {"hit": 0.0, "shared": 0.0, "miss": 0.0}
    for line in requests.get(f"{url}/metrics", headers=headers, timeout=30).text.splitlines():
        if line.startswith("embedpipe_cache_lookups_total{"):
            outcome = line.split('outcome="')[1].split('"')[0]
            counts[outcome] = float(line.rsplit(" ", 1)[1])
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("beir_dir", type=Path, help="a BEIR collection whose queries are sent")
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--seconds", type=int, default=30)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--mode", default=None, help="vector or hybrid (default: the service's)")
    parser.add_argument("--warmup", type=int, default=5, help="seconds of load before measuring")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed (Debian: apt-get install wrk)")

    from pipelines.config import api_key_from_env
    from pipelines.evaluate import load_beir

    key = api_key_from_env()
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    queries, _ = load_beir(args.beir_dir)
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as f:
        for qid in sorted(queries):
            body = {"query": queries[qid], "k": args.k}
            if args.mode:
                body["mode"] = args.mode
            f.write(json.dumps(body) + "\n")
        bodies = f.name
    results = []
    for concurrency in [int(c) for c in args.concurrency.split(",")]:
        threads = str(min(concurrency, 2))
        wrk = ["wrk", "-t", threads, "-c", str(concurrency), "-s", str(LUA), "--timeout", "10s"]
        if args.warmup:
            subprocess.run([*wrk, "-d", f"{args.warmup}s", args.url, "--", bodies, key], check=True,
                           capture_output=True)  # fmt: skip
        before = _cache_counts(args.url, headers)
        run = subprocess.run(
            [*wrk, "-d", f"{args.seconds}s", args.url, "--", bodies, key], check=True, capture_output=True,
            text=True,
        )  # fmt: skip
        after = _cache_counts(args.url, headers)
        row = json.loads(run.stdout.strip().splitlines()[-1])
        lookups = {k: after[k] - before[k] for k in after}
        total = sum(lookups.values()) or 1
        row.update(
            concurrency=concurrency, cache_hit_rate=round((lookups["hit"] + lookups["shared"]) / total, 3)
        )
        results.append(row)
        print(json.dumps(row), flush=True)
    os.unlink(bodies)


if __name__ == "__main__":
    main()
