"""A real multi-node Ray cluster on this machine (ray.cluster_utils.Cluster): four nodes, two of them
marked with a custom ``embed_node`` resource standing in for GPU nodes.

Embedding actors must run on the marked nodes only, the shards written by tasks on several nodes must
hold every chunk once, and two shard-group deployments of the Serve app on two nodes must answer as one
group does. Where each actor, task and replica ran comes from Ray's state API. Runs in a subprocess
because the cluster needs its own Ray, not the session's.
"""

import textwrap

import pytest

from tests.conftest import scifact_docs
from tests.helpers import run_ray_script

SCRIPT = textwrap.dedent(
    """
    import json, socket, sys, time
    from collections import Counter

    import pyarrow as pa
    import ray
    import requests
    from ray.cluster_utils import Cluster

    corpus, db = sys.argv[1], sys.argv[2]
    # Every node takes one shard replica (search_slot), two of them the embedding actors (embed_node).
    slot = {"search_slot": 1}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "resources": slot})
    names = {cluster.head_node.node_id: "head"}
    for i in range(2):
        names[cluster.add_node(num_cpus=1, resources={"embed_node": 1, **slot}).node_id] = f"embed{i}"
    names[cluster.add_node(num_cpus=2, resources=slot).node_id] = "cpu0"
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="WARNING")
    from ray.util.state import list_actors, list_tasks

    from pipelines import chunking, index, ingest, sources, store
    from pipelines.config import ServeSettings, load_config

    cfg = load_config(None, shards=4, **{
        "ray.progress_bars": False, "read.docs_per_block": 5, "chunking.docs_per_batch": 5,
        "embedding.batch_size": 16, "embedding.min_actors": 2, "embedding.max_actors": 2,
        "embedding.cpu_threads": 1, "embedding.resources": {"embed_node": 1},
    })
    report = ingest.build(source=corpus, db=db, cfg=cfg)
    actors = [a for a in list_actors(detail=True, limit=1000) if "Embedder" in (a.class_name or "")]
    writes = [t for t in list_tasks(detail=True, limit=10000) if t.name == "MapBatches(write_chunks)"]

    # What an undisturbed single-process chunking of the same documents gives, to compare with.
    docs = pa.Table.from_pylist(
        [sources.record_to_doc(json.loads(line), source=corpus, where="") for line in open(corpus)],
        schema=sources.DOC_SCHEMA,
    )
    expected = chunking.chunk_docs(docs, model=cfg.embedding.model)["chunk_id"].to_pylist()
    rows = {name: t.to_arrow().select(["chunk_id", "doc_id"]).to_pylist()
            for name, t in store.open_shards(db).items()}

    # BM25, for hybrid queries: one Ray task per shard, spread over the nodes.
    indexed = index.build(db, settings=cfg.index)
    from ray import serve

    from serve.app import ServeConfig, build_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    # Two shard groups, one per node (each node has one search_slot), and for comparison one group
    # held by the router itself.
    settings = ServeSettings(shard_cpus=0, router_cpus=0, refresh_s=0, shard_resources=slot, shard_groups=2)
    serve.run(build_app(ServeConfig(db=db, settings=settings, device="cpu", dtype="fp32")),
              name="embedpipe", route_prefix="/")
    one = settings.model_copy(update={"shard_groups": 0})
    serve.run(build_app(ServeConfig(db=db, settings=one, device="cpu", dtype="fp32")),
              name="one", route_prefix="/one")
    found, same = [], []
    for doc in [json.loads(line) for line in open(corpus)][:8]:
        for mode in ("vector", "hybrid"):
            body = {"query": doc["title"], "k": 5, "mode": mode}
            r = requests.post(f"http://127.0.0.1:{port}/search", json=body, timeout=120)
            r1 = requests.post(f"http://127.0.0.1:{port}/one/search", json=body, timeout=120)
            if mode == "vector":
                found.append([r.status_code, doc["_id"], [h["doc_id"] for h in r.json()["results"]]])
            pairs = [(h["chunk_id"], round(h["score"], 5)) for h in r.json()["results"]]
            pairs1 = [(h["chunk_id"], round(h["score"], 5)) for h in r1.json()["results"]]
            same.append(pairs == pairs1)
    # A reshard to 3 shards, promoted while both layouts serve: each follows it (groups open the new
    # generation's shards, one group idle: 3 shards, 2 groups) and answers as before (same vectors).
    from pipelines import rebuild

    rebuild.reshard(db=db, shards=3, cfg=cfg)
    rebuild.promote(db=db, generation=2, cfg=cfg)
    def both(body):
        return [requests.post(f"http://127.0.0.1:{port}{p}/search", json=body, timeout=120).json()
                for p in ("", "/one")]

    deadline, generations = time.time() + 90, []
    while time.time() < deadline and generations != [2, 2]:
        generations = [a["generation"] for a in both({"query": "cancer", "k": 5})]
        time.sleep(0.3)
    after = []
    for doc in [json.loads(line) for line in open(corpus)][:4]:
        answers = both({"query": doc["title"], "k": 5, "mode": "vector"})
        hits = [[h["doc_id"] for h in a["results"]] for a in answers]
        after.append([[a["generation"] for a in answers], hits])
    replicas = [a for a in list_actors(detail=True, limit=1000)
                if (a.class_name or "").startswith("ServeReplica:embedpipe:")]
    print("RESULT " + json.dumps({
        "nodes": {name: ray.nodes()[[n["NodeID"] for n in ray.nodes()].index(nid)]["Resources"]
                  for nid, name in names.items()},
        "docs": report["docs"],
        "embed_actors": [[a.actor_id[:8], names.get(a.node_id), a.pid, a.state] for a in actors],
        "write_tasks": Counter(names.get(t.node_id) for t in writes),
        "rows": rows,
        "expected_chunks": expected,
        "index_nodes": Counter(names.get(s["node"], "?") for s in indexed),
        "replicas": {a.class_name.split(":")[-1]: names.get(a.node_id) for a in replicas},
        "searches": found,
        "same_as_one_group": same,
        "after_promote": after,
    }))
    serve.shutdown()
    ray.shutdown()
    cluster.shutdown()
    """
)


