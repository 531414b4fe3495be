"""Shared fixtures: one small real Ray for the session, real LanceDB on tmp_path, real model."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"
SCIFACT = SHARED / "scifact"


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray with 2 CPUs, shared by every test that needs one."""
    import ray

    # "local": a fresh Ray even when a `ray start` cluster runs on this machine (ray.init would join it).
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def scifact() -> Path:
    if not (SCIFACT / "corpus.jsonl").exists():
        pytest.skip(f"SciFact not found at {SCIFACT}")
    return SCIFACT


def scifact_docs(n: int) -> list[dict]:
    with (SCIFACT / "corpus.jsonl").open() as f:
        return [json.loads(line) for _, line in zip(range(n), f, strict=False)]


@pytest.fixture(scope="session")
def mini_beir(tmp_path_factory, scifact) -> Path:
    """A real BEIR collection cut from SciFact: the judged docs of 20 queries plus 100 others."""
    qrels = [line.rstrip("\n").split("\t") for line in (scifact / "qrels" / "test.tsv").open()][1:]
    queries = sorted({q for q, _, _ in qrels}, key=int)[:20]
    wanted = {d for q, d, _ in qrels if q in queries}
    docs, others = [], 0
    with (scifact / "corpus.jsonl").open() as f:
        for line in f:
            doc = json.loads(line)
            if doc["_id"] in wanted or others < 100:
                others += doc["_id"] not in wanted
                docs.append(doc)
    root = tmp_path_factory.mktemp("mini-beir")
    (root / "qrels").mkdir()
    (root / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    with (root / "qrels" / "test.tsv").open("w") as f:
        f.write("query-id\tcorpus-id\tscore\n")
        f.writelines(f"{q}\t{d}\t{s}\n" for q, d, s in qrels if q in queries)
    with (root / "queries.jsonl").open("w") as out:
        for line in (scifact / "queries.jsonl").open():
            if json.loads(line)["_id"] in queries:
                out.write(line)
    return root
