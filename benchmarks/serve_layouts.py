"""Serve layouts side by side on one db, with distinct queries: ``embedpipe serve`` started once per
(layout, ingress), loaded by ``benchmarks/load.py --distinct`` at each concurrency, then stopped.

python benchmarks/serve_layouts.py ../shared/datasets/scifact --db /tmp/sf-db --json /tmp/layouts.json

Layouts (``serve.shard_groups``): 0, the router holds every shard (no handle call per query); 1, one
shard-group deployment behind the router; N (the db's shard count), one deployment per shard as before
shard groups. ``--query-dtype fp32`` (serve.query_dtype) embeds queries in fp32 whatever the documents
were. Needs wrk;
``--ingress haproxy`` needs haproxy. Figures depend on the CPU: the JSON records it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests
import yaml

HERE = Path(__file__).parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("beir_dir", type=Path, help="a BEIR collection (queries and corpus titles)")
    parser.add_argument("--db", required=True)
    parser.add_argument("--groups", default="0,1,4", help="serve.shard_groups values to compare")
    parser.add_argument("--ingress", default="python", help="comma-separated: python, haproxy")
    parser.add_argument("--concurrency", default="1,32")
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--port", type=int, default=8123)
    parser.add_argument("--query-dtype", default="auto", help="serve's query precision (auto follows the db)")
    parser.add_argument("--json", type=Path, help="write every row here")
    args = parser.parse_args()

    rows = []
    runs = [(ingress, groups) for ingress in args.ingress.split(",") for groups in args.groups.split(",")]
    for n, (ingress, groups) in enumerate(runs):
        # Each run on a port of its own: nothing left of the last one can answer for it.
        settings = {"shard_groups": int(groups), "ingress": ingress, "port": args.port + n,
                    "query_dtype": args.query_dtype}  # fmt: skip
        for row in _measure(args, settings):
            row.update(shard_groups=int(groups), ingress=ingress, query_dtype=args.query_dtype)
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        from pipelines.embedding.autotune import cpu_signature

        args.json.write_text(json.dumps({"cpu": cpu_signature(), "rows": rows}, indent=2))


def _measure(args: argparse.Namespace, settings: dict) -> list[dict]:
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump({"serve": settings}, f)
        config = f.name
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("EMBEDPIPE_API_KEY", None)
    env.pop("EMBEDPIPE_API_KEY_FILE", None)
    command = [sys.executable, "-m", "pipelines.cli", "serve", "--db", args.db, "--config", config]
    server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              start_new_session=True)  # fmt: skip
    url = f"http://127.0.0.1:{settings['port']}"
    try:
        _wait_ready(url, server)
        load = subprocess.run(
            [sys.executable, str(HERE / "load.py"), str(args.beir_dir), "--url", url, "--distinct",
             "--concurrency", args.concurrency, "--seconds", str(args.seconds), "--warmup", str(args.warmup)],
            check=True, capture_output=True, text=True, env=env,
        )  # fmt: skip
        return [json.loads(line) for line in load.stdout.splitlines() if line.startswith("{")]
    finally:
        _signal(server, signal.SIGTERM)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            _signal(server, signal.SIGKILL)
        os.unlink(config)


def _signal(server: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.pid, sig)


def _wait_ready(url: str, server: subprocess.Popen, timeout_s: float = 240) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"embedpipe serve exited: {server.stderr.read().decode()[-2000:]}")
        try:
            if requests.post(f"{url}/search", json={"query": "warm", "k": 1}, timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(1)
    raise SystemExit("embedpipe serve did not answer within 240 s")


if __name__ == "__main__":
    main()