@pytest.mark.slow
def test_four_node_cluster(tmp_path, scifact):
    result = run_ray_script(SCRIPT, tmp_path, scifact_docs(40))
    wanted = ("CPU", "embed_node", "search_slot")
    print("\nnodes:", {n: {k: v for k, v in r.items() if k in wanted} for n, r in result["nodes"].items()})
    print("embedding actors [id, node, pid, state]:", result["embed_actors"])
    print("write tasks per node:", result["write_tasks"])
    print("shard deployment replicas:", result["replicas"])
    print("rows per shard:", {name: len(rows) for name, rows in result["rows"].items()})

    # Embedding actors only where the stand-in GPU resource is: one on each such node.
    assert result["docs"] == {"seen": 40, "ingested": 40, "unchanged": 0, "failed": 0}
    assert sorted(node for _, node, _, _ in result["embed_actors"]) == ["embed0", "embed1"]

    # Written from several nodes, the shards still hold every chunk exactly once, each doc in one shard.
    assert len(result["write_tasks"]) >= 2, result["write_tasks"]
    all_rows = [row for rows in result["rows"].values() for row in rows]
    assert sorted(r["chunk_id"] for r in all_rows) == sorted(result["expected_chunks"])
    for name, rows in result["rows"].items():
        assert all(name == f"shard_{_shard(r['doc_id']):03d}" for r in rows)
    # `embedpipe index` built the 4 shards as Ray tasks on more than one node.
    assert sum(result["index_nodes"].values()) == 4 and len(result["index_nodes"]) >= 2, result["index_nodes"]

    # Serve: two shard groups on two different nodes (serve.shard_resources), merged by the router,
    # answer exactly as one group holding every shard does.
    groups = {k: v for k, v in result["replicas"].items() if k.startswith("ShardGroup")}
    assert sorted(groups) == ["ShardGroup-0", "ShardGroup-1"] and len(set(groups.values())) == 2, groups
    for status, doc_id, hits in result["searches"]:
        assert status == 200 and hits[0] == doc_id
    assert len(result["same_as_one_group"]) == 16 and all(result["same_as_one_group"])

    # After a reshard to 3 shards is promoted, both layouts answer from generation 2, alike, and as before.
    assert len(result["after_promote"]) == 4
    for (generations, (grouped, one)), (_, _, hits) in zip(
        result["after_promote"], result["searches"], strict=False
    ):
        assert generations == [2, 2] and grouped == one == hits


