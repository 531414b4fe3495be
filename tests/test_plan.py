"""Capacity planning from a run report: pure functions over hand-written reports, no Ray."""

import json
import os

import pytest

from pipelines.plan import DEFAULT_QPS_PER_REPLICA, format_plan, latest_report, plan
from pipelines.reporting.report import build_report

EMBED_STAGE = "MapBatches(mark_unchanged)->MapBatches(chunk_docs)->MapBatches(Embedder)"


def _report(**extra) -> dict:
    """100 docs in a 60 s run whose embed stage took 50 s on one CPU actor: 2 docs/s per actor."""
    report = {
        "run_id": "20250101T120000Z-a1b2c3",
        "started_at": 1735732800.0,
        "model": "sentence-transformers/all-MiniLM-L6-v2",
        "wall_s": 60.0,
        "docs": {"seen": 105, "ingested": 100, "unchanged": 3, "failed": 2},
        "chunks": {"written": 200},
        "tokens_embedded": 40_000,
        "resources": {
            "peak_rss_mb": 2100.0, "cpu_count": 2,
            "embed_actors": {"num_gpus": 0.0, "num_cpus": 1, "min_size": 1, "max_size": 1},
        },
        "stages": {
            "ReadJsonl->SplitBlocks(4)": {"wall_s": 0.8},
            EMBED_STAGE: {"wall_s": 50.0},
            "MapBatches(write_chunks)": {"wall_s": 55.0},  # overlaps the embed stage; not the basis
        },
        "shards": {"shard_000": 150, "shard_001": 150},  # the db's rows after the run, more than written
        "cost": {"hourly_usd": 0.0},
    }  # fmt: skip
    report.update(extra)
    return report


def _gpu_report(num_gpus: float = 1.0, actors: int = 2) -> dict:
    pool = {"num_gpus": num_gpus, "min_size": actors, "max_size": actors}
    return _report(resources={"embed_actors": pool}, stages={"MapBatches(Embedder)": {"wall_s": 50.0}})


def test_estimates_scale_linearly_with_docs():
    small = plan(_report(), docs=1_000, nodes=1, db_bytes=600_000)
    large = plan(_report(), docs=3_000, nodes=1, db_bytes=600_000)
    assert small["estimate"]["chunks"] == 2_000 and large["estimate"]["chunks"] == 6_000
    assert small["estimate"]["tokens"] == 400_000 and large["estimate"]["tokens"] == 1_200_000
    assert small["estimate"]["hours"] == pytest.approx(1_000 / 2.0 / 3600)
    assert large["estimate"]["hours"] == pytest.approx(3 * small["estimate"]["hours"])
    assert large["estimate"]["storage_bytes"] == 3 * small["estimate"]["storage_bytes"]


def test_the_embed_stage_is_the_basis_and_wall_time_the_fallback():
    staged = plan(_report(), docs=1_000)
    assert staged["basis"]["basis"] == "embed stage" and staged["basis"]["basis_stage"] == EMBED_STAGE
    assert staged["basis"]["basis_s"] == 50.0
    assert staged["basis"]["docs_per_s_per_actor"] == pytest.approx(2.0)
    assert staged["basis"]["chunks_per_doc"] == 2.0 and staged["basis"]["tokens_per_doc"] == 400.0

    for stages in ({}, {"ReadJsonl": {"wall_s": 0.8}}, {"MapBatches(Embedder)": {"wall_s": 0.0}}):
        unstaged = plan(_report(stages=stages), docs=1_000)
        assert unstaged["basis"]["basis"] == "run wall time" and unstaged["basis"]["basis_s"] == 60.0
        assert unstaged["basis"]["docs_per_s_per_actor"] == pytest.approx(100 / 60)
        assert any("start-up" in note for note in unstaged["notes"])


def test_without_nodes_or_hours_the_run_s_actors_are_used_and_more_nodes_take_less_time():
    one = plan(_report(), docs=7_200)
    four = plan(_report(), docs=7_200, nodes=4)
    assert one["estimate"]["mode"] == "nodes" and one["estimate"]["nodes"] == 1
    assert one["estimate"]["hours"] == pytest.approx(1.0)
    assert four["estimate"]["nodes"] == 4 and four["estimate"]["hours"] == pytest.approx(0.25)
    assert four["estimate"]["gpus"] == 0 and four["basis"]["unit"] == "CPU node"


