"""BM25 with the generation's statistics: the same keyword answers for 1 and 4 shards, the same scores
as LanceDB's own on one shard, statistics that follow new rows, and other languages (real LanceDB
shards on tmp_path; SciFact texts, synthetic vectors: no model)."""

import json

import lancedb
import numpy as np
import pyarrow as pa
import pytest
from lancedb.query import MultiMatchQuery

from pipelines import bm25, index, store
from pipelines.config import IndexSettings, TextIndexSettings
from pipelines.search import Searcher, ShardGroup
from tests.conftest import SCIFACT, scifact_docs

DIM = 8


def _rows(docs: list[dict], rng: np.random.Generator) -> pa.Table:
    n = len(docs)
    vectors = rng.normal(size=(n, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = [d["_id"] for d in docs]
    return pa.table(
        {
            "chunk_id": [f"{d}#0" for d in ids],
            "doc_id": ids,
            "chunk_index": pa.array([0] * n, pa.int32()),
            "title": [d.get("title", "") for d in docs],
            "text": [d["text"] for d in docs],
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), DIM),
            "n_tokens": pa.array([5] * n, pa.int32()),
            "char_start": pa.array([0] * n, pa.int32()),
            "char_end": pa.array([5] * n, pa.int32()),
            "source": ["test"] * n,
            "content_hash": ids,
            "metadata": ["{}"] * n,
            "model": ["test"] * n,
            "run_id": ["r"] * n,
        }
    ).cast(store.table_schema(DIM))


def _db(path, docs: list[dict], shards: int, settings: IndexSettings | None = None):
    """A db of ``docs`` (one chunk each) in ``shards`` shards, indexed; the same vectors whatever the
    shard count."""
    manifest = store.init_db(path, store.Manifest(shards=shards, model="test", dim=DIM))
    rows = _rows(docs, np.random.default_rng(0))
    which = np.array([store.shard_of(d["_id"], shards) for d in docs])
    conn = lancedb.connect(str(path))
    for s in range(manifest.shards):
        conn.open_table(store.shard_name(s)).add(rows.filter(pa.array(which == s)))
    index.build(path, settings=settings or IndexSettings())
    return path


def _queries(n: int) -> list[str]:
    with (SCIFACT / "queries.jsonl").open() as f:
        return [json.loads(line)["text"] for _, line in zip(range(n), f, strict=False)]


def _top(searcher: Searcher, query: str, mode: str = "text") -> list[tuple[str, float]]:
    vector = np.full(DIM, DIM**-0.5, np.float32)
    found = searcher.search(query, k=10, mode=mode, vector=vector)
    return list(zip(found.column("chunk_id").to_pylist(), found.column("score").to_pylist(), strict=True))


@pytest.fixture(scope="module")
def dbs(tmp_path_factory, scifact):
    docs = scifact_docs(1500)
    return {n: _db(tmp_path_factory.mktemp(f"bm25-{n}"), docs, n) for n in (1, 4)}


def test_keyword_answers_do_not_depend_on_the_shard_count(dbs):
    one, four = Searcher(dbs[1]), Searcher(dbs[4])
    for query in _queries(40):
        for mode in ("text", "hybrid"):
            a, b = _top(one, query, mode), _top(four, query, mode)
            assert [c for c, _ in a] == [c for c, _ in b], (query, mode)
            np.testing.assert_allclose([s for _, s in a], [s for _, s in b], rtol=0, atol=1e-4)


def test_held_shards_score_as_lancedb_does(dbs):
    # Shards held in memory score keyword queries from their own postings (bm25.HeldTerms): the same
    # rows, order and scores as through LanceDB's full-text index, with every shard held and with some.
    conn = lancedb.connect(str(dbs[4]))
    sizes = sorted(conn.open_table(store.shard_name(s)).count_rows() for s in range(4))
    through_lancedb = Searcher(dbs[4])
    for memory_rows in (sizes[-1], sizes[1]):
        held = Searcher(dbs[4], memory_rows=memory_rows)
        _, memory, _ = held.group._memory
        assert memory is not None and memory.terms is not None
        assert memory.num_rows == sum(n for n in sizes if n <= memory_rows)
        for query in _queries(40):
            for mode in ("text", "hybrid"):
                a, b = _top(held, query, mode), _top(through_lancedb, query, mode)
                assert [c for c, _ in a] == [c for c, _ in b], (memory_rows, query, mode)
                np.testing.assert_allclose([s for _, s in a], [s for _, s in b], rtol=0, atol=1e-6)
    # A filtered keyword query of held shards goes through LanceDB, and keeps its filter.
    vector = np.full(DIM, DIM**-0.5, np.float32)
    query = _queries(1)[0]
    found = held.search(query, k=10, mode="text", vector=vector, where="doc_id < '5'")
    assert found.num_rows and all(d < "5" for d in found.column("doc_id").to_pylist())


