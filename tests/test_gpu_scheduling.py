"""Embedding actors ask Ray for one GPU each when the cluster has GPUs (logical GPUs here).

Runs in a subprocess because it needs its own Ray with GPUs; the model falls back to the CPU since
torch sees no CUDA device, so the run must still finish with every document embedded.
"""

import textwrap

from tests.conftest import scifact_docs
from tests.helpers import run_ray_script

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import ray
    ray.init(address="local", num_cpus=4, num_gpus=2, logging_level="WARNING")
    from ray.util.state import list_actors
    from pipelines import ingest
    from pipelines.config import load_config

    cfg = load_config(None, shards=2, **{"ray.progress_bars": False, "embedding.batch_size": 16})
    report = ingest.build(source=sys.argv[1], db=sys.argv[2], cfg=cfg)
    address = ray.get_runtime_context().gcs_address
    actors = [a for a in list_actors(address=address, detail=True, limit=1000)
              if "Embedder" in (a.class_name or "")]
    print("RESULT " + json.dumps({
        "pool": report["resources"]["embed_actors"],
        "actor_gpus": [a.required_resources.get("GPU", 0) for a in actors],
        "docs": report["docs"],
    }))
    """
)


def test_one_gpu_per_embedding_actor(tmp_path, scifact):
    result = run_ray_script(SCRIPT, tmp_path, scifact_docs(40))
    assert result["pool"]["num_gpus"] == 1.0
    assert result["pool"]["max_size"] == 2  # one actor per GPU
    assert result["actor_gpus"] and all(g == 1.0 for g in result["actor_gpus"])
    assert result["docs"]["ingested"] == 40 and result["docs"]["failed"] == 0
