"""dtype/engine auto on a CPU: measured on the real model, chosen by speed at fp32's fidelity."""

import json

import pytest

from pipelines.embedding import autotune, backends

MODEL = "sentence-transformers/all-MiniLM-L6-v2"


def _result(dtype, engine, speed, mean=1.0, low=1.0):
    return {"dtype": dtype, "engine": engine, "tokens_per_s": speed, "mean_cosine": mean, "min_cosine": low}


def test_the_fastest_candidate_that_keeps_fp32_fidelity_wins():
    results = [
        _result("fp32", "torch", 6_000),
        _result("bf16", "openvino", 24_000, 0.99998, 0.99996),
        _result("int8", "openvino", 40_000, 0.990, 0.95),  # fast, but too far from fp32
    ]
    assert autotune.choose(results)["dtype"] == "bf16"
    results[2].update(mean_cosine=0.997, min_cosine=0.985)
    assert autotune.choose(results)["dtype"] == "int8"


def test_candidates_follow_the_cpu():
    found = autotune.candidates(int8=True, openvino=True)
    assert found[0] == ("fp32", "torch")  # the reference, measured first
    assert (("bf16", "torch") in found) == backends.cpu_has_native_bf16()
    assert (("int8", "openvino") in found) == backends.cpu_has_int8_dot()
    assert autotune.candidates(int8=False, openvino=False) == [("fp32", "torch")] + (
        [("bf16", "torch")] if backends.cpu_has_native_bf16() else []
    )


def test_measured_once_then_read_from_the_cache(tmp_path, monkeypatch, scifact):
    from tests.conftest import scifact_docs

    texts = [f"{d['title']} {d['text']}" for d in scifact_docs(40)]
    choice = autotune.cached_choice(MODEL, texts=texts, dtypes=("fp32",), root=tmp_path, streams=2)
    by_engine = {r["engine"]: r for r in choice["results"]}
    assert set(by_engine) == {"torch", "openvino"}
    assert by_engine["openvino"]["min_cosine"] > 0.9999  # fp32 on OpenVINO: torch's vectors
    assert choice["dtype"] == "fp32" and choice["engine"] in by_engine
    assert all(r["tokens_per_s"] > 0 for r in choice["results"])
    (saved,) = (tmp_path / "autotune").glob("*.json")
    assert json.loads(saved.read_text())["engine"] == choice["engine"]

    def measure_again(*args, **kwargs):
        raise AssertionError("measured twice")

    monkeypatch.setattr(autotune, "measure", measure_again)
    assert autotune.cached_choice(MODEL, texts=texts, dtypes=("fp32",), root=tmp_path, streams=2) == choice
    with pytest.raises(AssertionError, match="measured twice"):  # another CPU or model: measured anew
        autotune.cached_choice(MODEL, texts=texts, dtypes=("fp32",), root=tmp_path, streams=1)
