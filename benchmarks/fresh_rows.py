"""New documents in an indexed db while it is served: how soon ``/search`` finds them, and what the
incremental index update costs against a full build.

python benchmarks/fresh_rows.py ../shared/datasets/scifact --db /tmp/db-1m [--docs 5000] [--prefix new-]
    [--rebuild-too]

Starts ``embedpipe serve --db DB``, ingests ``--docs`` documents of the BEIR corpus under new ids (``new-``
prefix, or ``--prefix``: a db that had them once needs another; their chunks are new rows), then asks
``/search`` for each of 20 of their titles until the new document is in its top 10 (a scale db holds
~100 perturbed copies of each text, which can outrank it): ``found_s`` is the time from the ingest's
end to the last of them found (the rows are not in the indexes yet: a shard holds them beside its codes). Then
``embedpipe index`` folds them into the indexes (``index_s``; each shard says ``updated``), the 20 are
searched again, and with ``--rebuild-too`` ``embedpipe index --rebuild`` gives the full build's time on
the same db.
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

sys.path.insert(0, str(Path(__file__).parent))
from serve_scale import _wait_ready  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("beir_dir", type=Path)
    parser.add_argument("--db", required=True)
    parser.add_argument("--docs", type=int, default=5000)
    parser.add_argument("--port", type=int, default=8150)
    parser.add_argument("--prefix", default="new-", help="the new documents' id prefix")
    parser.add_argument("--rebuild-too", action="store_true", help="also time `embedpipe index --rebuild`")
    args = parser.parse_args()

    embedpipe = str(Path(sys.executable).parent / "embedpipe")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("EMBEDPIPE_API_KEY", None)
    env.pop("EMBEDPIPE_API_KEY_FILE", None)
    docs = []
    with open(args.beir_dir / "corpus.jsonl") as f:
        for line in f:
            doc = json.loads(line)
            if doc.get("title") and len(docs) < args.docs:
                docs.append(
                    {**doc, "_id": f"{args.prefix}{doc['_id']}", "title": f"{doc['title']} (revised)"}
                )
    source = Path(tempfile.mkdtemp()) / "new.jsonl"
    source.write_text("".join(json.dumps(d) + "\n" for d in docs))
    probes = docs[:: max(1, len(docs) // 20)][:20]

    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        json.dump({"serve": {"port": args.port}}, f)
        config = f.name
    url = f"http://127.0.0.1:{args.port}"
    started = time.monotonic()
    server = subprocess.Popen(
        [embedpipe, "serve", "--db", args.db, "--config", config], env=env, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, start_new_session=True,
    )  # fmt: skip

    def top(doc: dict) -> str | None:
        # In the top 10: a scale db holds ~100 perturbed copies of every text, and earlier runs' copies
        # of these documents, which can outrank or tie with the new one.
        r = requests.post(f"{url}/search", json={"query": doc["title"], "k": 10}, timeout=30)
        hits = [h["doc_id"] for h in (r.json()["results"] if r.ok else [])]
        return doc["_id"] if doc["_id"] in hits else hits[0] if hits else None

    try:
        _wait_ready(url, server, started)
        before = sum(top(d) == d["_id"] for d in probes)
        t0 = time.monotonic()
        ingest = subprocess.run([embedpipe, "ingest", str(source), "--db", args.db], env=env,
                                capture_output=True, text=True)  # fmt: skip
        ingest_s = time.monotonic() - t0
        if ingest.returncode:
            raise SystemExit(ingest.stderr[-3000:])
        ended, missing = time.monotonic(), list(probes)
        while missing and time.monotonic() - ended < 60:
            missing = [d for d in missing if top(d) != d["_id"]]
        found_s = time.monotonic() - ended
        t0 = time.monotonic()
        index = subprocess.run([embedpipe, "index", "--db", args.db, "--json"], env=env, capture_output=True,
                               text=True, check=True)  # fmt: skip
        index_s = time.monotonic() - t0
        summaries = json.loads(index.stdout)
        time.sleep(2)  # the service's refresh interval (1 s) passes
        after = sum(top(d) == d["_id"] for d in probes)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        server.wait(60)
        os.unlink(config)
    rebuild_s = None
    if args.rebuild_too:
        t0 = time.monotonic()
        subprocess.run([embedpipe, "index", "--db", args.db, "--rebuild", "--json"], env=env, check=True,
                       capture_output=True)  # fmt: skip
        rebuild_s = round(time.monotonic() - t0, 1)
    print(json.dumps({
        "new_docs": len(docs),
        "new_rows": sum(s.get("new_rows") or 0 for s in summaries),
        "probes_found_before_ingest": before,
        "ingest_s": round(ingest_s, 1),
        "found_s": round(found_s, 2),
        "probes_missing_after_60s": len(missing),
        "index_s": round(index_s, 1),
        "index_actions": [s["action"] for s in summaries],
        "codes": [s.get("codes") for s in summaries],
        "probes_found_after_index": after,
        "rebuild_s": rebuild_s,
    }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
