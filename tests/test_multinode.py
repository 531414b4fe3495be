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

    index.build(db, settings=cfg.index)  # BM25, for hybrid queries
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
        "replicas": {a.class_name.split(":")[-1]: names.get(a.node_id) for a in replicas},
        "searches": found,
        "same_as_one_group": same,
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

    # Serve: two shard groups on two different nodes (serve.shard_resources), merged by the router,
    # answer exactly as one group holding every shard does.
    groups = {k: v for k, v in result["replicas"].items() if k.startswith("ShardGroup")}
    assert sorted(groups) == ["ShardGroup-0", "ShardGroup-1"] and len(set(groups.values())) == 2, groups
    for status, doc_id, hits in result["searches"]:
        assert status == 200 and hits[0] == doc_id
    assert len(result["same_as_one_group"]) == 16 and all(result["same_as_one_group"])


def _shard(doc_id: str) -> int:
    from pipelines.store import shard_of

    return shard_of(doc_id, 4)


def test_a_uri_mangled_by_a_path_is_refused_not_created_locally(tmp_path):
    from pipelines.store import LocationError, Manifest, init_db

    with pytest.raises(LocationError, match="mangled URI"):
        init_db(str(tmp_path / "s3:" / "bucket" / "db"), Manifest(shards=1, model="m", dim=4))
    assert list(tmp_path.iterdir()) == []
