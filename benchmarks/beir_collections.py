"""Build retrieval test collections in BEIR layout from data that ships inside a PyPI package.

python benchmarks/beir_collections.py OUT_DIR [--sdist PATH] [--only NAME ...] [--rare-terms BEIR_DIR]

Writes OUT_DIR/<name>/corpus.jsonl ({"_id", "title", "text"}), queries.jsonl ({"_id", "text"}) and
qrels/test.tsv ("query-id\\tcorpus-id\\tscore"), and prints for each collection its documents, queries and
judged pairs.

Source: the source distribution of ``ir-axioms==1.2.5`` (Webis; MIT code, but its README exempts the
``data/`` folder from that license). Its ``data/`` folder holds TREC RAG 2024 material built on the
MS MARCO v2.1 segmented corpus (MS MARCO terms: non-commercial research use):

- ``data/crowd/study1_retrieval.jsonl.gz``: the 301 RAG 2024 test topics, each with the id and full text of
  20 retrieved segments (6,011 distinct segments). These segments are the corpus.
- ``data/topics.rag24.test.txt``: the topic texts (``id<TAB>text``).
- ``data/2024-retrieval-qrels.txt``: NIST's relevance judgments (TREC qrels, grades 0-3).
- ``data/qrels.rag24.test-umbrela-all.txt``: UMBRELA's LLM judgments of all 301 topics (grades 0-3).

The wheel of ir-axioms lacks the qrels files, so the sdist is needed. Unless ``--sdist`` names a tarball
already on disk, the script runs ``pip download --no-deps --no-binary :all: ir-axioms==1.2.5`` into a
temporary directory (PyPI only; pip builds the package's metadata, which pulls setuptools and
setuptools-scm into an isolated build environment). Nothing is installed and nothing is unpacked to
disk: the files are read straight from the tarball.

Collections (both share the corpus):

- ``trec-rag24-nist``: NIST judgments, topics with at least one relevant segment in the corpus.
- ``trec-rag24-umbrela``: UMBRELA judgments, likewise.

Judgments are kept only for segments in the corpus, with grade 0 pairs included (readers such as
``pipelines.evaluate.load_beir`` treat score > 0 as relevant). The corpus is a pool (top 20 of one
retrieval run per topic), so a segment from another topic's pool counts as not relevant: the task is
closer to re-ranking a small pooled corpus than to searching all of MS MARCO.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import io
import json
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

SDIST_SPEC = "ir-axioms==1.2.5"
POOL_FILE = "data/crowd/study1_retrieval.jsonl.gz"
TOPICS_FILE = "data/topics.rag24.test.txt"
QRELS_FILES = {
    "trec-rag24-nist": "data/2024-retrieval-qrels.txt",
    "trec-rag24-umbrela": "data/qrels.rag24.test-umbrela-all.txt",
}

Qrels = dict[str, dict[str, int]]


@dataclass(frozen=True)
class Collection:
    """A test collection: ``corpus`` and ``queries`` map ids to text, ``qrels`` query -> doc -> grade."""

    name: str
    corpus: dict[str, str]
    queries: dict[str, str]
    qrels: Qrels


@dataclass(frozen=True)
class Stats:
    docs: int
    queries: int
    judged: int
    relevant: int


def read_sdist(path: Path, inner_paths: Iterable[str]) -> dict[str, str]:
    """The text of files in a source distribution, by their path inside the project (``data/...``).

    ``.gz`` files are decompressed. Members are read from the tarball, never extracted.
    """
    texts: dict[str, str] = {}
    with tarfile.open(path, mode="r:gz") as tar:
        members = {m.name.split("/", 1)[1]: m for m in tar.getmembers() if m.isfile() and "/" in m.name}
        for inner_path in inner_paths:
            member = members.get(inner_path)
            handle = tar.extractfile(member) if member is not None else None
            if handle is None:
                raise FileNotFoundError(f"{inner_path} is not in {path.name}")
            with handle:
                data = handle.read()
            if inner_path.endswith(".gz"):
                data = gzip.decompress(data)
            texts[inner_path] = data.decode("utf-8")
    return texts


def download_sdist(spec: str, dest: Path) -> Path:
    """``pip download`` the sdist of ``spec`` into ``dest`` and return the tarball's path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q"]
    subprocess.run([*cmd, "-d", str(dest), spec], check=True)
    tarballs = sorted(dest.glob("*.tar.gz"))
    if len(tarballs) != 1:
        raise RuntimeError(f"expected one sdist in {dest}, found {[p.name for p in tarballs]}")
    return tarballs[0]