def _shard(doc_id: str) -> int:
    from pipelines.store import shard_of

    return shard_of(doc_id, 4)


def test_a_uri_mangled_by_a_path_is_refused_not_created_locally(tmp_path):
    from pipelines.store import LocationError, Manifest, init_db

    with pytest.raises(LocationError, match="mangled URI"):
        init_db(str(tmp_path / "s3:" / "bucket" / "db"), Manifest(shards=1, model="m", dim=4))
    assert list(tmp_path.iterdir()) == []


SHARE_NOTHING = textwrap.dedent(
    """
    import json, os, secrets, signal, socket, subprocess, sys, time
    from pathlib import Path

    # Token authentication as cluster.yaml sets it up, with a token every process gets from the
    # environment: a node's own HOME holds no ~/.ray/auth_token. Set before Ray is imported, which
    # reads the mode then (run alone, no suite's Ray has left RAY_AUTH_MODE=token in the environment).
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))

    import ray
    import requests
    from ray.cluster_utils import Cluster

    endpoint, bucket, root = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    source, db_uri = f"s3://{bucket}/sources/corpus.jsonl", f"s3://{bucket}/db"

    def own_dirs(name):  # a node's HOME and temp dir, which no other node sees
        home = root / name
        (home / "tmp").mkdir(parents=True, exist_ok=True)
        return {"HOME": str(home), "TMPDIR": str(home / "tmp"), "XDG_CACHE_HOME": str(home / ".cache")}

    def started(make, tries=3):
        # On a loaded 2-core machine (the suite's own Ray beside this one) a node may miss Ray's
        # fixed 30 s to register with the GCS; that is the machine, not what this test checks.
        for attempt in range(tries):
            try:
                return make()
            except Exception as exc:
                if "timed out during startup" not in str(exc) or attempt == tries - 1:
                    raise
                print(f"a node did not start in time ({exc}); again", file=sys.stderr)
                time.sleep(10)

    slot = {"search_slot": 1}
    cluster = started(lambda: Cluster(
        initialize_head=True, head_node_args={"num_cpus": 1, "env_vars": own_dirs("head")}))
    names = {cluster.head_node.node_id: "head"}
    for i in range(2):
        node = started(lambda i=i: cluster.add_node(
            num_cpus=1, resources={"embed_node": 1, **slot}, env_vars=own_dirs(f"node{i}")))
        names[node.node_id] = f"node{i}"
    cluster.wait_for_nodes()

    # The config names the endpoint; the storage options in the tasks' arguments carry it to the nodes.
    config = root / "cluster.yaml"
    config.write_text(json.dumps({
        "shards": 4, "storage": {"endpoint": endpoint, "lock_lease_s": 10},
        "read": {"docs_per_block": 5}, "chunking": {"docs_per_batch": 5},
        "embedding": {"batch_size": 16, "min_actors": 2, "max_actors": 2, "cpu_threads": 1,
                      "resources": {"embed_node": 1}},
        "ray": {"progress_bars": False},
    }))
    driver_env = {**os.environ, **own_dirs("driver"), "RAY_ADDRESS": cluster.address, "HF_HUB_OFFLINE": "1"}
    command = [str(Path(sys.executable).parent / "embedpipe"), "ingest", source, "--db", db_uri,
               "--config", str(config)]
    os.chdir(root / "driver")

    # 1. A driver killed mid-run on the cluster, then the same command again.
    import boto3
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    def staged():
        listed = s3.list_objects_v2(Bucket=bucket, Prefix="db/_staging/")
        return [o["Key"] for o in listed.get("Contents", [])]
    killed = subprocess.Popen(command, env=driver_env, stdout=subprocess.DEVNULL,
                              stderr=open(root / "killed.err", "w"))
    deadline = time.time() + 400
    while killed.poll() is None and time.time() < deadline and not any("/data/" in k for k in staged()):
        time.sleep(0.2)
    was_running = killed.poll() is None
    killed.send_signal(signal.SIGKILL)
    killed.wait(30)
    rerun = subprocess.run(command, env=driver_env, capture_output=True, text=True, timeout=900)

    # The bucket db indexed from the driver: one Ray task per shard, on the nodes (which share nothing).
    indexed = subprocess.run([command[0], "index", "--db", db_uri, "--config", str(config), "--json"],
                             env=driver_env, capture_output=True, text=True, timeout=600)

    ray.init(address=cluster.address, logging_level="WARNING")
    from ray.util.state import list_tasks
    from pipelines import store
    from pipelines.config import ServeSettings, load_config
    from pipelines.search import Searcher

    cfg = load_config(config)
    db = store.location(db_uri, cfg.storage)
    rows = [r for t in store.open_shards(db).values() for r in t.to_arrow().select(["chunk_id"]).to_pylist()]
    writes = [t for t in list_tasks(detail=True, limit=10000) if t.name == "MapBatches(write_chunks)"]

    # 2. Serve from the bucket: one shard group per worker node; the same top-k as a local search.
    from ray import serve
    from serve.app import ServeConfig, build_app
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    settings = ServeSettings(shard_cpus=0, router_cpus=0, refresh_s=0, shard_resources=slot, shard_groups=2)
    serve.run(build_app(ServeConfig(db=db_uri, settings=settings, storage=cfg.storage, device="cpu",
                                    dtype="fp32")), name="embedpipe", route_prefix="/")
    searcher = Searcher(db, device="cpu", dtype="fp32")
    same = []
    for line in list(open(root / "corpus.jsonl"))[:8]:
        doc = json.loads(line)
        body = {"query": doc["title"], "k": 5}
        r = requests.post(f"http://127.0.0.1:{port}/search", json=body, timeout=120)
        same.append([h["chunk_id"] for h in r.json()["results"]]
                    == searcher.search(doc["title"], k=5)["chunk_id"].to_pylist())
    # Nothing of the db on any node's disk: no manifest, table, report or lock in a node's dirs.
    local = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.name == "embedpipe.json"
                   or p.suffix == ".lance" or p.parent.name in ("_runs", "_lock"))
    print("RESULT " + json.dumps({
        "was_running": was_running, "killed_err": (root / "killed.err").read_text()[-3000:],
        "rerun_code": rerun.returncode, "rerun_err": rerun.stderr[-3000:],
        "rows": len(rows), "distinct": len({r["chunk_id"] for r in rows}),
        "write_nodes": sorted({names.get(t.node_id, "?") for t in writes}),
        "staged_left": staged(), "same_as_local": same, "local_db_files": local,
        "index_code": indexed.returncode, "index_err": indexed.stderr[-3000:],
        "index_nodes": sorted({names.get(s["node"], "?") for s in json.loads(indexed.stdout or "[]")}),
    }))
    serve.shutdown()
    ray.shutdown()
    cluster.shutdown()
    """
)