def test_hours_mode_returns_just_enough_nodes():
    # 36,000 docs at 2 docs/s is 5 node-hours.
    exact = plan(_report(), docs=36_000, hours=1.0)
    assert exact["estimate"]["mode"] == "hours" and exact["estimate"]["target_hours"] == 1.0
    assert exact["estimate"]["nodes"] == 5  # whole up to float error: not rounded up to 6
    assert exact["estimate"]["hours"] == pytest.approx(1.0)
    tight = plan(_report(), docs=36_000, hours=0.9)
    assert tight["estimate"]["nodes"] == 6  # 5.6 rounded up
    assert tight["estimate"]["hours"] <= 0.9
    assert plan(_report(), docs=36_000, hours=100.0)["estimate"]["nodes"] == 1


def test_gpu_runs_count_gpus_per_actor():
    result = plan(_gpu_report(num_gpus=1.0, actors=2), docs=36_000, hours=1.0)
    assert result["basis"]["unit"] == "GPU" and result["basis"]["actors"] == 2
    assert result["basis"]["docs_per_s_per_actor"] == pytest.approx(1.0)  # 100 docs / 50 s / 2 actors
    assert result["estimate"]["nodes"] == 10 and result["estimate"]["gpus"] == 10
    assert "10 GPUs to finish within 1 h" in format_plan(result)

    half = plan(_gpu_report(num_gpus=0.5, actors=2), docs=1_000, nodes=3)
    assert half["estimate"]["gpus"] == 2  # 3 actors at half a GPU each need 2 GPUs
    assert "3 GPUs (2 GPUs at 0.5 per actor)" in format_plan(half)


def test_an_autoscaling_pool_is_counted_at_its_largest():
    pool = {"num_gpus": 1.0, "min_size": 1, "max_size": 4}
    result = plan(_report(resources={"embed_actors": pool}), docs=1_000)
    assert result["basis"]["actors"] == 4
    assert result["basis"]["docs_per_s_per_actor"] == pytest.approx(0.5)
    assert any("1-4" in note for note in result["notes"])
    # Newer reports count the actors that did embed, which beats the pool's bounds.
    used = plan(_report(resources={"embed_actors": pool}, embeddings={"computed": 200, "actors": 2}), docs=1)
    assert used["basis"]["actors"] == 2 and used["basis"]["docs_per_s_per_actor"] == pytest.approx(1.0)
    assert not any("1-4" in note for note in used["notes"])
    bare = plan(_report(resources={}), docs=1_000)
    assert bare["basis"]["actors"] == 1 and any("assumed 1" in note for note in bare["notes"])


def test_cost_is_hours_times_nodes_times_price():
    result = plan(_report(), docs=7_200, nodes=2, hourly_usd=3.0)
    assert result["estimate"]["hours"] == pytest.approx(0.5)
    assert result["estimate"]["cost_usd"] == pytest.approx(0.5 * 2 * 3.0)
    assert result["estimate"]["hourly_usd_source"] == "argument"

    priced = _report(cost={"hourly_usd": 4.0, "total_usd": 0.07})
    from_report = plan(priced, docs=7_200, nodes=2)
    assert from_report["estimate"]["cost_usd"] == pytest.approx(4.0)
    assert from_report["estimate"]["hourly_usd_source"] == "report"
    assert any("price of one node" in note for note in from_report["notes"])
    assert plan(priced, docs=7_200, nodes=2, hourly_usd=1.0)["estimate"]["cost_usd"] == pytest.approx(1.0)


def test_an_unknown_price_says_so():
    for result in (plan(_report(), docs=1_000), plan(_report(cost={}), docs=1_000, hourly_usd=0.0)):
        assert result["estimate"]["cost_usd"] is None and result["estimate"]["hourly_usd"] is None
        assert any(note.startswith("Cost unknown") for note in result["notes"])
        assert "unknown (no hourly price)" in format_plan(result)


def test_qps_gives_the_replicas_needed():
    result = plan(_report(), docs=1_000, qps=25)
    assert result["serving"]["replicas"] == 3 and result["serving"]["shards"] == 2
    assert result["serving"]["qps_per_replica"] == DEFAULT_QPS_PER_REPLICA == 10.0
    assert any("Python ingress" in note for note in result["notes"])
    assert plan(_report(), docs=1_000, qps=20)["serving"]["replicas"] == 2
    custom = plan(_report(), docs=1_000, qps=120, qps_per_replica=50)
    assert custom["serving"]["replicas"] == 3
    assert not any("Python ingress" in note for note in custom["notes"])
    assert plan(_report(), docs=1_000)["serving"] is None
    assert "25 QPS -> 3 router replicas, each searching the 2 shards in-process" in format_plan(result)


