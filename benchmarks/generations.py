"""Db generations end to end, from the command line as a user runs them: reshard, reembed (killed and
resumed), promote under load, and the bad requests.

python benchmarks/generations.py ../shared/datasets/scifact --workdir /tmp/gen-bench --json /tmp/gen.json

1. ingest the corpus in 4 shards, reshard to 8: the (chunk_id, content_hash, vector) sets, embeddings
   computed, the time against the first ingest, nDCG@10 of both generations (eval --generation);
2. reembed the 8-shard generation with a second model (the bundled model with max pooling and 128-token
   inputs, tests/helpers.py): once undisturbed in a copy of the db, once SIGKILLed mid-run and run again;
   the two generations compared; nDCG@10 of each model;
3. serve the db, then promote the re-embedded generation while benchmarks/load.py sends queries at c=8
   (wrk; it counts answers by the generation they name) and one more client checks that every answer is
   exactly the one its generation gives; the switch as /healthz shows it;
4. bad requests: promote of a missing and of an unfinished generation, drop of the live one, reshard to 0
   shards: the exit code, the error line, and whether the manifest changed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
EMBEDPIPE = str(Path(sys.executable).parent / "embedpipe")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def cli(*args: str, timeout: float = 3600) -> tuple[subprocess.CompletedProcess, float]:
    started = time.perf_counter()
    done = subprocess.run(
        [EMBEDPIPE, *args], env=ENV, capture_output=True, text=True, timeout=timeout, check=False
    )
    return done, round(time.perf_counter() - started, 2)


def ok(*args: str) -> tuple[str, float]:
    done, wall = cli(*args)
    if done.returncode != 0:
        raise SystemExit(f"embedpipe {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return done.stdout, wall


def rows(db: Path, generation: int) -> dict[str, dict]:
    from pipelines import store

    found = {}
    for name, table in store.open_shards(db, generation).items():
        for row in table.to_arrow().select(["chunk_id", "content_hash", "text", "vector"]).to_pylist():
            found[row["chunk_id"]] = {**row, "shard": name}
    return found


def ndcg(beir: Path, db: Path, generation: int) -> float:
    out, _ = ok("eval", str(beir), "--db", str(db), "--generation", str(generation), "--json")
    return json.loads(out.strip().splitlines()[-1])["ndcg@10"]


def compare(a: dict[str, dict], b: dict[str, dict], *, vectors_equal: bool) -> dict:
    same_keys = {(c, r["content_hash"]) for c, r in a.items()} == {
        (c, r["content_hash"]) for c, r in b.items()
    }
    common = [c for c in a if c in b]
    va = np.asarray([a[c]["vector"] for c in common], np.float32)
    vb = np.asarray([b[c]["vector"] for c in common], np.float32)
    result = {
        "chunks": [len(a), len(b)],
        "same_chunk_id_and_hash": same_keys,
        "same_text": all(a[c]["text"] == b[c]["text"] for c in common),
        "vectors_max_abs_diff": float(np.max(np.abs(va - vb))) if common else None,
        "vectors_min_cosine": float(np.min(np.sum(va * vb, axis=1))) if common else None,
    }
    if vectors_equal:
        result["vectors_identical"] = bool(np.array_equal(va, vb))
    return result


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("beir_dir", type=Path)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/gen-bench"))
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--load-seconds", type=int, default=40)
    args = parser.parse_args()
    from tests.helpers import variant_model

    shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True)
    corpus, db, twin = args.beir_dir / "corpus.jsonl", args.workdir / "db", args.workdir / "db-undisturbed"
    model = variant_model(args.workdir / "minilm-max-128")
    out: dict = {"cpu": _cpu()}

    # 1. reshard
    _, ingest_s = ok("ingest", str(corpus), "--db", str(db), "--shards", "4")
    report, reshard_s = ok("reshard", "--db", str(db), "--shards", "8", "--json")
    report = json.loads(report)
    before, after = rows(db, 1), rows(db, 2)
    out["reshard"] = {
        "ingest_s": ingest_s, "reshard_s": reshard_s, "ratio": round(reshard_s / ingest_s, 3),
        "embeddings_computed": report["embeddings"]["computed"], "check": report["check"],
        "compare": compare(before, after, vectors_equal=True),
        "moved_shard": sum(before[c]["shard"] != after[c]["shard"] for c in before),
        "ndcg@10": {"gen1_4_shards": ndcg(args.beir_dir, db, 1), "gen2_8_shards": ndcg(args.beir_dir, db, 2)},
    }  # fmt: skip
    print(json.dumps({"reshard": out["reshard"]}), flush=True)
    ok("promote", "--db", str(db), "2")

    # 2. reembed: undisturbed in a copy, killed and resumed here
    shutil.copytree(db, twin)
    undisturbed, undisturbed_s = ok("reembed", "--db", str(twin), "--model", model, "--json")
    undisturbed = json.loads(undisturbed)
    killed = _kill_reembed(db, model, generation=3, fraction=0.4, expected=undisturbed["check"]["chunks"])
    resumed, resumed_s = ok("reembed", "--db", str(db), "--model", model, "--json")
    resumed = json.loads(resumed)
    out["reembed"] = {
        "undisturbed_s": undisturbed_s, "undisturbed_check": undisturbed["check"],
        "undisturbed_embeddings": undisturbed["embeddings"].get("computed"),
        "backend": {k: undisturbed["backend"].get(k) for k in ("dtype", "engine")},
        "killed": killed, "resumed_s": resumed_s, "resumed": resumed["resumed"],
        "resumed_pass_docs": [p["docs"] for p in resumed["passes"]],
        "resumed_embeddings": resumed["embeddings"].get("computed"),
        "resumed_cache_hits": resumed["embeddings"].get("cache_hits"),
        "resumed_vs_undisturbed": compare(rows(db, 3), rows(twin, 3), vectors_equal=False),
        "ndcg@10": {"gen2_minilm": out["reshard"]["ndcg@10"]["gen2_8_shards"],
                    "gen3_variant": ndcg(args.beir_dir, db, 3),
                    "gen3_variant_undisturbed": ndcg(args.beir_dir, twin, 3)},
    }  # fmt: skip
    print(json.dumps({"reembed": out["reembed"]}), flush=True)

    # 3. promote under load
    out["promote_under_load"] = _promote_under_load(args, db, generation=3)
    print(json.dumps({"promote_under_load": out["promote_under_load"]}), flush=True)

    # 4. bad requests
    out["bad_requests"] = _bad_requests(db)
    print(json.dumps({"bad_requests": out["bad_requests"]}), flush=True)
    listed, _ = ok("generations", "--db", str(db))
    out["generations"] = listed.splitlines()
    print(listed)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


def _kill_reembed(db: Path, model: str, *, generation: int, fraction: float, expected: int) -> dict:
    """Start a reembed, SIGKILL its driver once ``fraction`` of the chunks are committed."""
    from pipelines import store

    command = [EMBEDPIPE, "reembed", "--db", str(db), "--model", model, "--commit-every-s", "5"]
    driver = subprocess.Popen(command, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    started, committed = time.time(), 0
    try:
        while driver.poll() is None and committed < fraction * expected:
            time.sleep(0.5)
            with contextlib.suppress(Exception):
                committed = sum(store.shard_rows(db, generation).values())
        if driver.poll() is not None:
            raise SystemExit(f"the reembed ended before the kill:\n{driver.stderr.read()[-3000:]}")
        driver.send_signal(signal.SIGKILL)
        driver.wait(30)
    finally:
        with contextlib.suppress(ProcessLookupError):
            driver.kill()
    committed = sum(store.shard_rows(db, generation).values())
    return {"after_s": round(time.time() - started, 1), "chunks_committed": committed,
            "state": store.read_manifest(db, generation).state}  # fmt: skip


def _promote_under_load(args: argparse.Namespace, db: Path, *, generation: int) -> dict:
    from pipelines.evaluate import load_beir

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([EMBEDPIPE, "serve", "--db", str(db), "--port", str(port)], env=ENV,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"{url}/healthz", timeout=2).json().get("status") == "ok":
                    break
            time.sleep(1)
        queries, _ = load_beir(args.beir_dir)
        sample = [queries[q] for q in sorted(queries)[:20]]

        def ask(query: str, gen: int | None = None) -> dict:
            body = {"query": query, "k": 10} | ({"generation": gen} if gen else {})
            response = requests.post(f"{url}/search", json=body, timeout=30)
            response.raise_for_status()
            return response.json()

        live = ask(sample[0])["generation"]
        expected = {
            g: {q: [h["chunk_id"] for h in ask(q, g)["results"]] for q in sample} for g in (live, generation)
        }
        checked = {"answers": 0, "mismatched": 0, "failed": 0, "by_generation": {}}
        stop = threading.Event()

        def verify() -> None:
            i = 0
            while not stop.is_set():
                query = sample[i % len(sample)]
                i += 1
                try:
                    body = ask(query)
                except requests.RequestException:
                    checked["failed"] += 1
                    continue
                gen = body["generation"]
                checked["answers"] += 1
                checked["by_generation"][gen] = checked["by_generation"].get(gen, 0) + 1
                if [h["chunk_id"] for h in body["results"]] != expected[gen][query]:
                    checked["mismatched"] += 1

        load = subprocess.Popen(
            [sys.executable, str(ROOT / "benchmarks" / "load.py"), str(args.beir_dir), "--url", url,
             "--concurrency", "8", "--seconds", str(args.load_seconds), "--warmup", "0"],
            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        checker = threading.Thread(target=verify)
        checker.start()
        time.sleep(args.load_seconds / 4)
        promoted_at = time.time()
        _, promote_s = ok("promote", "--db", str(db), str(generation))
        switched_s = None
        while time.time() - promoted_at < 120:
            if requests.get(f"{url}/healthz", timeout=5).json().get("generation") == generation:
                switched_s = round(time.time() - promoted_at, 2)
                break
            time.sleep(0.1)
        stdout, stderr = load.communicate(timeout=args.load_seconds + 120)
        stop.set()
        checker.join(60)
        if load.returncode != 0:
            raise SystemExit(f"load.py failed:\n{stderr[-3000:]}")
        wrk = json.loads(stdout.strip().splitlines()[-1])
        health = requests.get(f"{url}/healthz", timeout=5).json()
        return {
            "load_py_c8": wrk, "checker": checked, "promote_cli_s": promote_s,
            "healthz_generation_after_s": switched_s,
            "healthz_after": {k: health.get(k) for k in ("status", "model", "generation")},
        }  # fmt: skip
    finally:
        server.send_signal(signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.wait(60)
        server.kill()


def _bad_requests(db: Path) -> list[dict]:
    """Each bad request's exit code and error line, and whether the manifest or the tables changed."""
    from pipelines import store

    # An unfinished generation: a reshard killed as soon as it has registered its generation.
    driver = subprocess.Popen([EMBEDPIPE, "reshard", "--db", str(db), "--shards", "3"], env=ENV,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    while driver.poll() is None and max(store.read_catalog(db).generations) < 4:
        time.sleep(0.05)
    driver.send_signal(signal.SIGKILL)
    driver.wait(30)
    unfinished = max(store.read_catalog(db).generations)
    live = store.read_catalog(db).live
    cases = [
        ["promote", "--db", str(db), "99"],
        ["promote", "--db", str(db), str(unfinished)],
        ["drop", "--db", str(db), str(live)],
        ["reshard", "--db", str(db), "--shards", "0"],
    ]
    results = []
    for case in cases:
        manifest = (db / store.MANIFEST).read_bytes()
        tables = sorted(str(p.relative_to(db)) for p in db.rglob("*.lance"))
        done, _ = cli(*case)
        results.append({
            "command": "embedpipe " + " ".join(case).replace(str(db), "DB"),
            "exit": done.returncode,
            "stderr": " ".join(done.stderr.split()),
            "manifest_unchanged": (db / store.MANIFEST).read_bytes() == manifest,
            "tables_unchanged": sorted(str(p.relative_to(db)) for p in db.rglob("*.lance")) == tables,
        })  # fmt: skip
    dropped, _ = cli("drop", "--db", str(db), str(unfinished))  # the killed reshard's leftovers
    results.append({"command": f"embedpipe drop --db DB {unfinished}", "exit": dropped.returncode,
                    "stderr": " ".join(dropped.stderr.split())})  # fmt: skip
    return results


def _cpu() -> str:
    import platform

    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    name = next(
        (line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), ""
    )
    flags = next(
        (line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []
    )
    wanted = [
        f for f in flags if f in {"avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16"}
    ]
    return f"{name or platform.processor()}; {os.cpu_count()} cores; flags {' '.join(wanted)}"


if __name__ == "__main__":
    main()
