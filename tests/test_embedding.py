"""The embedding stage with the real bundled model."""

import json

import numpy as np
import pyarrow as pa
import pytest

from pipelines import models
from pipelines.chunking import chunk_docs
from pipelines.embedding import Embedder, actor_options, backends, embedding_dim
from pipelines.embedding.backends import resolve_dtype
from pipelines.models import embed_input
from pipelines.sources import DOC_SCHEMA, _doc

MODEL = "sentence-transformers/all-MiniLM-L6-v2"


@pytest.fixture(scope="module")
def embedder():
    return Embedder(model=MODEL, device="cpu", dtype="fp32")


def test_vectors_match_plain_sentence_transformers(embedder):
    from sentence_transformers import SentenceTransformer

    texts = ["Vitamin D and bone density.", "A different sentence about galaxies."]
    plain = SentenceTransformer(models.resolve_model(MODEL), device="cpu").encode(
        texts, normalize_embeddings=True
    )
    ours = embedder.encode(texts)
    assert ours.dtype == np.float32 and ours.shape == (2, 384)
    np.testing.assert_allclose(ours, plain, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


def test_stage_embeds_ok_rows_only(embedder):
    docs = pa.Table.from_pylist(
        [_doc("a", source="s", title="Title", text="Some text."), _doc("b", source="s", error="empty file")],
        schema=DOC_SCHEMA,
    )
    out = embedder(chunk_docs(docs, model=MODEL))
    assert out.schema.field("vector").type == pa.list_(pa.float32(), 384)
    rows = {r["doc_id"]: r for r in out.to_pylist()}
    assert rows["b"]["vector"] is None
    expected = embedder.encode([embed_input("Title", "Some text.")])[0]
    np.testing.assert_allclose(rows["a"]["vector"], expected, atol=1e-6)


def test_dim_from_config_without_loading():
    assert embedding_dim(MODEL) == 384


def test_dtype_resolution():
    assert resolve_dtype("auto", "cuda") == "fp16"
    assert resolve_dtype("auto", "cpu") in {"fp32", "bf16"}
    assert resolve_dtype("bf16", "cpu") == "bf16"
    with pytest.raises(ValueError, match="fp16"):
        resolve_dtype("fp16", "cpu")


def test_bf16_close_to_fp32(embedder):
    bf16 = Embedder(model=MODEL, device="cpu", dtype="bf16")
    texts = ["Vitamin D and bone density in older women."]
    cos = float(embedder.encode(texts)[0] @ bf16.encode(texts)[0])
    assert cos > 0.99


def test_actor_pool_follows_the_cluster():
    assert actor_options(cluster_gpus=0, gpus_per_actor=None, min_actors=1, max_actors=None) == {
        "num_gpus": 0.0, "num_cpus": 1, "min_size": 1, "max_size": 1,
    }  # fmt: skip
    gpu = actor_options(cluster_gpus=4, gpus_per_actor=None, min_actors=1, max_actors=None)
    assert (gpu["num_gpus"], gpu["max_size"]) == (1.0, 4)
    assert actor_options(cluster_gpus=4, gpus_per_actor=1, min_actors=1, max_actors=2)["max_size"] == 2


def test_openvino_fp32_runs_in_fp32_on_every_cpu(embedder, tmp_path):
    """OpenVINO would run an fp32 model in bf16 on AVX512-BF16/AMX CPUs; the query path (Serve) must
    give torch fp32's vectors (`embedpipe query`) wherever it runs."""
    from pipelines.embedding import backends

    exported = backends.openvino_fp32_model(MODEL, root=tmp_path)
    ov = Embedder(model=MODEL, device="cpu", dtype="fp32", openvino_model=str(exported))
    precision = ov.backend.compiled.get_property("INFERENCE_PRECISION_HINT")
    assert str(precision).lower().endswith("f32") or "float32" in str(precision).lower(), precision
    texts = ["Vitamin D and bone density in older women.", "galaxy rotation curves", "x"]
    np.testing.assert_allclose(ov.encode(texts), embedder.encode(texts), atol=2e-5)


def test_fp16_vectors_are_float32_unit_vectors_close_to_fp32(embedder):
    """fp16 (a GPU's default) normalizes in fp32: run here with torch's fp16 kernels on the CPU."""
    from pipelines.embedding.backends import TorchBackend

    fp16 = TorchBackend(MODEL, device="cpu", dtype="fp16")
    texts = ["Vitamin D and bone density in older women.", "galaxy rotation curves", "x " * 200]
    vectors = fp16.encode(texts)
    assert vectors.dtype == np.float32 and vectors.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-6)
    cosine = np.sum(vectors * embedder.encode(texts), axis=1)
    assert cosine.min() > 0.999, cosine