@pytest.mark.slow
def test_nodes_that_share_nothing_ingest_and_serve_from_a_bucket(tmp_path, s3, scifact):
    import json
    import subprocess
    import sys

    docs = scifact_docs(40)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(d) + "\n" for d in docs))
    s3.put_file("sources/corpus.jsonl", corpus)
    out = subprocess.run(
        [sys.executable, "-c", SHARE_NOTHING, s3.endpoint, s3.bucket, str(tmp_path)],
        capture_output=True, text=True, timeout=1500, check=False,
    )  # fmt: skip
    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line, out.stdout[-3000:] + out.stderr[-5000:]
    result = json.loads(line.removeprefix("RESULT "))
    print("\nwrite tasks ran on:", result["write_nodes"], "| rows:", result["rows"])
    assert result["was_running"], "the first driver finished before it was killed: " + result["killed_err"]
    assert result["rerun_code"] == 0, result["rerun_err"]
    assert "removed the staging of run" in result["rerun_err"]
    assert result["rows"] == result["distinct"] > 40  # every chunk once
    assert len(result["write_nodes"]) >= 2, result["write_nodes"]
    assert result["staged_left"] == []
    assert len(result["same_as_local"]) == 8 and all(result["same_as_local"])
    assert result["local_db_files"] == []
    assert result["index_code"] == 0, result["index_err"]
    assert len(result["index_nodes"]) >= 2 and "?" not in result["index_nodes"], result["index_nodes"]