def test_storage_is_measured_from_db_bytes_or_estimated_from_dim():
    measured = plan(_report(), docs=1_000, db_bytes=600_000)
    assert measured["basis"]["bytes_per_chunk"] == pytest.approx(2_000)  # 600 kB over the db's 300 rows
    assert measured["estimate"]["storage_bytes"] == 2_000 * 2_000
    assert measured["estimate"]["storage_gb"] == pytest.approx(0.004)
    assert measured["basis"]["bytes_per_chunk_source"].startswith("measured")

    estimated = plan(_report(), docs=1_000, dim=384)
    # 384 float32 + 200 tokens of text at 4 bytes + 300 bytes of ids and metadata
    assert estimated["basis"]["bytes_per_chunk"] == pytest.approx(384 * 4 + 200 * 4 + 300)
    assert estimated["basis"]["bytes_per_chunk_source"].startswith("estimated")
    assert plan(_report(dim=768), docs=1_000)["basis"]["bytes_per_chunk"] == pytest.approx(768 * 4 + 1_100)

    unknown = plan(_report(), docs=1_000)
    assert unknown["estimate"]["storage_bytes"] is None and unknown["estimate"]["storage_gb"] is None
    assert any(note.startswith("Storage unknown") for note in unknown["notes"])


def test_cache_hits_do_not_count_as_throughput():
    result = plan(_report(embeddings={"computed": 100, "cache_hits": 100}), docs=1_000)
    assert result["basis"]["docs_per_s_per_actor"] == pytest.approx(1.0)  # half the chunks were free
    assert any("cache" in note for note in result["notes"])
    uncached = plan(_report(embeddings={"computed": 200, "cache_hits": 0}), docs=1_000)
    assert uncached["basis"]["docs_per_s_per_actor"] == pytest.approx(2.0)
    with pytest.raises(ValueError, match="from the cache"):
        plan(_report(embeddings={"computed": 0, "cache_hits": 200}), docs=1_000)


@pytest.mark.parametrize(
    ("report", "match"),
    [
        (_report(docs={"seen": 5, "ingested": 0, "unchanged": 5, "failed": 0}), "ingested 0 documents"),
        ({k: v for k, v in _report().items() if k != "docs"}, "ingested 0 documents"),
        (_report(wall_s=0.0), "wall time"),
        (_report(wall_s=-3.0), "wall time"),
    ],
)
def test_a_report_that_measured_nothing_is_refused(report, match):
    with pytest.raises(ValueError, match=match):
        plan(report, docs=1_000)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"docs": 0}, "docs must be"),
        ({"docs": -5}, "docs must be"),
        ({"docs": 10, "nodes": 2, "hours": 1.0}, "not both"),
        ({"docs": 10, "nodes": 0}, "nodes must be"),
        ({"docs": 10, "hours": 0}, "hours must be"),
        ({"docs": 10, "qps": -1}, "qps must be"),
        ({"docs": 10, "qps": 5, "qps_per_replica": 0}, "qps_per_replica must be"),
        ({"docs": 10, "hourly_usd": -1.0}, "hourly_usd must be"),
        ({"docs": 10, "db_bytes": 0}, "db_bytes must be"),
    ],
)
def test_bad_arguments_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        plan(_report(), **kwargs)


def test_format_plan_shows_the_headline_numbers():
    text = format_plan(plan(_report(), docs=36_000, hours=1.0, hourly_usd=2.0, db_bytes=600_000))
    assert text.startswith("capacity plan for 36,000 docs")
    for expected in (
        "run 20250101T120000Z-a1b2c3: 100 docs in 50.0 s (embed stage)",
        "2.00 docs/s per CPU node, measured with 1 actor",
        "72,000",  # chunks
        "5 CPU nodes to finish within 1 h",
        "$10.00 at $2/h per CPU node",
        "0.14 GB",
    ):
        assert expected in text