def test_token_ids_from_the_chunker_give_the_vectors_of_the_text(embedder, tmp_path):
    """The chunker tokenizes once (special tokens, truncation at the model's limit); the embedder
    only pads those ids, on torch and on OpenVINO, and gets the vectors of tokenizing the text."""
    from sentence_transformers import SentenceTransformer

    from pipelines.embedding import backends
    from tests.conftest import scifact_docs

    docs = [_doc(d["_id"], source="s", title=d["title"], text=d["text"]) for d in scifact_docs(30)]
    chunks = chunk_docs(pa.Table.from_pylist(docs, schema=DOC_SCHEMA), model=MODEL, max_tokens=128)
    texts = [
        embed_input(t, x)
        for t, x in zip(chunks["title"].to_pylist(), chunks["text"].to_pylist(), strict=True)
    ]
    ids = chunks["input_ids"].to_pylist()
    st = SentenceTransformer(models.resolve_model(MODEL), device="cpu")
    assert ids == [st.tokenize([text])["input_ids"][0].tolist() for text in texts]
    lengths = sorted({len(i) for i in ids})
    assert lengths[0] < lengths[-1]  # passes of mixed lengths: padding and masks matter
    np.testing.assert_allclose(embedder.backend.encode_ids(ids), embedder.encode(texts), atol=1e-5)
    ov = backends.OpenVINOBackend(MODEL, files=backends.openvino_fp32_model(MODEL, root=tmp_path))
    np.testing.assert_allclose(ov.encode_ids(ids), ov.encode(texts), atol=1e-5)
    out = embedder(chunks)
    assert "input_ids" not in out.column_names  # not carried on to the write stage
    np.testing.assert_allclose(
        np.stack(out["vector"].to_numpy(zero_copy_only=False)), embedder.encode(texts), atol=1e-5
    )


def test_openvino_sends_no_telemetry_and_forks_nothing(tmp_path):
    """import openvino (and NNCF) would fork a process that posts usage telemetry and write a client
    id under ~/intel, unless CI=true: embedpipe's processes opt out before importing it. Run in a
    fresh interpreter, without CI in its environment, with a HOME of its own."""
    import os
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(
        """
        import multiprocessing.popen_fork as pf
        forks = []
        launch = pf.Popen._launch
        pf.Popen._launch = lambda self, obj: (forks.append(1), launch(self, obj))[1]
        import lancedb
        from pipelines.embedding import backends
        assert backends.openvino_available()
        backend = backends.OpenVINOBackend(
            "sentence-transformers/all-MiniLM-L6-v2",
            files=backends.openvino_fp32_model("sentence-transformers/all-MiniLM-L6-v2", root=sys.argv[1]),
        )
        backend.encode(["x"])
        print("FORKS", len(forks))
        """
    )
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "TF_BUILD", "JENKINS_URL")}
    env.update(HOME=str(tmp_path / "home"), HF_HUB_OFFLINE="1")
    (tmp_path / "home").mkdir()
    out = subprocess.run(
        [sys.executable, "-c", "import sys\n" + script, str(tmp_path / "models")],
        capture_output=True, text=True, timeout=300, env=env, check=False,
    )  # fmt: skip
    assert "FORKS 0" in out.stdout, out.stdout[-2000:] + out.stderr[-3000:]
    assert not (tmp_path / "home" / "intel").exists()  # no client id written
    assert "fork support is experimental" not in out.stderr


