"""The full SciFact test split end to end, as the README runs it (slow: minutes on 2 cores)."""

import json

import pytest
from typer.testing import CliRunner

from pipelines import store
from pipelines.cli import app


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_scifact_eval_quality_and_report(ray_local, scifact, tmp_path, monkeypatch):
    # A model cache of its own, as on a fresh machine: the precision autotune picks here and the int8
    # model (calibrated on this corpus) do not depend on which tests ran before.
    monkeypatch.setenv("EMBEDPIPE_CACHE", str(tmp_path / "cache"))
    db = tmp_path / "sf-db"
    result = CliRunner().invoke(app, ["eval", str(scifact), "--db", str(db), "--json"])
    assert result.exit_code == 0, result.output
    scores = json.loads(result.output.strip().splitlines()[-1])
    assert scores["queries"] == 300
    assert scores["ndcg@10"] >= 0.640  # published for this model: 0.6451

    (report_path,) = (db / "_runs").glob("*.json")
    report = json.loads(report_path.read_text())
    docs = report["docs"]
    assert docs["seen"] == 5183 == docs["ingested"] + docs["unchanged"] + docs["failed"]
    assert docs["failed"] == 0
    assert len(report["shards"]) == 4
    assert sum(report["shards"].values()) == report["chunks"]["written"]
    assert report["shards"] == store.shard_rows(db)
    doc_shards, tokens = {}, 0
    for name, table in store.open_shards(db).items():
        rows = table.search().select(["doc_id", "n_tokens"]).limit(None).to_arrow()
        tokens += sum(rows["n_tokens"].to_pylist())
        for doc_id in set(rows["doc_id"].to_pylist()):
            doc_shards.setdefault(doc_id, []).append(name)
    assert tokens == report["tokens_embedded"]
    assert len(doc_shards) == 5183 and all(len(v) == 1 for v in doc_shards.values())
