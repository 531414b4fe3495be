"""Search filters: what the checked subset accepts, how it is written for LanceDB, and what it refuses."""

import lancedb
import pyarrow as pa
import pytest

from pipelines.filters import DEFAULT_COLUMNS, FilterError, allowed_columns, compile_filter


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    rows = {
        "chunk_id": ["a#0", "b#0", "c#1"],
        "doc_id": ["a", "b", "o'k"],
        "chunk_index": [0, 0, 1],
        "title": ["Hello", "world", None],
        "text": ["x", "y", "z"],
        "source": ["/home/alice/a.txt", "/srv/b.txt", "/srv/c.txt"],
        "vector": pa.array([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7]], pa.list_(pa.float32(), 2)),
    }
    return lancedb.connect(tmp_path_factory.mktemp("filters")).create_table("t", pa.table(rows))


@pytest.mark.parametrize(
    ("text", "ids"),
    [
        ("doc_id = 'a'", {"a"}),
        ("doc_id IN ('a', 'o''k')", {"a", "o'k"}),
        ("chunk_index BETWEEN 1 AND 2", {"o'k"}),
        ("title ILIKE 'hel%' OR doc_id <> 'a' AND chunk_index = 0", {"a", "b"}),
        ("title IS NOT NULL AND NOT chunk_index >= 1", {"a", "b"}),
        ("1 <= chunk_index", {"o'k"}),
        ("chunk_index = -1", set()),
        ("(title IS NULL)", {"o'k"}),
    ],
)
def test_allowed_filters_select_the_same_rows_in_lancedb(table, text, ids):
    where = compile_filter(text)
    hits = table.search([1.0, 0.0]).where(where, prefilter=True).to_arrow()
    assert set(hits["doc_id"].to_pylist()) == ids


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("source LIKE '/home/alice%'", "'source' is not a filterable column"),
        ("metadata LIKE '%secret%'", "'metadata' is not a filterable column"),
        ("vector[1] > 0.5", "subscript"),
        ("regexp_like(text, 'a')", "REGEXP_LIKE() is not allowed"),
        ("length(text) > 0", "LENGTH() is not allowed"),
        ("CAST(doc_id AS INT) = 1", "not allowed"),
        ("doc_id = 'a'; DROP TABLE t", "one predicate"),
        ("doc_id IN (SELECT doc_id FROM t)", "subquery"),
        ("doc_id = title", "not a column"),
        ('doc_id = "a"', "single quotes"),
        ("doc_id = 1", "holds text"),
        ("chunk_index LIKE '1%'", "needs a text column"),
        ("chunk_index + 1 > 2", "not allowed"),
        ("chunk_index > 1e999", "finite"),
        ("title LIKE 'a!%' ESCAPE '!'", "ESCAPE is not allowed"),
        ("t.doc_id = 'a'", "qualified"),
        ("doc_id =", "cannot parse"),
        ("TRUE", "not allowed"),
        ("doc_id = 'a\x00'", "NUL"),
        ("(" * 3000 + "doc_id = 'a'" + ")" * 3000, "invalid filter"),
        (" OR ".join(f"doc_id = '{i}'" for i in range(200)), "over the limit"),
    ],
)
def test_refused_filters_say_what_is_not_allowed(text, needle):
    with pytest.raises(FilterError, match="invalid filter") as error:
        compile_filter(text)
    assert needle in str(error.value)
    assert "vector" not in str(error.value) or "vector" in text  # no schema in the message


def test_the_client_text_never_reaches_lancedb():
    # Comments and odd spacing vanish: the predicate is written from the parse tree.
    assert compile_filter("doc_id='a' -- ; DROP TABLE t") == "(`doc_id` = 'a')"
    assert compile_filter("title = 'x'' OR 1=1 --'") == "(`title` = 'x'' OR 1=1 --')"


def test_a_config_adds_columns_and_refuses_unknown_ones(table):
    assert "source" in allowed_columns(["source"]) and "source" not in DEFAULT_COLUMNS
    where = compile_filter("source LIKE '/srv/%'", columns=allowed_columns(["source"]))
    hits = table.search([1.0, 0.0]).where(where, prefilter=True).to_arrow()
    assert set(hits["doc_id"].to_pylist()) == {"b", "o'k"}  # the rows under /srv, not alice's
    with pytest.raises(FilterError):  # and without the config, the column is refused
        compile_filter("source LIKE '/srv/%'")
    with pytest.raises(ValueError, match="vector"):
        allowed_columns(["vector"])
