"""cluster.yaml is a valid Ray cluster launcher config, checked with Ray's own schema and validator."""

import json
from pathlib import Path

import jsonschema
import pytest
import yaml

CLUSTER_YAML = Path(__file__).resolve().parents[1] / "cluster.yaml"


@pytest.fixture(scope="module")
def config() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def _schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def test_valid_for_ray_up(config):
    from ray.autoscaler._private.util import prepare_config, validate_config

    jsonschema.validate(config, _schema())
    validate_config(prepare_config(config))  # what `ray up` does before it launches anything


def test_the_schema_check_bites(config):
    with pytest.raises(jsonschema.ValidationError, match="unexpected"):
        jsonschema.validate({**config, "head_node": {"typo": 1}, "max_worker": 3}, _schema())
    gpu = config["available_node_types"]["gpu_worker"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(
            {
                **config,
                "available_node_types": {**config["available_node_types"], "gpu_worker": {**gpu, "x": 1}},
            },
            _schema(),
        )


def test_head_cpu_and_gpu_groups_and_embedpipe_setup(config):
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    workers = {name: t for name, t in types.items() if name != config["head_node_type"]}
    gpu = [t for t in workers.values() if t["resources"].get("GPU", 0) >= 1]
    cpu = [t for t in workers.values() if not t["resources"].get("GPU")]
    assert gpu and cpu
    for group in workers.values():
        assert 0 <= group["min_workers"] <= group["max_workers"]
    assert sum(t["max_workers"] for t in workers.values()) <= config["max_workers"]
    setup = " ".join(config["setup_commands"])
    mount = next(remote for remote, local in config["file_mounts"].items() if local == ".")
    assert "pip install" in setup and mount in setup  # this checkout, installed on every node
    assert any("ray start --head" in c for c in config["head_start_ray_commands"])
    assert any("ray start --address" in c for c in config["worker_start_ray_commands"])


def test_token_auth_on_every_node_and_a_loopback_dashboard(config):
    """Whoever reaches the dashboard can submit jobs: it listens on loopback only (reached through
    `ray dashboard cluster.yaml`), and every node runs Ray with token authentication."""
    head = " ".join(config["head_start_ray_commands"])
    workers = " ".join(config["worker_start_ray_commands"])
    for commands in (head, workers):
        starts = [c for c in commands.split(";") if "ray start" in c]
        assert starts and "RAY_AUTH_MODE=token" in commands.split("ray start")[0]
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head
    token = [remote for remote in config["file_mounts"] if remote.endswith("/.ray/auth_token")]
    assert token and config["file_mounts"][token[0]] == "~/.ray/auth_token"  # one token, every node


def test_nodes_get_pinned_python_torch_and_ray(config):
    """Unpinned installs give nodes whatever is newest (and a Ray that may not match the client's);
    Ubuntu 22.04's python3 is 3.10, below the 3.11 embedpipe needs."""
    import re

    import ray
    import torch

    setup = " ".join(config["setup_commands"])
    assert "--python 3.11" in setup
    assert f'"torch=={torch.__version__.split("+")[0]}"' in setup
    assert re.search(rf'"ray\[[a-z,]+\]=={re.escape(ray.__version__)}"', setup)
    for commands in (config["head_start_ray_commands"], config["worker_start_ray_commands"]):
        assert all("embedpipe-venv/bin" in c for c in commands)  # the pinned Ray starts the node


def test_every_node_reaches_the_bucket_through_an_instance_profile_not_keys(config):
    for name, group in config["available_node_types"].items():
        assert "Arn" in group["node_config"].get("IamInstanceProfile", {}), name
    text = CLUSTER_YAML.read_text()
    assert "AWS_ACCESS_KEY_ID" not in text and "AWS_SECRET_ACCESS_KEY" not in text
    assert "~/.aws" not in str(config["file_mounts"])  # no credentials copied to the nodes
