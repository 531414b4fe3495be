"""`embedpipe bench` and `embedpipe plan` end to end, on a small real BEIR collection cut from SciFact."""

import json

import pytest
from typer.testing import CliRunner

from pipelines.cli import app


@pytest.mark.slow
def test_bench_then_plan(ray_local, mini_beir, tmp_path):
    runner = CliRunner()
    out_json, png = tmp_path / "bench.json", tmp_path / "bench.png"
    args = [
        "bench",
        str(mini_beir),
        "--workdir",
        str(tmp_path / "work"),
        "--json",
        str(out_json),
        "--png",
        str(png),
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    figures = json.loads(out_json.read_text())
    for key in (
        "ratio_vs_plain_fp32",
        "ratio_vs_plain_same_dtype",
        "ratio_vs_plain_best",
        "reingest_speedup",
        "ndcg@10",
    ):
        assert isinstance(figures[key], float) and figures[key] > 0, key
    # A plain loop per backend this CPU runs (autotune's candidates), each scored on its own vectors.
    from pipelines.embedding import autotune, backends

    pairs = {(r["dtype"], r["engine"]) for r in figures["plain"]}
    int8 = figures["pipeline"]["embeddings"]["computed"] > 0 and "int8_model" in figures
    assert pairs == set(autotune.candidates(int8=int8, openvino=backends.openvino_available()))
    assert all(r["tokens_per_s"] > 0 and r["ndcg@10"] > 0.5 for r in figures["plain"])
    best = figures["plain_best"]
    assert best["tokens_per_s"] == max(
        r["tokens_per_s"] for r in figures["plain"] if r["ndcg@10"] >= figures["plain"][0]["ndcg@10"] - 0.005
    )
    assert figures["phases"]["d"]["wall_s"] < figures["phases"]["c"]["wall_s"]
    assert set(figures["phases"]) == {"a", "b", "c", "d"}
    assert figures["reingest"] == {"unchanged": figures["docs"], "embeddings_computed": 0}
    assert figures["phases"]["c"]["gflops_per_s"] > 0 and figures["gflop_per_chunk"] > 0
    assert figures["ndcg@10"] > 0.5  # the judged docs of 20 queries among ~150
    assert png.stat().st_size > 10_000
    assert "(c)/(a)" in result.output

    # A baseline twice as fast is a regression; --fail-on-regression turns it into exit code 4.
    better = {
        **figures,
        "phases": {k: {**v, "docs_per_s": v["docs_per_s"] * 2} for k, v in figures["phases"].items()},
    }
    baseline = tmp_path / "baseline.json"
    baseline.write_text(json.dumps(better))
    again = runner.invoke(
        app, [*args, "--limit", "40", "--baseline", str(baseline), "--fail-on-regression", "--repeat", "2"]
    )
    assert again.exit_code == 4, again.output
    assert "regression: c.docs_per_s" in again.output
    # Repeated, each ratio is the median of the runs (of two: their mean), with the runs' range.
    repeated = json.loads(out_json.read_text())
    assert repeated["repeats"] == 2 and len(repeated["runs"]) == 2
    for key in ("ratio_vs_plain_best", "ratio_vs_plain_best_with_ray_start", "reingest_speedup"):
        values = [run[key] for run in repeated["runs"]]
        assert repeated["spread"][key] == [min(values), max(values)]
        assert repeated[key] == pytest.approx(sum(values) / 2, abs=1e-3)
    # Ray's start counted in (none here: the test's Ray is up already), against the same plain loop.
    assert repeated["ratio_vs_plain_best_with_ray_start"] <= repeated["ratio_vs_plain_best"]
    best_wall = next(
        r["wall_s"] for r in figures["plain"]
        if (r["dtype"], r["engine"]) == (figures["plain_best"]["dtype"], figures["plain_best"]["engine"])
    )  # fmt: skip
    c_and_start = figures["phases"]["c"]["wall_s"] + figures["ray_start_s"]
    assert figures["ratio_vs_plain_best_with_ray_start"] == pytest.approx(best_wall / c_and_start, abs=2e-3)
    assert "median of 2 runs" in again.output

    plan = runner.invoke(app, ["plan", "--docs", "1000000", "--db", str(tmp_path / "work" / "db"), "--json"])
    assert plan.exit_code == 0, plan.output
    estimate = json.loads(plan.stdout)["estimate"]
    assert estimate["hours"] > 0 and estimate["storage_bytes"] > 0
    hours = runner.invoke(
        app, ["plan", "--docs", "1000000", "--db", str(tmp_path / "work" / "db"), "--hours", "1"]
    )
    assert hours.exit_code == 0 and "capacity plan" in hours.stdout