def parse_pool(text: str) -> tuple[dict[str, str], dict[str, str]]:
    """Segments ``{doc_id: text}`` and topics ``{qid: text}`` from the retrieval study's JSON lines."""
    corpus: dict[str, str] = {}
    queries: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        queries[str(record["topic"])] = record["query"]
        for doc_id, doc_text in zip(record["references_ids"], record["references_texts"], strict=True):
            corpus[str(doc_id)] = doc_text
    return corpus, queries


def parse_topics(text: str) -> dict[str, str]:
    """Topics from ``id<TAB>text`` lines."""
    topics: dict[str, str] = {}
    for line in text.splitlines():
        qid, sep, query = line.partition("\t")
        if sep and query.strip():
            topics[qid.strip()] = query.strip()
    return topics


def parse_trec_qrels(text: str) -> Qrels:
    """TREC qrels (``qid iter docid grade``) as ``{qid: {docid: grade}}``; a repeated pair keeps the last."""
    qrels: Qrels = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 4:
            qrels.setdefault(parts[0], {})[parts[2]] = int(parts[3])
    return qrels


def restrict(qrels: Qrels, corpus: dict[str, str]) -> Qrels:
    """Judgments of corpus documents, for the queries that keep at least one relevant (grade > 0) one."""
    kept: Qrels = {}
    for qid, judged in qrels.items():
        in_corpus = {doc_id: grade for doc_id, grade in judged.items() if doc_id in corpus}
        if any(grade > 0 for grade in in_corpus.values()):
            kept[qid] = in_corpus
    return kept


def build_collections(files: dict[str, str], names: Iterable[str]) -> Iterator[Collection]:
    """The named collections from the sdist's files (``read_sdist`` output)."""
    corpus, pool_queries = parse_pool(files[POOL_FILE])
    topics = {**pool_queries, **parse_topics(files[TOPICS_FILE])}
    for name in names:
        qrels = restrict(parse_trec_qrels(files[QRELS_FILES[name]]), corpus)
        missing = sorted(set(qrels) - set(topics))
        if missing:
            raise ValueError(f"{name}: {len(missing)} judged topics have no text, e.g. {missing[0]}")
        queries = {qid: topics[qid] for qid in sorted(qrels)}
        yield Collection(name=name, corpus=corpus, queries=queries, qrels=qrels)


def write_jsonl(path: Path, records: Iterable[dict[str, str]]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def write_beir(collection: Collection, out_dir: Path) -> Stats:
    """Write ``collection`` in BEIR layout under ``out_dir`` and return its counts."""
    (out_dir / "qrels").mkdir(parents=True, exist_ok=True)
    write_jsonl(
        out_dir / "corpus.jsonl",
        ({"_id": doc_id, "title": "", "text": text} for doc_id, text in sorted(collection.corpus.items())),
    )
    write_jsonl(
        out_dir / "queries.jsonl",
        ({"_id": qid, "text": text} for qid, text in collection.queries.items()),
    )
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter="\t", lineterminator="\n")
    writer.writerow(["query-id", "corpus-id", "score"])
    for qid in sorted(collection.qrels):
        for doc_id, grade in sorted(collection.qrels[qid].items()):
            writer.writerow([qid, doc_id, grade])
    (out_dir / "qrels" / "test.tsv").write_text(buffer.getvalue(), encoding="utf-8")
    grades = [grade for judged in collection.qrels.values() for grade in judged.values()]
    return Stats(
        docs=len(collection.corpus),
        queries=len(collection.queries),
        judged=len(grades),
        relevant=sum(grade > 0 for grade in grades),
    )


