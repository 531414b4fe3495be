from pathlib import Path

import pytest

from pipelines.config import Config, ConfigError, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_defaults_are_valid():
    cfg = load_config(None)
    assert cfg.shards == 4
    assert cfg.embedding.model == "sentence-transformers/all-MiniLM-L6-v2"
    assert cfg.chunking.max_tokens is None


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    assert isinstance(load_config(path), Config)


def test_unknown_key_is_rejected_with_its_name(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("embedding:\n  modle: foo\n")
    with pytest.raises(ConfigError, match=r"embedding\.modle"):
        load_config(path)


def test_bad_value_names_field(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("shards: 0\n")
    with pytest.raises(ConfigError, match="shards"):
        load_config(path)


def test_overlap_must_be_below_max(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("chunking:\n  max_tokens: 64\n  overlap_tokens: 64\n")
    with pytest.raises(ConfigError, match="overlap_tokens"):
        load_config(path)


def test_flags_override_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("shards: 2\nray:\n  address: null\n")
    cfg = load_config(path, shards=7, **{"ray.address": "auto", "embedding.batch_size": None})
    assert (cfg.shards, cfg.ray.address, cfg.embedding.batch_size) == (7, "auto", 1024)


def test_not_yaml_mapping(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(path)
