"""Faults under load: kill a shard-group replica (or, on one node, the router that holds the shards), then
the router, and ingest changes, while queries run.

python benchmarks/faults.py ../shared/datasets/scifact --url http://127.0.0.1:8000 --db DB \
    [--concurrency 16] [--seconds 60]

Run it on the machine of a running ``embedpipe serve --db DB`` (it finds the replicas' processes with
psutil and SIGKILLs them; Serve starts new ones), best with the cache off (serve.cache_size: 0) so that
every answer is computed. Clients (threads) send the collection's queries and its documents' titles in
turn for --seconds. A shard replica is killed at 20% of the run and the router at 45%; at 70% an ingest
replaces --edit documents (a marker in their title, so every chunk of the new version carries it) and adds
as many new ones, into DB through the library.
Printed per phase (requests by the time their answer came): requests, errors (a non-200, or fewer
than k hits: an answer missing a shard), the slowest answer, and the time from each kill until
answers were whole again; for the ingest, whether any answer mixed the old and the new version of one
document.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import threading
import time
from pathlib import Path

import psutil
import requests

MARK = "zqxv-edited"


def _replica(name: str) -> psutil.Process | None:
    for proc in psutil.process_iter(["cmdline"]):
        if any(name in part for part in proc.info["cmdline"] or []):
            return proc
    return None


def _kill(name: str) -> float:
    proc = _replica(name)
    if proc is None:
        raise SystemExit(f"no process named {name!r}: is embedpipe serve running on this machine?")
    os.kill(proc.pid, signal.SIGKILL)
    print(f"killed {name} (pid {proc.pid})", flush=True)
    return time.monotonic()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("beir_dir", type=Path)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--db", type=Path, required=True)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--edit", type=int, default=50, help="documents replaced (and added) by the ingest")
    args = parser.parse_args()

    from pipelines import ingest
    from pipelines.config import api_key_from_env, load_config
    from pipelines.evaluate import load_beir

    key = api_key_from_env()
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    queries, _ = load_beir(args.beir_dir)
    texts = [queries[q] for q in sorted(queries)]
    with (args.beir_dir / "corpus.jsonl").open() as f:
        texts += [t for t in (json.loads(line).get("title") for line in f) if t]
    url = args.url.rstrip("/") + "/search"
    log: list[tuple[float, float, int, int, list[dict]]] = []  # (sent, done, status, hits, edited hits)
    lock, stop = threading.Lock(), threading.Event()
    edited: set[str] = set()

    def client(i: int) -> None:
        session = requests.Session()
        n = i
        while not stop.is_set():
            text = texts[n % len(texts)]
            n += args.concurrency
            sent = time.monotonic()
            try:
                r = session.post(url, json={"query": text, "k": args.k}, headers=headers, timeout=30)
                status = r.status_code
                hits = r.json()["results"] if status == 200 else []
            except (requests.RequestException, ValueError):
                status, hits = 0, []
            mine = [h for h in hits if h["doc_id"] in edited]
            with lock:
                log.append((sent, time.monotonic(), status, len(hits), mine))

    start = time.monotonic()
    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(args.concurrency)]
    for t in threads:
        t.start()

    def at(fraction: float) -> None:
        time.sleep(max(0.0, start + fraction * args.seconds - time.monotonic()))

    at(0.2)
    # A shard-group replica where the layout has them; on one node the router holds the shards, and
    # the first kill is of the router (the replica that searches them).
    group = "ServeReplica:embedpipe:ShardGroup-0"
    shard_kill = _kill(group if _replica(group) else "ServeReplica:embedpipe:Router")
    at(0.45)
    router_kill = _kill("ServeReplica:embedpipe:Router")
    at(0.7)
    # Edit documents of the corpus (new text) and add new ones, through the library, while queries run.
    docs = []
    with (args.beir_dir / "corpus.jsonl").open() as f:
        for _, line in zip(range(args.edit), f, strict=False):
            doc = json.loads(line)
            edited.add(doc["_id"])
            docs.append({**doc, "title": f"{MARK} {doc.get('title', '')}"})
            docs.append({"_id": f"new-{doc['_id']}", "title": doc.get("title", ""), "text": doc["text"]})
    corpus = args.db.parent / f"faults-edit-{int(time.time())}.jsonl"
    corpus.write_text("".join(json.dumps(d) + "\n" for d in docs))
    ingest_started = time.monotonic()
    result = ingest.build(source=corpus, db=args.db, cfg=load_config(None, **{"ray.progress_bars": False}))
    ingest_done = time.monotonic()
    print(f"ingest: {result['docs']} in {ingest_done - ingest_started:.1f} s", flush=True)
    at(1.0)
    stop.set()
    for t in threads:
        t.join()

    def phase(lo: float, hi: float) -> list[tuple[float, float, int, int, list[dict]]]:
        return [e for e in log if lo <= e[1] < hi]  # by the time its answer came (or failed)

    def bad(entry) -> bool:
        return entry[2] != 200 or entry[3] < args.k

    def summary(name: str, entries, since: float | None = None) -> None:
        errors = [e for e in entries if bad(e)]
        slowest = max((e[1] - e[0] for e in entries), default=0.0)
        line = f"{name}: {len(entries)} requests, {len(errors)} errors"
        if errors:
            short = sum(e[2] == 200 for e in errors)
            line += f" (statuses {sorted({e[2] for e in errors})}, {short} of them 200s with < k hits)"
        line += f", slowest answer {slowest:.2f} s"
        if since is not None:
            # Whole again: the first good answer to a request sent after the last bad one.
            last_bad = max((e[0] for e in errors), default=since)
            good = [e[1] for e in entries if e[0] >= last_bad and not bad(e)]
            if good:
                line += f", answers whole again {min(good) - since:.1f} s after the kill"
        print(line)

    phases = [start + f * args.seconds for f in (0, 0.2, 0.45, 0.7)]
    summary("before any fault", phase(phases[0], phases[1]))
    summary("shard replica killed", phase(phases[1], phases[2]), since=shard_kill)
    summary("router killed", phase(phases[2], phases[3]), since=router_kill)
    summary("during the ingest (and 2 s after)", phase(ingest_started, ingest_done + 2.0))
    mixed = 0
    for *_, mine in phase(ingest_started, float("inf")):
        by_doc: dict[str, set[bool]] = {}
        for hit in mine:
            by_doc.setdefault(hit["doc_id"], set()).add(hit["title"].startswith(MARK))
        mixed += any(len(v) > 1 for v in by_doc.values())
    print(f"answers mixing the old and the new version of one document: {mixed}")
    print(f"all: {len(log)} requests in {args.seconds:.0f} s at c={args.concurrency}")


if __name__ == "__main__":
    main()
