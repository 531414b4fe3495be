"""Serve a large db as a new user would and measure it: ready time, the memory of the whole serving
process tree, what /healthz says is held per row, and distinct-query load at c=1 and c=32.

python benchmarks/serve_scale.py ../shared/datasets/scifact --db /tmp/db-1m [--seconds 10] [--json out.json]

``embedpipe serve --db DB`` starts in its own session; ready is the time from its start to the first
``/healthz`` that says ok and a search that answers. Memory is the summed RSS of every process of the tree
under the CLI (the CLI, Ray's GCS, raylet, dashboard agents, Serve's controller and proxy, the router
replica, HAProxy), read from /proc after the load, when the index caches are warm; PSS (which counts a
shared page once) is given beside it. The load is ``benchmarks/load.py --distinct`` (needs wrk).
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

import psutil
import requests
import yaml

HERE = Path(__file__).parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("beir_dir", type=Path, help="a BEIR collection (queries and corpus titles)")
    parser.add_argument("--db", required=True)
    parser.add_argument("--concurrency", default="1,32")
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--port", type=int, default=8140)
    parser.add_argument("--config", type=Path, default=None, help="a config whose serve: section to use")
    parser.add_argument("--json", type=Path, help="write the result here")
    args = parser.parse_args()

    settings = yaml.safe_load(args.config.read_text()) if args.config else {}
    settings.setdefault("serve", {})["port"] = args.port
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(settings, f)
        config = f.name
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("EMBEDPIPE_API_KEY", None)
    env.pop("EMBEDPIPE_API_KEY_FILE", None)
    url = f"http://127.0.0.1:{args.port}"
    started = time.monotonic()
    server = subprocess.Popen(
        [sys.executable, "-m", "pipelines.cli", "serve", "--db", args.db, "--config", config],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    try:
        ready_s = _wait_ready(url, server, started)
        health = requests.get(f"{url}/healthz", timeout=10).json()
        at_start = _tree_memory(server.pid)
        load = subprocess.run(
            [sys.executable, str(HERE / "load.py"), str(args.beir_dir), "--url", url, "--distinct",
             "--concurrency", args.concurrency, "--seconds", str(args.seconds), "--warmup", str(args.warmup)],
            check=True, capture_output=True, text=True, env=env,
        )  # fmt: skip
        levels = [json.loads(line) for line in load.stdout.splitlines() if line.startswith("{")]
        after = _tree_memory(server.pid)
        health = requests.get(f"{url}/healthz", timeout=10).json()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, signal.SIGKILL)
        os.unlink(config)
    from pipelines.embedding.autotune import cpu_signature

    result = {
        "cpu": cpu_signature(),
        "db": args.db,
        "ready_s": round(ready_s, 1),
        "rows": health.get("rows"),
        "held": health.get("memory"),
        "tree_at_start": at_start,
        "tree_after_load": after,
        "levels": levels,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


def _wait_ready(url: str, server: subprocess.Popen, started: float, timeout_s: float = 600) -> float:
    while time.monotonic() - started < timeout_s:
        if server.poll() is not None:
            raise SystemExit(f"embedpipe serve exited: {server.stderr.read().decode()[-2000:]}")
        try:
            ok = requests.get(f"{url}/healthz", timeout=5).json().get("status") == "ok"
            if ok and requests.post(f"{url}/search", json={"query": "ready", "k": 1}, timeout=5).ok:
                return time.monotonic() - started
        except (requests.RequestException, ValueError):
            pass
        time.sleep(0.25)
    raise SystemExit(f"embedpipe serve did not answer within {timeout_s} s")


def _tree_memory(pid: int) -> dict:
    """Summed RSS and PSS of a process and all its descendants, and the largest processes."""
    root = psutil.Process(pid)
    procs = [root, *root.children(recursive=True)]
    rows = []
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            full = proc.memory_full_info()
            rows.append((proc.name(), " ".join(proc.cmdline())[:60], full.rss, full.pss))
    rows.sort(key=lambda r: -r[2])
    return {
        "processes": len(rows),
        "rss_mb": round(sum(r[2] for r in rows) / 2**20),
        "pss_mb": round(sum(r[3] for r in rows) / 2**20),
        "largest": [{"name": n, "cmd": c, "rss_mb": round(r / 2**20)} for n, c, r, _ in rows[:8]],
    }


if __name__ == "__main__":
    main()
