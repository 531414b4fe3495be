"""The latency floor of the Serve layout itself: a FastAPI router fanning out to N shard deployments that
do no work, measured with wrk. What `embedpipe serve` costs beyond this is embedding and search.

python benchmarks/serve_floor.py --shards 4 --ingress haproxy

Prints one JSON line per concurrency. Needs wrk; ``--ingress haproxy`` needs haproxy.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import tempfile
from pathlib import Path

LUA = Path(__file__).with_name("search.lua")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=int, default=4, help="shard deployments (0: the router answers)")
    parser.add_argument("--ingress", choices=["python", "haproxy"], default="python")
    parser.add_argument("--concurrency", default="1,32")
    parser.add_argument("--seconds", type=int, default=8)
    args = parser.parse_args()
    os.environ.setdefault("RAY_SERVE_THROUGHPUT_OPTIMIZED", "1")  # as embedpipe serve
    if args.ingress == "haproxy":
        os.environ["RAY_SERVE_ENABLE_HA_PROXY"] = "1"

    import numpy as np
    import ray
    from fastapi import FastAPI
    from ray import serve

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR")
    app = FastAPI()

    @serve.deployment(ray_actor_options={"num_cpus": 0.25})
    class Shard:
        async def search_many(self, vectors, ks, wheres):
            return [b""] * len(ks), 1

    @serve.deployment(ray_actor_options={"num_cpus": 0.5})
    @serve.ingress(app)
    class Router:
        def __init__(self, shards):
            self.shards = shards

        @app.post("/search")
        async def search(self, body: dict) -> dict:
            vectors = np.zeros((1, 384), np.float32)
            await asyncio.gather(*(s.search_many.remote(vectors, [10], [None]) for s in self.shards))
            return {"results": [], "took_ms": 0.0}

    shards = [Shard.options(name=f"Shard{i}").bind() for i in range(args.shards)]
    serve.run(Router.bind(shards), route_prefix="/")
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as f:
        f.write(json.dumps({"query": "q", "k": 10}) + "\n")
    try:
        for concurrency in [int(c) for c in args.concurrency.split(",")]:
            wrk = ["wrk", "-t", str(min(concurrency, 2)), "-c", str(concurrency), "-s", str(LUA)]
            target = ["http://127.0.0.1:8000", "--", f.name]
            subprocess.run([*wrk, "-d", "3s", *target], check=True, capture_output=True)  # warm-up
            run = subprocess.run([*wrk, "-d", f"{args.seconds}s", *target], check=True, capture_output=True,
                                 text=True)  # fmt: skip
            row = json.loads(run.stdout.strip().splitlines()[-1])
            row.update(concurrency=concurrency, shards=args.shards, ingress=args.ingress)
            print(json.dumps(row), flush=True)
    finally:
        os.unlink(f.name)
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