def build_all(out_dir: Path, sdist: Path | None, names: list[str]) -> dict[str, Stats]:
    with tempfile.TemporaryDirectory(prefix="collections-") as tmp:
        path = sdist if sdist is not None else download_sdist(SDIST_SPEC, Path(tmp))
        files = read_sdist(path, [POOL_FILE, TOPICS_FILE, *(QRELS_FILES[name] for name in names)])
    return {c.name: write_beir(c, out_dir / c.name) for c in build_collections(files, names)}


def rare_terms(beir_dir: Path, *, queries: int = 300, terms: int = 3, seed: int = 0) -> Collection:
    """A known-item collection where keywords win: ``beir_dir``'s corpus, and per sampled document a query
    of its ``terms`` rarest words (letters only, 5 or more, in the fewest documents of the corpus), which
    judges that document alone relevant. Synthetic: it checks that hybrid fusion does not lose what BM25
    finds when the dense ranking is weak, as SciFact and the TREC pools (where vectors are strong) cannot."""
    import random
    import re

    word = re.compile(r"[^\W\d_]{5,}")
    corpus, titles = {}, {}
    with (beir_dir / "corpus.jsonl").open(encoding="utf-8") as f:
        for line in f:
            doc = json.loads(line)
            corpus[doc["_id"]], titles[doc["_id"]] = doc.get("text", ""), doc.get("title", "")
    words = {doc_id: set(word.findall(f"{titles[doc_id]} {text}".lower())) for doc_id, text in corpus.items()}
    df: dict[str, int] = {}
    for found in words.values():
        for w in found:
            df[w] = df.get(w, 0) + 1
    chosen = random.Random(seed).sample(sorted(d for d in corpus if len(words[d]) >= terms), queries)
    qrels = {f"q{i}": {doc_id: 1} for i, doc_id in enumerate(chosen)}
    texts = {
        f"q{i}": " ".join(sorted(words[d], key=lambda w: (df[w], w))[:terms]) for i, d in enumerate(chosen)
    }
    full = {doc_id: f"{titles[doc_id]}\n{text}".strip() for doc_id, text in corpus.items()}
    return Collection(f"{beir_dir.name}-rare-terms", full, texts, qrels)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path, help="each collection goes to OUT_DIR/<name>/")
    parser.add_argument(
        "--sdist", type=Path, help=f"an already downloaded sdist of {SDIST_SPEC} (default: pip download it)"
    )
    parser.add_argument(
        "--only",
        nargs="+",
        choices=sorted(QRELS_FILES),
        default=sorted(QRELS_FILES),
        metavar="NAME",
        help=f"collections to build (default: all of {', '.join(sorted(QRELS_FILES))})",
    )
    parser.add_argument(
        "--rare-terms",
        type=Path,
        metavar="BEIR_DIR",
        help="also build BEIR_DIR's rare-terms collection (see rare_terms), e.g. ../shared/datasets/scifact",
    )
    args = parser.parse_args(argv)
    built = build_all(args.out_dir, args.sdist, args.only)
    if args.rare_terms is not None:
        collection = rare_terms(args.rare_terms)
        built[collection.name] = write_beir(collection, args.out_dir / collection.name)
    for name, stats in built.items():
        print(
            f"{name}: {stats.docs} docs, {stats.queries} queries, {stats.judged} judged pairs "
            f"({stats.relevant} relevant) -> {args.out_dir / name}"
        )


if __name__ == "__main__":
    main()