def test_held_postings_follow_new_rows(tmp_path, scifact):
    # A serving group (refresh_s=0) holds both shards; rows committed later move a shard to a new
    # version: the group holds it again and builds its postings again in a thread, answering through
    # LanceDB meanwhile. Both ways answer as a group opened after the commit that never holds rows.
    docs = scifact_docs(400)
    db = _db(tmp_path / "db", docs[:300], 2)
    group = ShardGroup(db, refresh_s=0, memory_rows=10_000)
    first, _, _ = group._memory
    new = [{**d, "_id": f"new-{d['_id']}"} for d in docs[300:]]
    lancedb.connect(str(db)).open_table("shard_000").add(_rows(new, np.random.default_rng(1)))
    reference = Searcher(db)

    def top(searcher_group: ShardGroup, query: str) -> list[tuple[str, float]]:
        (part,) = searcher_group.search(None, [10], [None], [query]).answers
        return list(zip(part.text["chunk_id"].to_pylist(), part.text["score"].to_pylist(), strict=True))

    queries = [*_queries(10), docs[350]["text"][:200]]
    for query in queries:
        assert top(group, query) == top(reference.group, query), query
    assert group.wait_for_terms()
    _, memory, _ = group._memory
    assert memory is not first and memory.terms is not None
    assert memory.num_rows == 400
    for query in queries:
        assert top(group, query) == top(reference.group, query), query
    assert any(c.startswith("new-") for c, _ in top(group, queries[-1]))


def test_one_shard_scores_as_lancedb_does(dbs):
    # One shard: the generation's statistics are the shard's, so LanceDB's own BM25 is the reference.
    table = lancedb.connect(str(dbs[1])).open_table("shard_000")
    searcher = Searcher(dbs[1])
    for query in _queries(10):
        own = table.search(MultiMatchQuery(query, ["title", "text"]), query_type="fts")
        own = own.select(["chunk_id", "_score"]).limit(10).to_arrow()
        ours = dict(_top(searcher, query))
        for chunk_id, score in zip(own["chunk_id"].to_pylist(), own["_score"].to_pylist(), strict=True):
            if chunk_id in ours:
                assert ours[chunk_id] == pytest.approx(score, rel=1e-5)
        assert len(set(own["chunk_id"].to_pylist()) & set(ours)) >= 8


def test_statistics_follow_new_and_replaced_rows(tmp_path, scifact):
    """Rows added in several commits, indexed; then changed documents and new ones merged in (as an
    ingest commits them) and indexed again: each shard's LanceDB index scores with exactly the stored
    statistics (what the exact rescoring's bounds rest on; an index updated in place kept counting the
    replaced rows), and the answers equal a db built whole from the final rows."""
    docs = scifact_docs(600)
    db = tmp_path / "db"
    store.init_db(db, store.Manifest(shards=2, model="test", dim=DIM))
    conn = lancedb.connect(str(db))

    def put(batch: list[dict], merge: bool = False) -> None:
        rows = _rows(batch, np.random.default_rng(len(batch)))
        which = np.array([store.shard_of(d["_id"], 2) for d in batch])
        for s in range(2):
            table, mine = conn.open_table(store.shard_name(s)), rows.filter(pa.array(which == s))
            if merge:
                table.merge_insert(
                    "chunk_id"
                ).when_matched_update_all().when_not_matched_insert_all().execute(mine)
            else:
                table.add(mine)

    for part in range(3):
        put(docs[part * 150 : (part + 1) * 150])
    # Few rows replaced: LanceDB's optimize updates the index in place (it rewrites it when many are).
    index.build(db, settings=IndexSettings())
    changed = [{**d, "text": d["text"] + " Vitamin D and chronic disease risk."} for d in docs[:20]]
    put(changed + docs[450:], merge=True)
    index.build(db, settings=IndexSettings())
    tables = store.tables_of(store.location(db), store.read_manifest(db))
    query = "vitamin D chronic disease risk"
    for name in ("shard_000", "shard_001"):
        own = bm25.GenerationStats({name: bm25.read(tables, name)})
        hits = conn.open_table(name).search(MultiMatchQuery(query, ["title", "text"]), query_type="fts")
        for hit in hits.select(["title", "text", "_score"]).limit(20).to_arrow().to_pylist():
            score = hit.pop("_score")
            assert bm25.score_text(hit, query, own) == pytest.approx(score, rel=1e-5)
    whole = _db(tmp_path / "whole", changed + docs[20:], 2)
    for text in [*_queries(15), query]:
        a, b = _top(Searcher(db), text), _top(Searcher(whole), text)
        assert [c for c, _ in a] == [c for c, _ in b]
        np.testing.assert_allclose([s for _, s in a], [s for _, s in b], rtol=0, atol=1e-4)


GERMAN = [
    {"_id": "g1", "title": "", "text": "Das alte Haus steht am Rande der Stadt."},
    {"_id": "g2", "title": "", "text": "Der Garten blüht im Frühling."},
    {"_id": "g3", "title": "", "text": "Die Brücke über den Fluss ist neu."},
]
CHINESE = [
    {"_id": "c1", "title": "", "text": "我们研究机器学习的方法和应用。"},
    {"_id": "c2", "title": "", "text": "今天的天气很好，适合去公园散步。"},
    {"_id": "c3", "title": "", "text": "这本书讲述了古代历史的故事。"},
]


@pytest.mark.parametrize(
    ("docs", "query", "want", "text"),
    [
        (GERMAN, "Häuser", "g1", TextIndexSettings(language="German")),
        (CHINESE, "机器学习", "c1", TextIndexSettings(base_tokenizer="ngram", remove_stop_words=False)),
    ],
    ids=["german-stemming", "chinese-ngrams"],
)
def test_other_languages_need_their_setting(tmp_path, docs, query, want, text):
    default = Searcher(_db(tmp_path / "default", docs, 1))
    assert want not in [c.split("#")[0] for c, _ in _top(default, query)]
    tuned = Searcher(_db(tmp_path / "tuned", docs, 1, IndexSettings(text=text)))
    assert [c.split("#")[0] for c, _ in _top(tuned, query)][:1] == [want]
