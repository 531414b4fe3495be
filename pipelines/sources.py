"""Read a source into a stream of document rows.

Every reader yields rows with the same columns (DOC_SCHEMA). A document that cannot be read is not
dropped: it becomes a row whose ``error`` says why, so that the run report can account for it.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import ray.data
from ray.data.datasource import FileBasedDatasource

logger = logging.getLogger(__name__)

DOC_SCHEMA = pa.schema(
    [
        ("doc_id", pa.string()),
        ("title", pa.string()),
        ("text", pa.string()),
        ("source", pa.string()),
        ("content_hash", pa.string()),
        ("metadata", pa.string()),  # JSON object of the fields a record had beyond id/title/text
        ("error", pa.string()),  # null for a readable document, else the reason it failed
    ]
)

TEXT_SUFFIXES = {".txt", ".text", ".md", ".markdown", ".rst"}
HTML_SUFFIXES = {".html", ".htm"}
PDF_SUFFIXES = {".pdf"}
FILE_SUFFIXES = TEXT_SUFFIXES | HTML_SUFFIXES | PDF_SUFFIXES
_ID_KEYS = ("_id", "id", "doc_id")
_RESERVED_KEYS = {*_ID_KEYS, "title", "text"}


class SourceError(ValueError):
    """A source that cannot be read at all (as opposed to one bad document inside it)."""


def content_hash(title: str, text: str, metadata: str) -> str:
    """A digest of everything stored for a document; unchanged documents keep their hash."""
    digest = hashlib.sha256()
    for part in (title, text, metadata):
        digest.update(part.encode("utf-8", "surrogatepass"))
        digest.update(b"\x00")
    return digest.hexdigest()[:32]


def _doc(
    doc_id: str,
    *,
    source: str,
    title: str = "",
    text: str = "",
    metadata: dict[str, Any] | None = None,
    error: str | None = None,
) -> dict[str, Any]:
    meta = json.dumps(metadata or {}, sort_keys=True, ensure_ascii=False, default=str)
    return {
        "doc_id": doc_id,
        "title": title,
        "text": text,
        "source": source,
        "content_hash": "" if error else content_hash(title, text, meta),
        "metadata": meta,
        "error": error,
    }


# --- records (JSONL lines, Parquet rows) ---------------------------------------------------------


def record_to_doc(record: Any, *, source: str, where: str) -> dict[str, Any]:
    """Validate one JSON/Parquet record and turn it into a document row.

    Args:
        record: the parsed record.
        source: the file it came from.
        where: how to name the record in an error when it has no usable id (e.g. ``file:12``).
    """
    if not isinstance(record, dict):
        return _doc(where, source=source, error=f"record is a {type(record).__name__}, not an object")
    doc_id = next((record[k] for k in _ID_KEYS if record.get(k) not in (None, "")), None)
    if doc_id is None:
        return _doc(where, source=source, error="record has no '_id' or 'id'")
    doc_id = str(doc_id)
    title, text = record.get("title") or "", record.get("text")
    if not isinstance(title, str):
        title = str(title)
    if text is None:
        return _doc(doc_id, source=source, error="record has no 'text'")
    if not isinstance(text, str):
        return _doc(doc_id, source=source, error=f"'text' is a {type(text).__name__}, not a string")
    metadata = {k: v for k, v in record.items() if k not in _RESERVED_KEYS}
    if not (title.strip() or text.strip()):
        return _doc(doc_id, source=source, metadata=metadata, error="empty document")
    return _doc(doc_id, source=source, title=title, text=text, metadata=metadata)


class JsonlDatasource(FileBasedDatasource):
    """JSON Lines, streamed in blocks; a malformed line becomes a failed row naming its line."""

    _FILE_EXTENSIONS = ["jsonl", "ndjson", "json"]

    def __init__(self, paths: str | list[str], *, docs_per_block: int = 1000, **kwargs: Any):
        super().__init__(paths, **kwargs)
        self._docs_per_block = docs_per_block

    def _read_stream(self, f: pa.NativeFile, path: str) -> Iterator[pa.Table]:
        rows: list[dict[str, Any]] = []
        name = Path(path).name
        for line_no, line in enumerate(_lines(f), start=1):
            if not line.strip():
                continue
            where = f"{name}:{line_no}"
            try:
                record = json.loads(line)
            except (UnicodeDecodeError, ValueError) as exc:
                rows.append(_doc(where, source=path, error=f"line {line_no}: invalid JSON ({exc})"))
            else:
                rows.append(record_to_doc(record, source=path, where=where))
            if len(rows) >= self._docs_per_block:
                yield pa.Table.from_pylist(rows, schema=DOC_SCHEMA)
                rows = []
        if rows:
            yield pa.Table.from_pylist(rows, schema=DOC_SCHEMA)


def _lines(f: pa.NativeFile, chunk_bytes: int = 1 << 20) -> Iterator[bytes]:
    rest = b""
    while chunk := f.read(chunk_bytes):
        lines = (rest + chunk).split(b"\n")
        rest = lines.pop()
        yield from lines
    if rest:
        yield rest


def parquet_to_docs(batch: pa.Table, *, source: str) -> pa.Table:
    """Map a batch of Parquet rows (with _id/id, title, text, anything else) to document rows."""
    rows = [
        record_to_doc(record, source=source, where=f"{Path(source).name}:row") for record in batch.to_pylist()
    ]
    return pa.Table.from_pylist(rows, schema=DOC_SCHEMA)


# --- files in a directory ------------------------------------------------------------------------


def files_to_docs(batch: pa.Table, *, root: str, max_doc_mb: float) -> pa.Table:
    """Parse a batch of ``{path, bytes}`` rows from read_binary_files into document rows."""
    rows = []
    for path, data in zip(batch.column("path").to_pylist(), batch.column("bytes").to_pylist(), strict=True):
        doc_id = _relative(path, root)
        try:
            rows.append(_parse_file(path, doc_id, data, max_doc_mb=max_doc_mb))
        except Exception as exc:  # one bad file must never end the run
            rows.append(_doc(doc_id, source=path, error=f"{type(exc).__name__}: {exc}"))
    return pa.Table.from_pylist(rows, schema=DOC_SCHEMA)


def _relative(path: str, root: str) -> str:
    rel = Path(path).relative_to(root) if Path(path).is_relative_to(root) else Path(path)
    return rel.as_posix() if rel.parts else Path(path).name


def _parse_file(path: str, doc_id: str, data: bytes, *, max_doc_mb: float) -> dict[str, Any]:
    suffix = Path(path).suffix.lower()
    if suffix not in FILE_SUFFIXES:
        supported = ", ".join(sorted(FILE_SUFFIXES))
        return _doc(doc_id, source=path, error=f"unsupported extension {suffix!r} ({supported})")
    if len(data) > max_doc_mb * 1e6:
        return _doc(
            doc_id,
            source=path,
            error=f"file is {len(data) / 1e6:.1f} MB, over max_doc_mb={max_doc_mb}",
        )
    if not data.strip():
        return _doc(doc_id, source=path, error="empty file")
    if suffix in PDF_SUFFIXES:
        title, text = _pdf_text(data)
    else:
        if b"\x00" in data[:8192]:
            return _doc(doc_id, source=path, error="binary content in a text file (NUL bytes)")
        try:
            raw = data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            return _doc(doc_id, source=path, error=f"not valid UTF-8 at byte {exc.start}")
        title, text = _html_text(raw) if suffix in HTML_SUFFIXES else (_text_title(raw), raw)
    if not text.strip():
        return _doc(doc_id, source=path, error="no extractable text")
    return _doc(doc_id, source=path, title=title or Path(path).stem, text=text)


_MD_HEADING = re.compile(r"^\s{0,3}#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)
_RST_HEADING = re.compile(r"^(\S.*)\n([=\-~^\"'`#*+])\2{2,}\s*$", re.MULTILINE)


def _text_title(text: str) -> str:
    head = text[:4000]
    match = _MD_HEADING.search(head) or _RST_HEADING.search(head)
    return match.group(1).strip() if match else ""


def _html_text(raw: str) -> tuple[str, str]:
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(raw, "html.parser")
    for tag in soup(["script", "style", "noscript", "template", "svg"]):
        tag.decompose()
    title = soup.title.get_text(" ", strip=True) if soup.title else ""
    if soup.title:
        soup.title.decompose()
    # Headings become markdown headings so that the chunker can split at them.
    for level in range(1, 7):
        for heading in soup.find_all(f"h{level}"):
            heading.insert_before(f"\n\n{'#' * level} ")
            heading.insert_after("\n\n")
    for block in soup.find_all(["p", "div", "li", "tr", "br", "pre", "blockquote", "section"]):
        block.insert_after("\n")
    text = re.sub(r"\n\s*\n\s*(\n\s*)+", "\n\n", soup.get_text())
    text = re.sub(r"[ \t]+", " ", text).strip()
    return title, text


def _pdf_text(data: bytes) -> tuple[str, str]:
    from pypdf import PdfReader

    reader = PdfReader(io.BytesIO(data))
    pages = [page.extract_text() or "" for page in reader.pages]
    title = ""
    if reader.metadata is not None and reader.metadata.title:
        title = str(reader.metadata.title)
    return title, "\n\n".join(p.strip() for p in pages if p.strip())


# --- dispatch ------------------------------------------------------------------------------------


def read_source(
    source: str | Path, *, docs_per_block: int = 1000, max_doc_mb: float = 64
) -> ray.data.Dataset:
    """Open a source as a Ray Dataset of document rows (DOC_SCHEMA), streamed, never collected.

    Args:
        source: a directory of files, a ``.jsonl`` file, or a ``.parquet`` file/directory.
        docs_per_block: rows per block for JSONL.
        max_doc_mb: larger files are failed rather than parsed.

    Returns:
        A lazy Dataset.
    """
    path = Path(source).expanduser().resolve()
    if not path.exists():
        raise SourceError(f"Source {str(source)!r} does not exist.")
    suffix = path.suffix.lower()
    if path.is_file() and suffix in {".jsonl", ".ndjson"}:
        return ray.data.read_datasource(JsonlDatasource(str(path), docs_per_block=docs_per_block))
    if suffix == ".parquet" or (path.is_dir() and _all_parquet(path)):
        ds = ray.data.read_parquet(str(path))
        return ds.map_batches(parquet_to_docs, batch_format="pyarrow", fn_kwargs={"source": str(path)})
    if path.is_dir():
        if not any(p.is_file() and not p.name.startswith((".", "_")) for p in path.rglob("*")):
            raise SourceError(f"Source directory {str(source)!r} has no files.")
        ds = ray.data.read_binary_files(str(path), include_paths=True)
        return ds.map_batches(
            files_to_docs,
            batch_format="pyarrow",
            batch_size=16,
            fn_kwargs={"root": str(path), "max_doc_mb": max_doc_mb},
        )
    if path.is_file() and suffix in FILE_SUFFIXES:
        ds = ray.data.read_binary_files(str(path), include_paths=True)
        return ds.map_batches(
            files_to_docs,
            batch_format="pyarrow",
            fn_kwargs={"root": str(path.parent), "max_doc_mb": max_doc_mb},
        )
    raise SourceError(
        f"Unsupported source {str(source)!r}. Supported: a directory of "
        f"{', '.join(sorted(FILE_SUFFIXES))} files, a .jsonl file, or a .parquet file."
    )


def _all_parquet(path: Path) -> bool:
    files = (p for p in path.rglob("*") if p.is_file() and not p.name.startswith((".", "_")))
    first = next(files, None)
    return first is not None and all(p.suffix.lower() == ".parquet" for p in (first, *files))


def write_pydoc_topics(out_dir: str | Path) -> int:
    """Write the Python reference topics that ship with the standard library as .rst files.

    A real corpus (79 documents, ~465k characters) that needs no download, for the demo.

    Returns:
        How many files were written.
    """
    from pydoc_data.topics import topics

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, text in topics.items():
        (out / f"{name}.rst").write_text(text, encoding="utf-8")
    return len(topics)
