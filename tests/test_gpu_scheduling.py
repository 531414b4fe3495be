"""Embedding actors and GPUs, on logical GPUs (no GPU here): one GPU per actor, each actor its own
CUDA_VISIBLE_DEVICES, a pool that waits for GPU nodes an autoscaling cluster has yet to start, and a
clear error where torch cannot see the GPU an actor holds.

The Ray runs are subprocesses: each needs a Ray of its own. EMBEDPIPE_LOGICAL_GPUS=1 lets an actor
that holds a logical GPU compute on the CPU (without it, such an actor fails, as the last test shows).
"""

import textwrap

import pytest

from tests.conftest import scifact_docs
from tests.helpers import run_ray_script

SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    os.environ["EMBEDPIPE_LOGICAL_GPUS"] = "1"
    import ray
    ray.init(address="local", num_cpus=4, num_gpus=2, logging_level="WARNING")
    from ray.util.state import list_actors
    from pipelines import ingest
    from pipelines.config import load_config

    cfg = load_config(None, shards=2, **{
        "ray.progress_bars": False, "embedding.batch_size": 8, "embedding.min_actors": 2,
        "embedding.cpu_threads": 1, "chunking.docs_per_batch": 8,
    })
    report = ingest.build(source=sys.argv[1], db=sys.argv[2], cfg=cfg)
    address = ray.get_runtime_context().gcs_address
    actors = [a for a in list_actors(address=address, detail=True, limit=1000)
              if "Embedder" in (a.class_name or "")]
    print("RESULT " + json.dumps({
        "pool": report["resources"]["embed_actors"],
        "backend": report["backend"],
        "actor_gpus": [a.required_resources.get("GPU", 0) for a in actors],
        "devices": report["embeddings"]["actor_devices"],
        "docs": report["docs"],
    }))
    """
)


def test_one_gpu_per_embedding_actor_each_with_its_own_device(tmp_path, scifact):
    """What this checks on a machine without GPUs: the placement (one logical GPU per actor, each
    its own CUDA_VISIBLE_DEVICES) and the plan (cuda, fp16). The compute is the CPU's, in fp32, and
    the run report says that a logical GPU stood in."""
    result = run_ray_script(SCRIPT, tmp_path, scifact_docs(40))
    assert result["pool"]["num_gpus"] == 1.0
    assert result["pool"]["max_size"] == 2  # one actor per GPU
    assert result["actor_gpus"] and all(g == 1.0 for g in result["actor_gpus"])
    planned = result["backend"]
    assert (planned["device"], planned["dtype"]) == ("cuda", "fp16")  # the plan, not what computed
    visible = [d["cuda_visible_devices"] for d in result["devices"].values()]
    assert len(visible) == 2 and sorted(visible) == ["0", "1"], result["devices"]
    ran = {(d["device"], d["dtype"], d["logical_gpu"]) for d in result["devices"].values()}
    assert ran == {("cpu", "fp32", True)}, result["devices"]  # the report says who stood in
    assert result["docs"]["ingested"] == 40 and result["docs"]["failed"] == 0


GROWING = textwrap.dedent(
    """
    import json, os, sys, threading, time
    os.environ["EMBEDPIPE_LOGICAL_GPUS"] = "1"
    import ray
    from ray.cluster_utils import Cluster

    # The autoscaler's node types: a CPU head and up to 3 one-GPU workers, none of them up yet.
    bootstrap = os.path.join(os.path.dirname(sys.argv[2]), "bootstrap.yaml")
    with open(bootstrap, "w") as f:
        f.write("head_node_type: head\\navailable_node_types:\\n"
                "  head: {resources: {CPU: 2}, max_workers: 0, node_config: {}}\\n"
                "  gpu: {resources: {CPU: 1, GPU: 1}, max_workers: 3, node_config: {}}\\n")
    os.environ["EMBEDPIPE_AUTOSCALER_CONFIG"] = bootstrap
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    ray.init(address=cluster.address, logging_level="WARNING")
    from pipelines import ingest
    from pipelines.config import load_config

    cfg = load_config(None, shards=2, **{
        "ray.progress_bars": False, "embedding.batch_size": 16, "embedding.cpu_threads": 1,
        "embedding.device": "cuda",
    })
    done = {}
    run = threading.Thread(
        target=lambda: done.update(report=ingest.build(source=sys.argv[1], db=sys.argv[2], cfg=cfg))
    )
    run.start()
    # The run waits for a GPU: its embedding actors are asked for and pending, the run not done.
    from ray.util.state import list_actors
    def embedders():
        return [(a.state, a.required_resources.get("GPU", 0))
                for a in list_actors(address=cluster.address, detail=True, limit=1000)
                if "Embedder" in (a.class_name or "")]
    deadline = time.monotonic() + 120
    while not embedders() and time.monotonic() < deadline:
        time.sleep(0.2)
    before = {"actors": embedders(), "done": "report" in done}
    cluster.add_node(num_cpus=1, num_gpus=1)  # as the autoscaler would (main thread: signal handlers)
    run.join(timeout=400)
    report = done["report"]
    print("RESULT " + json.dumps({
        "pool": report["resources"]["embed_actors"], "docs": report["docs"], "before_gpu": before,
    }))
    """
)


def test_a_gpu_run_asks_for_gpus_before_any_gpu_node_is_up(tmp_path, scifact):
    result = run_ray_script(GROWING, tmp_path, scifact_docs(20))
    assert result["pool"]["num_gpus"] == 1.0
    assert result["pool"]["max_size"] == 3  # sized by the node types, not by the GPUs up at the start
    assert result["docs"]["ingested"] == 20
    # Before the GPU node came, the run had asked for its actors, none was placed, and it had not ended.
    before = result["before_gpu"]
    assert before["actors"] and not before["done"], before
    assert all(state != "ALIVE" and gpus == 1 for state, gpus in before["actors"]), before


def test_pool_bounds_come_from_the_config_and_the_clusters_possible_size(tmp_path):
    from pipelines.embedding import actor_options, autoscaler_gpus

    config = tmp_path / "bootstrap.yaml"
    config.write_text(
        "head_node_type: head\navailable_node_types:\n"
        "  head: {resources: {CPU: 8}, max_workers: 0}\n"
        "  cpu_worker: {resources: {CPU: 16}, max_workers: 10}\n"
        "  gpu_worker: {resources: {CPU: 8, GPU: 1}, max_workers: 8}\n"
    )
    assert autoscaler_gpus(config) == 8
    assert autoscaler_gpus(tmp_path / "missing.yaml") == 0
    # cluster.yaml with configs/gpu.yaml, no GPU node up yet: 8 actors of 1 GPU (it was 1 before).
    pool = actor_options(cluster_gpus=0, possible_gpus=8, device="cuda", gpus_per_actor=1, min_actors=1,
                         max_actors=None)  # fmt: skip
    assert (pool["num_gpus"], pool["min_size"], pool["max_size"]) == (1, 1, 8)
    auto = actor_options(cluster_gpus=0, possible_gpus=8, device="auto", gpus_per_actor=None, min_actors=1,
                         max_actors=None)  # fmt: skip
    assert auto["num_gpus"] == 1 and auto["max_size"] == 8  # auto on a cluster that can have GPUs
    cuda = actor_options(cluster_gpus=0, device="cuda", gpus_per_actor=None, min_actors=1, max_actors=None)
    assert cuda["num_gpus"] == 1  # a GPU run asks for GPUs even when none is up or known
    assert actor_options(cluster_gpus=4, possible_gpus=8, device="cuda", gpus_per_actor=1, min_actors=1,
                         max_actors=2)["max_size"] == 2  # fmt: skip
    cpu = actor_options(cluster_gpus=4, device="cpu", gpus_per_actor=None, min_actors=1, max_actors=None)
    assert cpu["num_gpus"] == 0 and cpu["num_cpus"] == 1  # CPU actors never reserve (or touch) a GPU
    with pytest.raises(ValueError, match="takes no GPU"):
        actor_options(cluster_gpus=4, device="auto", dtype="int8", gpus_per_actor=1, min_actors=1,
                      max_actors=None)  # fmt: skip


def test_an_actor_given_a_gpu_torch_cannot_see_fails_naming_the_build(monkeypatch):
    from pipelines.embedding import Embedder

    monkeypatch.delenv("EMBEDPIPE_LOGICAL_GPUS", raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    with pytest.raises(RuntimeError, match=r"sees no CUDA device \(CUDA_VISIBLE_DEVICES=3\)") as error:
        Embedder(model="sentence-transformers/all-MiniLM-L6-v2", device="cuda", dtype="fp16")
    import torch

    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
    assert f"torch {torch.__version__} ({build})" in str(error.value)  # names the build torch is