def test_a_report_from_build_report_can_be_planned():
    report = build_report(
        run_id="20250101T120000Z-a1b2c3", source="/data/c.jsonl", db="/data/db", model="m", wall_s=40.0,
        counts={"started_at": 1.0, "chunks": 300, "tokens": 60_000, "ingested": 95, "unchanged": 3,
                "failed": []},
        resources={"peak_rss_mb": 1.0, "cpu_util_pct": 1.0, "cpu_count": 2,
                   "embed_actors": {"num_gpus": 0.0, "num_cpus": 1, "min_size": 1, "max_size": 1}},
        stages={"MapBatches(chunk_docs)->MapBatches(Embedder)": {"wall_s": 38.0}},
        shards={"shard_000": 300}, config={}, hourly_usd=3.6, timeline=[],
    )  # fmt: skip
    result = plan(report, docs=950, nodes=1)
    assert result["estimate"]["chunks"] == 3_000 and result["estimate"]["tokens"] == 600_000
    assert result["estimate"]["hours"] == pytest.approx(380 / 3600)
    assert result["estimate"]["cost_usd"] == pytest.approx(380 / 3600 * 3.6)


def test_latest_report_is_the_newest_by_started_at_then_by_mtime(tmp_path):
    runs = tmp_path / "_runs"
    runs.mkdir()
    # Named so that name order and start order disagree.
    (runs / "20250109T000000Z-aaaaaa.json").write_text(json.dumps(_report(started_at=100.0, run_id="a")))
    (runs / "20250101T000000Z-bbbbbb.json").write_text(json.dumps(_report(started_at=200.0, run_id="b")))
    (runs / "20250110T000000Z-cccccc.json").write_text("{not json")
    (runs / "20250110T000000Z-cccccc.json.tmp").write_text(json.dumps(_report(started_at=900.0)))
    assert latest_report(tmp_path)["run_id"] == "b"

    undated = runs / "20250102T000000Z-dddddd.json"
    undated.write_text(json.dumps({k: v for k, v in _report(run_id="d").items() if k != "started_at"}))
    os.utime(undated, (150.0, 150.0))
    assert latest_report(tmp_path)["run_id"] == "b"
    os.utime(undated, (300.0, 300.0))
    assert latest_report(tmp_path)["run_id"] == "d"

    # A later run whose documents were all unchanged measured nothing: it is passed over.
    (runs / "20250111T000000Z-eeeeee.json").write_text(
        json.dumps(
            {**_report(started_at=999.0), "docs": {"seen": 5, "ingested": 0, "unchanged": 5, "failed": 0}}
        )
    )
    assert latest_report(tmp_path)["run_id"] == "d"


def test_latest_report_without_reports_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="No report of a run that ingested"):
        latest_report(tmp_path)
    (tmp_path / "_runs").mkdir()
    (tmp_path / "_runs" / "20250101T000000Z-aaaaaa.json").write_text("[1, 2")
    with pytest.raises(FileNotFoundError, match="No report of a run that ingested"):
        latest_report(tmp_path)


def test_serving_memory_per_node_follows_the_index_and_the_nodes():
    from pipelines.config import IndexSettings
    from pipelines.plan import SERVE_BASE_BYTES, serving_memory

    big = serving_memory(rows=10_000_000, shards=8, dim=384, nodes=1, settings=IndexSettings())
    # 1.25M-row shards: 2-bit in-memory codes and their ids, no text (4 bits below 1M rows a shard)
    assert (big["vector_index"], big["rows_per_shard"], big["bytes_per_row"]) == ("IVF_RQ", 1_250_000, 144)
    assert big["node_bytes"] == round(SERVE_BASE_BYTES + 10_000_000 * 144)
    mid = serving_memory(rows=1_000_000, shards=4, dim=384, nodes=1, settings=IndexSettings())
    assert mid["bytes_per_row"] == 240
    two = serving_memory(rows=10_000_000, shards=8, dim=384, nodes=2, settings=IndexSettings())
    assert two["rows_per_node"] == 5_000_000 and two["node_bytes"] < big["node_bytes"]
    small = serving_memory(rows=40_000, shards=4, dim=384, nodes=1, settings=IndexSettings())
    assert small["vector_index"] == "exact" and small["bytes_per_row"] > 4 * 384  # vectors held to scan
    # The plan carries it, from the report's shards and the db's dimension, and prints it.
    result = plan(_report(), docs=5_000_000, dim=384)
    assert result["memory"]["rows_per_shard"] == 5_000_000  # 10M chunks in the report's 2 shards
    assert "serve memory" in format_plan(result) and "IVF_RQ" in format_plan(result)
    assert plan(_report(), docs=100)["memory"] is None  # no dimension known: no estimate
