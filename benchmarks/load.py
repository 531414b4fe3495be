"""Load-test a running ``embedpipe serve`` with wrk: p50/p95/p99, QPS and errors per concurrency, and
the cache hit rate from the service's own /metrics.

python benchmarks/load.py ../shared/datasets/scifact --url http://127.0.0.1:8000 --seconds 30

Needs ``wrk`` (Debian: apt-get install wrk). Requests cycle through the collection's queries; set
EMBEDPIPE_API_KEY_FILE or EMBEDPIPE_API_KEY if the service wants one. Each row also counts the answers by
the db generation that gave them (``generations``: a promote during the run shows as two).

``--distinct``: no query is sent twice in the whole run (warm-ups included), as in a real query stream:
the collection's queries, its corpus titles and each document's first sentence, deduplicated and
shuffled, each concurrency level (and its warm-up) taking a slice of its own. A level stops early
when its slice runs out; the JSON says how many distinct strings there were and how many were sent.
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
    parser.add_argument("--mode", default=None, help="vector, text or hybrid (default: the service's)")
    parser.add_argument("--warmup", type=int, default=5, help="seconds of load before measuring")
    parser.add_argument("--distinct", action="store_true", help="never send a query twice (see above)")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed (Debian: apt-get install wrk)")

    from pipelines.config import api_key_from_env
    from pipelines.evaluate import load_beir

    key = api_key_from_env() or ""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    queries, _ = load_beir(args.beir_dir)
    texts = [queries[qid] for qid in sorted(queries)]
    if args.distinct:
        texts = _distinct_texts(args.beir_dir, texts)
    levels = [int(c) for c in args.concurrency.split(",")]
    # With --distinct, each level's warm-up and run take their own part of the strings.
    parts = _split(texts, 2 * len(levels)) if args.distinct else [texts] * (2 * len(levels))
    results = []
    for n, concurrency in enumerate(levels):
        threads = min(concurrency, 2)
        wrk = ["wrk", "-t", str(threads), "-c", str(concurrency), "-s", str(LUA), "--timeout", "10s"]
        extra = ["once", str(threads)] if args.distinct else []
        warm, measured = _bodies(parts[2 * n], args), _bodies(parts[2 * n + 1], args)
        if args.warmup:
            subprocess.run([*wrk, "-d", f"{args.warmup}s", args.url, "--", warm, key, *extra], check=True,
                           capture_output=True)  # fmt: skip
        before = _cache_counts(args.url, headers)
        run = subprocess.run(
            [*wrk, "-d", f"{args.seconds}s", args.url, "--", measured, key, *extra], check=True,
            capture_output=True, text=True,
        )  # fmt: skip
        after = _cache_counts(args.url, headers)
        row = json.loads(run.stdout.strip().splitlines()[-1])
        lookups = {k: after[k] - before[k] for k in after}
        total = sum(lookups.values()) or 1
        row.update(
            concurrency=concurrency, cache_hit_rate=round((lookups["hit"] + lookups["shared"]) / total, 3)
        )
        if args.distinct:
            row.update(distinct_strings=len(texts), slice=len(parts[2 * n + 1]))
        results.append(row)
        print(json.dumps(row), flush=True)
        os.unlink(warm)
        os.unlink(measured)


def _distinct_texts(beir_dir: Path, queries: list[str]) -> list[str]:
    """Queries, titles and first sentences of the corpus, each string once, in a fixed shuffle."""
    import random

    seen: dict[str, None] = dict.fromkeys(q.strip() for q in queries)
    with open(beir_dir / "corpus.jsonl") as f:
        for line in f:
            doc = json.loads(line)
            seen.setdefault((doc.get("title") or "").strip())
            seen.setdefault((doc.get("text") or "").split(". ")[0].strip()[:300])
    texts = [t for t in seen if t]
    random.Random(0).shuffle(texts)
    return texts


def _split(texts: list[str], parts: int) -> list[list[str]]:
    # Warm-ups (even parts) get a fifth of a measured part's share.
    weights = [1 if i % 2 == 0 else 5 for i in range(parts)]
    bounds = [0]
    for w in weights:
        bounds.append(bounds[-1] + len(texts) * w // sum(weights))
    return [texts[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


def _bodies(texts: list[str], args: argparse.Namespace) -> str:
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as f:
        for text in texts:
            body = {"query": text, "k": args.k}
            if args.mode:
                body["mode"] = args.mode
            f.write(json.dumps(body) + "\n")
    return f.name


if __name__ == "__main__":
    main()