def test_a_query_embedder_imports_no_torch_lancedb_or_ray(tmp_path):
    """The service's query model runs on OpenVINO with the tokenizers library: importing torch (via
    transformers' tokenizer or the export step) would add ~0.2 GB to every router replica. Nor does it
    import LanceDB or Ray: `embedpipe query` embeds its query while LanceDB's import (~1 s) runs. Run
    in a fresh interpreter, with the exported model already on disk as a replica finds it."""
    import os
    import subprocess
    import sys
    import textwrap

    backends.openvino_fp32_model(MODEL, root=tmp_path)
    script = textwrap.dedent(
        """
        import sys
        from pipelines.embedding.query import query_embedder
        embedder = query_embedder("sentence-transformers/all-MiniLM-L6-v2", engine="openvino")
        print("SHAPE", embedder.encode(["vitamin D and the heart"]).shape)
        print("TORCH", "torch" in sys.modules, "transformers" in sys.modules)
        print("STORE", "lancedb" in sys.modules, "ray" in sys.modules)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "EMBEDPIPE_CACHE": str(tmp_path)}, check=False,
    )  # fmt: skip
    assert "SHAPE (1, 384)" in out.stdout, out.stdout[-2000:] + out.stderr[-3000:]
    assert "TORCH False False" in out.stdout
    assert "STORE False False" in out.stdout


@pytest.mark.parametrize("pays", [True, False])
def test_single_texts_give_the_same_vectors_on_static_and_dynamic_models(tmp_path, monkeypatch, pays):
    """Whether static shapes pay is measured per CPU; either way a text's vector is its batch vector."""
    monkeypatch.setenv("EMBEDPIPE_CACHE", str(tmp_path / "cache"))  # no earlier choice kept
    monkeypatch.setattr(backends.OpenVINOBackend, "_static_pays", lambda self, static, length: pays)
    files = backends.openvino_fp32_model(MODEL, root=tmp_path)
    ov = backends.OpenVINOBackend(MODEL, files=files, static_lengths=(16, 32, 64))
    assert ov.static_lengths == ((16, 32, 64) if pays else ())
    texts = ["vitamin D", "a longer query about the effect of statins on " * 3, "x " * 70]
    batch = ov.encode(texts)
    single = np.concatenate([ov.encode([t]) for t in texts])
    np.testing.assert_allclose(single, batch, atol=1e-5)


def test_the_static_choice_is_measured_once_per_machine_and_kept(tmp_path, monkeypatch):
    """Every process of a machine embeds a query alike: the first measurement is kept and reused,
    whatever a later one would say (the service's replicas and `embedpipe query` must agree)."""
    monkeypatch.setenv("EMBEDPIPE_CACHE", str(tmp_path / "cache"))
    files = backends.openvino_fp32_model(MODEL, root=tmp_path)
    calls = []

    def measured(self, static, length):
        calls.append(length)
        return len(calls) == 1  # the first says static pays, any later one would say not

    monkeypatch.setattr(backends.OpenVINOBackend, "_static_pays", measured)
    first = backends.OpenVINOBackend(MODEL, files=files, static_lengths=(16, 32))
    second = backends.OpenVINOBackend(MODEL, files=files, static_lengths=(16, 32))
    assert calls == [32] and first.static_lengths == second.static_lengths == (16, 32)
    (kept,) = (tmp_path / "cache" / "openvino-static").glob("*.json")
    assert json.loads(kept.read_text())["static"] is True


def test_the_suite_keeps_its_own_cache():
    """conftest points EMBEDPIPE_CACHE at a temporary folder for the whole suite: no test quantizes,
    measures or compiles into the user's ~/.cache/embedpipe."""
    import tempfile
    from pathlib import Path

    root = backends.cache_root().resolve()
    assert root.is_relative_to(Path(tempfile.gettempdir()).resolve()), root
    assert not root.is_relative_to((Path.home() / ".cache").resolve()), root


def test_a_query_compiles_only_the_model_it_runs(tmp_path, monkeypatch):
    """`embedpipe query` embeds one text: it compiles that text's static model and nothing else; a
    service compiles every model at start (``warm_up``), and then lets the model's files go."""
    monkeypatch.setenv("EMBEDPIPE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(backends.OpenVINOBackend, "_static_pays", lambda self, static, length: True)
    import openvino

    files = backends.openvino_fp32_model(MODEL, root=tmp_path)
    backends.OpenVINOBackend(MODEL, files=files, static_lengths=(16, 32, 64))  # measures, keeps the choice
    shapes, compile_model = [], openvino.Core.compile_model

    def recording_compile(core, model, device, config):
        shapes.append(str(model.inputs[0].get_partial_shape()))
        return compile_model(core, model, device, config)

    monkeypatch.setattr(openvino.Core, "compile_model", recording_compile)
    query = Embedder(
        model=MODEL, device="cpu", dtype="fp32", openvino_model=str(files), static_lengths=(16, 32, 64)
    )
    one = query.encode(["vitamin D and the heart"])
    assert shapes == ["[1,16]"]
    service = Embedder(
        model=MODEL, device="cpu", dtype="fp32", openvino_model=str(files), static_lengths=(16, 32, 64)
    )
    service.warm_up()
    assert sorted(shapes[1:]) == ["[1,16]", "[1,32]", "[1,64]", "[?,?]"]
    assert service.backend._files is None  # every model compiled: the files are let go
    np.testing.assert_allclose(service.encode(["vitamin D and the heart"]), one, atol=1e-6)
    assert len(shapes) == 5  # nothing compiled after the warm-up


def test_static_models_are_kept_only_where_they_are_faster(tmp_path, monkeypatch):
    files = backends.openvino_fp32_model(MODEL, root=tmp_path)
    ov = backends.OpenVINOBackend(MODEL, files=files)
    static = ov.request  # a stand-in "static" request: the same model, so the ratio is near 1
    assert ov._static_pays(static, 32) is False
    monkeypatch.setattr(backends, "STATIC_MIN_GAIN", 0.01)
    assert ov._static_pays(static, 32) is True


def _chunk_ids(n_docs: int, max_tokens: int = 128):
    from tests.conftest import scifact_docs

    docs = [_doc(d["_id"], source="s", title=d["title"], text=d["text"]) for d in scifact_docs(n_docs)]
    chunks = chunk_docs(pa.Table.from_pylist(docs, schema=DOC_SCHEMA), model=MODEL, max_tokens=max_tokens)
    texts = [
        embed_input(t, x)
        for t, x in zip(chunks["title"].to_pylist(), chunks["text"].to_pylist(), strict=True)
    ]
    return texts, chunks["n_tokens"].to_pylist(), chunks["input_ids"].to_pylist()


def test_openvino_streams_give_the_vectors_of_one_pass_at_a_time(embedder, tmp_path):
    """Throughput mode runs a batch's passes side by side on two inference streams."""
    from pipelines.embedding import backends

    exported = str(backends.openvino_fp32_model(MODEL, root=tmp_path))
    texts, lengths, ids = _chunk_ids(30)
    small = {"batch_tokens": 1024, "min_batch_tokens": 256, "max_batch_tokens": 1024}
    one = Embedder(model=MODEL, device="cpu", dtype="fp32", openvino_model=exported, **small)
    two = Embedder(
        model=MODEL, device="cpu", dtype="fp32", openvino_model=exported, openvino_streams=2, **small
    )
    v1, s1 = one.embed(texts, lengths, ids)
    v2, s2 = two.embed(texts, lengths, ids)
    assert two.backend.streams == 2 and s2["passes"] == s1["passes"] > 2
    np.testing.assert_allclose(v2, v1, atol=1e-6)
    np.testing.assert_allclose(v1, embedder.encode(texts), atol=2e-5)


def test_openvino_bf16_runs_in_bf16_where_the_cpu_has_it(embedder, tmp_path):
    from pipelines.embedding import backends

    if not backends.cpu_has_native_bf16():
        pytest.skip("no AVX512-BF16 or AMX on this CPU: bf16 is not offered here")
    exported = backends.openvino_fp32_model(MODEL, root=tmp_path)
    bf16 = backends.OpenVINOBackend(MODEL, files=exported, precision="bf16")
    assert "bfloat16" in str(bf16.compiled.get_property("INFERENCE_PRECISION_HINT")).lower()
    texts, _, ids = _chunk_ids(10)
    vectors, reference = bf16.encode_ids(ids), embedder.encode(texts)
    cosine = np.sum(vectors * reference, axis=1)
    assert cosine.min() > 0.999 and np.abs(vectors - reference).max() > 1e-6  # bf16, not fp32


def test_an_actor_reuses_what_it_computed_before_the_cache_writer_appends_it(tmp_path):
    """The run's cache writer appends every few seconds; a text repeated in the next batch is not
    embedded again meanwhile. (The writer here only records what it is sent: the unit under test
    is the actor.)"""
    from pipelines.embedding import cache as embed_cache

    sent = []

    class Writer:
        class add:  # noqa: N801  (the shape of a Ray actor method)
            @staticmethod
            def remote(keys, vectors):
                sent.append((keys, vectors))

    embed_cache.create(tmp_path, 384)
    actor = Embedder(model=MODEL, device="cpu", dtype="fp32", cache_db=str(tmp_path), cache_writer=Writer())
    docs = [
        _doc(f"d{i}", source="s", title="T", text=f"Enzyme {i} speeds up reaction {i}.") for i in range(5)
    ]
    chunks = chunk_docs(pa.Table.from_pylist(docs, schema=DOC_SCHEMA), model=MODEL)
    first = json.loads(actor(chunks)["embed_stats"][0].as_py())
    again = actor(chunks)
    stats = json.loads(again["embed_stats"][0].as_py())
    assert (first["computed"], stats["computed"], stats["cache_hits"]) == (5, 0, 5)
    assert len(sent) == 1 and len(sent[0][0]) == 5  # each vector sent to the writer once
    np.testing.assert_allclose(
        np.stack(again["vector"].to_numpy(zero_copy_only=False)), sent[0][1], atol=1e-6
    )


def test_the_dynamic_model_runs_few_shapes_and_keeps_few(tmp_path, monkeypatch):
    """Queries of every length would each leave OpenVINO kernels behind (a router grew ~850 MB in 400
    batches): the dynamic model runs widths rounded to DYNAMIC_WIDTH_STEP, with the same vectors, and
    OpenVINO keeps the kernels of RUNTIME_CACHE_SHAPES shapes at most."""
    monkeypatch.setenv("EMBEDPIPE_CACHE", str(tmp_path / "cache"))
    import openvino

    files = backends.openvino_fp32_model(MODEL, root=tmp_path)
    configs, compile_model = [], openvino.Core.compile_model

    def recording_compile(core, model, device, config):
        configs.append(config)
        return compile_model(core, model, device, config)

    monkeypatch.setattr(openvino.Core, "compile_model", recording_compile)
    ov = backends.OpenVINOBackend(MODEL, files=files)
    widths = []
    real_infer = ov.request.infer
    assert [c["CPU_RUNTIME_CACHE_CAPACITY"] for c in configs] == [backends.RUNTIME_CACHE_SHAPES]

    class Recording:
        def infer(self, feed):
            widths.append(feed["input_ids"].shape[1])
            return real_infer(feed)

    texts = [f"query {'word ' * n}" for n in range(1, 30, 3)]
    exact = ov.encode(texts)  # before the recording: the same request, the same rounding
    ov.request = Recording()
    for i in range(len(texts) - 1):
        np.testing.assert_allclose(ov.encode(texts[i : i + 2]), exact[i : i + 2], atol=1e-5)
    assert widths and all(w % backends.DYNAMIC_WIDTH_STEP == 0 for w in widths), widths
    assert len(set(widths)) < len(texts) - 1  # fewer shapes than distinct batch widths
