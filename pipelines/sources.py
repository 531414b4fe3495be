"""Read a source into a stream of document rows.

Every reader yields rows with the same columns (DOC_SCHEMA). A document that cannot be read is not
dropped: it becomes a row whose ``error`` says why, so that the run report can account for it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pyarrow as pa
import pyarrow.fs as pafs
import ray.data
from ray.data.datasource import FileBasedDatasource

from pipelines.parsing import FILE_SUFFIXES, ParseError, ParseLimits, parse
from pipelines.store.location import Location, error_reason, is_uri, location

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


def record_to_doc(record: Any, *, source: str, where: str, max_chars: float | None = None) -> dict[str, Any]:
    """Validate one JSON/Parquet record and turn it into a document row.

    Args:
        record: the parsed record.
        source: the file it came from.
        where: how to name the record in an error when it has no usable id (e.g. ``file:12``).
        max_chars: longer texts are failed rather than chunked.
    """
    if not isinstance(record, dict):
        return _doc(where, source=source, error=f"record is a {type(record).__name__}, not an object")
    doc_id = next((record[k] for k in _ID_KEYS if record.get(k) not in (None, "")), None)
    if doc_id is None:
        return _doc(where, source=source, error="record has no '_id' or 'id'")
    if isinstance(doc_id, dict | list | bool):
        return _doc(where, source=source, error=f"'_id' is a {type(doc_id).__name__}, not a string or number")
    doc_id = str(doc_id)
    if not _is_unicode(doc_id):
        return _doc(where, source=source, error="'_id' is not valid Unicode (an unpaired surrogate)")
    title, text = record.get("title") or "", record.get("text")
    if not isinstance(title, str):
        title = str(title)
    if text is None:
        return _doc(doc_id, source=source, error="record has no 'text'")
    if not isinstance(text, str):
        return _doc(doc_id, source=source, error=f"'text' is a {type(text).__name__}, not a string")
    if max_chars is not None and len(text) > max_chars:
        return _doc(doc_id, source=source, error=f"'text' has {len(text):,} characters, over the size limit")
    metadata = {k: v for k, v in record.items() if k not in _RESERVED_KEYS}
    if not (title.strip() or text.strip()):
        return _doc(doc_id, source=source, error="empty document")
    row = _doc(doc_id, source=source, title=title, text=text, metadata=metadata)
    if not all(_is_unicode(row[key]) for key in ("title", "text", "metadata")):
        reason = "not valid Unicode: an unpaired surrogate in title, text or metadata"
        return _doc(doc_id, source=source, error=reason)
    return row


def _is_unicode(text: str) -> bool:
    # JSON escapes can spell lone surrogates ("\ud800"), which Arrow cannot store as UTF-8.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _mb(n_bytes: float) -> str:
    return f"{n_bytes / 1e6:.3g} MB"


class JsonlDatasource(FileBasedDatasource):
    """JSON Lines, streamed in blocks; a malformed line becomes a failed row naming its line."""

    _FILE_EXTENSIONS = ["jsonl", "ndjson", "json"]

    def __init__(
        self,
        paths: str | list[str],
        *,
        docs_per_block: int = 1000,
        max_doc_mb: float = 64,
        scheme: str = "",
        **kwargs: Any,
    ):
        super().__init__(paths, **kwargs)
        self._docs_per_block = docs_per_block
        self._max_doc_mb = max_doc_mb
        self._scheme = scheme  # "s3://" when reading an object store, whose paths come without it

    def _read_stream(self, f: pa.NativeFile, path: str) -> Iterator[pa.Table]:
        yield from _jsonl_blocks(
            f, self._scheme + path, docs_per_block=self._docs_per_block, max_doc_mb=self._max_doc_mb
        )


def _jsonl_blocks(f: Any, path: str, *, docs_per_block: int, max_doc_mb: float) -> Iterator[pa.Table]:
    rows: list[dict[str, Any]] = []
    name = Path(path).name
    limit = int(max_doc_mb * 1e6)
    for line_no, line in enumerate(_lines(f, limit=limit), start=1):
        where = f"{name}:{line_no}"
        if isinstance(line, int) or len(line) > limit:
            size = line if isinstance(line, int) else len(line)
            error = f"line {line_no}: record is {_mb(size)}, over max_doc_mb={max_doc_mb}"
            rows.append(_doc(where, source=path, error=error))
        elif not line.strip():
            continue
        else:
            rows.append(_line_to_doc(line, line_no, source=path, where=where))
        if len(rows) >= docs_per_block:
            yield pa.Table.from_pylist(rows, schema=DOC_SCHEMA)
            rows = []
    if rows:
        yield pa.Table.from_pylist(rows, schema=DOC_SCHEMA)


def _line_to_doc(line: bytes, line_no: int, *, source: str, where: str) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError; deep nesting recurses
        return _doc(where, source=source, error=f"line {line_no}: invalid JSON ({str(exc)[:200]})")
    try:
        return record_to_doc(record, source=source, where=where)
    except Exception as exc:  # one odd record must never end the run
        return _doc(where, source=source, error=f"line {line_no}: {type(exc).__name__}: {str(exc)[:200]}")


def _lines(f: pa.NativeFile, *, limit: int, chunk_bytes: int = 1 << 20) -> Iterator[bytes | int]:
    """The lines of a file; a line longer than ``limit`` comes as its length only, never held whole."""
    rest, skipped = b"", 0
    while chunk := f.read(chunk_bytes):
        lines = (rest + chunk).split(b"\n")
        rest = lines.pop()
        for line in lines:
            yield skipped + len(line) if skipped else line
            skipped = 0
        if len(rest) > limit:
            skipped, rest = skipped + len(rest), b""
    if skipped or rest:
        yield skipped + len(rest) if skipped else rest


def parquet_to_docs(batch: pa.Table, *, source: str, max_doc_mb: float = 64) -> pa.Table:
    """Map a batch of Parquet rows (with _id/id, title, text, anything else) to document rows."""
    where = f"{Path(source).name}:row"
    rows = [
        record_to_doc(record, source=source, where=where, max_chars=max_doc_mb * 1e6)
        for record in batch.to_pylist()
    ]
    return pa.Table.from_pylist(rows, schema=DOC_SCHEMA)


# --- files in a directory ------------------------------------------------------------------------


def list_files(root: Path, *, max_doc_mb: float) -> list[dict[str, str | None]]:
    """Every file under ``root`` as ``{path, error}``, where error says why it cannot be a document.

    Hidden files and folders (a name starting with ".") are left out. Everything else comes out:
    special files, broken links, names that are not UTF-8 and files over max_doc_mb with a reason,
    found here without reading them.
    """
    items: list[dict[str, str | None]] = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        links = [d for d in dirs if os.path.islink(os.path.join(folder, d))]
        dirs[:] = [d for d in dirs if d not in links]
        for name in sorted(files) + links:
            if name.startswith("."):
                continue
            path = os.path.join(folder, name)
            shown = path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
            error = "file name is not valid UTF-8" if shown != path else _unreadable(path, max_doc_mb)
            items.append({"path": shown, "error": error})
    return items


def _unreadable(path: str, max_doc_mb: float) -> str | None:
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return "broken symbolic link" if os.path.islink(path) else "file vanished while listing"
    except OSError as exc:
        return f"cannot stat: {exc.strerror}"
    if stat.S_ISDIR(info.st_mode):
        return "symbolic link to a folder (not followed)"
    if not stat.S_ISREG(info.st_mode):
        return "not a regular file (a FIFO, socket or device)"
    if info.st_size > max_doc_mb * 1e6:
        return f"file is {_mb(info.st_size)}, over max_doc_mb={max_doc_mb}"
    return None


def files_to_docs(
    batch: pa.Table,
    *,
    root: str,
    max_doc_mb: float,
    filesystem: Any = None,
    parse_limits: ParseLimits | None = None,
) -> pa.Table:
    """Read and parse a batch of ``{path, error}`` rows (see list_files) into document rows.

    With a ``pyarrow.fs`` ``filesystem`` the paths are URIs (``s3://bucket/key``) read through it.
    ``parse_limits`` bounds the time and memory of parsing one HTML or PDF file (pipelines/parsing.py).
    """
    rows = []
    for path, error in zip(batch.column("path").to_pylist(), batch.column("error").to_pylist(), strict=True):
        doc_id = _relative(path, root)
        try:
            if error:
                rows.append(_doc(doc_id, source=path, error=error))
                continue
            data = b""
            if Path(path).suffix.lower() in FILE_SUFFIXES:
                limit = int(max_doc_mb * 1e6) + 1  # at most one byte past the limit, whatever the size
                if filesystem is not None:
                    with filesystem.open_input_stream(path.split("://", 1)[1]) as f:
                        data = f.read(limit)
                else:
                    with open(path, "rb") as f:
                        data = f.read(limit)
            rows.append(_parse_file(path, doc_id, data, max_doc_mb=max_doc_mb, limits=parse_limits))
        except Exception as exc:  # one bad file must never end the run
            rows.append(_doc(doc_id, source=path, error=f"{type(exc).__name__}: {exc}"))
    return pa.Table.from_pylist(rows, schema=DOC_SCHEMA)


def _relative(path: str, root: str) -> str:
    rel = Path(path).relative_to(root) if Path(path).is_relative_to(root) else Path(path)
    return rel.as_posix() if rel.parts else Path(path).name


def _parse_file(
    path: str, doc_id: str, data: bytes, *, max_doc_mb: float, limits: ParseLimits | None
) -> dict[str, Any]:
    suffix = Path(path).suffix.lower()
    if suffix not in FILE_SUFFIXES:
        supported = ", ".join(sorted(FILE_SUFFIXES))
        return _doc(doc_id, source=path, error=f"unsupported extension {suffix!r} ({supported})")
    if len(data) > max_doc_mb * 1e6:
        size = _mb(os.path.getsize(path)) if os.path.exists(path) else f"over {_mb(max_doc_mb * 1e6)}"
        return _doc(doc_id, source=path, error=f"file is {size}, over max_doc_mb={max_doc_mb}")
    if not data.strip():
        return _doc(doc_id, source=path, error="empty file")
    try:
        title, text = parse(suffix, data, limits)
    except ParseError as exc:
        return _doc(doc_id, source=path, error=str(exc))
    if not text.strip():
        return _doc(doc_id, source=path, error="no extractable text")
    return _doc(doc_id, source=path, title=title or Path(path).stem, text=text)


# --- dispatch ------------------------------------------------------------------------------------


def resolve(source: str | Path, storage: Any = None) -> str:
    """The source as the run records it: an absolute local path, or a normalized URI."""
    if "://" in str(source):  # an object store's URI (another scheme is refused, file:// is a path)
        return location(source, storage).uri
    return str(Path(source).expanduser().resolve())


def check_exists(source: str, storage: Any = None) -> None:
    """Raise SourceError when ``source`` (as ``resolve`` gives it) names nothing, before a run writes."""
    if is_uri(source):
        fs, path = location(source, storage).filesystem()
        try:
            missing = fs.get_file_info(path).type == pafs.FileType.NotFound
        except (OSError, pa.ArrowException) as exc:
            raise SourceError(f"Cannot read source {source}: {error_reason(exc, source)}") from exc
    else:
        missing = not Path(source).exists()
    if missing:
        raise SourceError(f"Source {source!r} does not exist.")


def read_source(
    source: str | Path,
    *,
    docs_per_block: int = 1000,
    max_doc_mb: float = 64,
    storage: Any = None,
    parse_limits: ParseLimits | None = None,
) -> ray.data.Dataset:
    """Open a source as a Ray Dataset of document rows (DOC_SCHEMA), streamed, never collected.

    Args:
        source: a directory of files, a ``.jsonl`` file, or a ``.parquet`` file/directory; local, or
            an object-store URI (``s3://bucket/docs/``, ``s3://bucket/corpus.jsonl``).
        docs_per_block: rows per block for JSONL.
        max_doc_mb: larger files are failed rather than parsed.
        storage: the config's ``storage:`` section, for a URI.
        parse_limits: the deadline and memory bound of parsing one HTML or PDF file.

    Returns:
        A lazy Dataset.
    """
    if is_uri(str(source)):
        return _read_remote(
            location(source, storage),
            docs_per_block=docs_per_block,
            max_doc_mb=max_doc_mb,
            parse_limits=parse_limits,
        )
    path = Path(source).expanduser().resolve()
    if not path.exists():
        raise SourceError(f"Source {str(source)!r} does not exist.")
    suffix = path.suffix.lower()
    if path.is_file() and suffix in {".jsonl", ".ndjson"}:
        return ray.data.read_datasource(
            JsonlDatasource(str(path), docs_per_block=docs_per_block, max_doc_mb=max_doc_mb)
        )
    if suffix == ".parquet" or (path.is_dir() and _all_parquet(path)):
        files = [path] if path.is_file() else sorted(_visible_files(path))
        return _read_parquet([str(f) for f in files], source=str(path), max_doc_mb=max_doc_mb)
    if path.is_dir() or suffix in FILE_SUFFIXES:
        # Listed here rather than by read_binary_files, which skips what it cannot open and stops the
        # whole run at a file name that is not UTF-8; the files are read in the tasks.
        if path.is_dir():
            root, items = path, list_files(path, max_doc_mb=max_doc_mb)
        else:
            root, items = path.parent, [{"path": str(path), "error": _unreadable(str(path), max_doc_mb)}]
        if not items:
            raise SourceError(f"Source directory {str(source)!r} has no files.")
        return ray.data.from_items(items).map_batches(
            files_to_docs,
            batch_format="pyarrow",
            batch_size=16,
            fn_kwargs={"root": str(root), "max_doc_mb": max_doc_mb, "parse_limits": parse_limits},
        )
    raise SourceError(
        f"Unsupported source {str(source)!r}. Supported: a directory of "
        f"{', '.join(sorted(FILE_SUFFIXES))} files, a .jsonl file, or a .parquet file."
    )


def iter_docs(
    source: str | Path,
    *,
    docs_per_batch: int = 1000,
    max_doc_mb: float = 64,
    storage: Any = None,
    parse_limits: ParseLimits | None = None,
) -> Iterator[pa.Table]:
    """The documents of ``source`` (DOC_SCHEMA rows, failed ones included), read in this process,
    one batch at a time: the same rows ``read_source`` gives, without Ray (see ingest's quick check).
    """
    if is_uri(str(source)):
        yield from _iter_remote(
            location(source, storage),
            docs_per_batch=docs_per_batch,
            max_doc_mb=max_doc_mb,
            parse_limits=parse_limits,
        )
        return
    path = Path(source).expanduser().resolve()
    if not path.exists():
        raise SourceError(f"Source {str(source)!r} does not exist.")
    suffix = path.suffix.lower()
    if path.is_file() and suffix in {".jsonl", ".ndjson"}:
        with path.open("rb") as f:
            yield from _jsonl_blocks(f, str(path), docs_per_block=docs_per_batch, max_doc_mb=max_doc_mb)
    elif suffix == ".parquet" or (path.is_dir() and _all_parquet(path)):
        import pyarrow.parquet as pq

        for file in [path] if path.is_file() else sorted(_visible_files(path)):
            try:
                batches = pq.ParquetFile(file).iter_batches(batch_size=docs_per_batch)
                for batch in batches:
                    yield parquet_to_docs(
                        pa.Table.from_batches([batch]), source=str(path), max_doc_mb=max_doc_mb
                    )
            except Exception as exc:  # as _read_parquet: a broken file is one failed row
                reason = f"unreadable Parquet file: {type(exc).__name__}: {str(exc)[:200]}"
                yield pa.Table.from_pylist(
                    [_doc(str(file), source=str(file), error=reason)], schema=DOC_SCHEMA
                )
    elif path.is_dir() or suffix in FILE_SUFFIXES:
        if path.is_dir():
            root, items = path, list_files(path, max_doc_mb=max_doc_mb)
        else:
            root, items = path.parent, [{"path": str(path), "error": _unreadable(str(path), max_doc_mb)}]
        for start in range(0, len(items), 16):
            yield files_to_docs(
                pa.Table.from_pylist(items[start : start + 16]),
                root=str(root),
                max_doc_mb=max_doc_mb,
                parse_limits=parse_limits,
            )
    else:
        raise SourceError(f"Unsupported source {str(source)!r}.")


def count_docs(source: str | Path, *, max_scan_gb: float = 8.0, storage: Any = None) -> int | None:
    """About how many documents ``source`` holds, for a progress display; None when counting
    would cost too much or the source cannot be counted (a Parquet footer that fails to read).

    Files of a folder are counted by name, lines of a JSONL file by scanning its bytes (~1 s per
    GB; skipped above ``max_scan_gb``), rows of Parquet files from their footers. In an object
    store only files are counted (a JSONL object is not read twice).
    """
    if is_uri(str(source)):
        try:
            kind, items, *_ = _remote_listing(location(source, storage), max_doc_mb=float("inf"))
        except (SourceError, OSError):
            return None
        return len(items) if kind == "files" else None
    path = Path(source).expanduser()
    try:
        if path.is_file() and path.suffix.lower() in {".jsonl", ".ndjson"}:
            if path.stat().st_size > max_scan_gb * 2**30:
                return None
            lines, last = 0, b"\n"
            with path.open("rb") as f:
                while block := f.read(1 << 22):
                    lines += block.count(b"\n")
                    last = block[-1:]
            return lines + (last != b"\n")
        if path.suffix.lower() == ".parquet" or (path.is_dir() and _all_parquet(path)):
            import pyarrow.parquet as pq

            files = [path] if path.is_file() else list(_visible_files(path))
            return sum(pq.ParquetFile(f).metadata.num_rows for f in files)
        if path.is_dir():
            count = 0
            for _, dirs, files in os.walk(path):
                dirs[:] = [d for d in dirs if not d.startswith(".")]
                count += sum(not name.startswith(".") for name in files)
            return count
        return 1
    except (OSError, pa.ArrowException):
        return None


def _read_parquet(
    files: list[str], *, source: str, max_doc_mb: float, filesystem: Any = None
) -> ray.data.Dataset:
    """Parquet files whose footer reads are streamed; any other file becomes a failed row, so one
    truncated or mislabelled file does not stop the run.

    Args:
        files: local paths, or URIs (``s3://bucket/key``) read through ``filesystem``.
        source: what the rows record as their source (the file or folder the user named).
        max_doc_mb: longer texts are failed.
        filesystem: a ``pyarrow.fs`` filesystem for URIs; None for local paths.
    """
    import pyarrow.parquet as pq

    def in_fs(file: str) -> str:
        return file.split("://", 1)[1] if filesystem is not None else file

    readable: list[str] = []
    failed: list[dict[str, Any]] = []
    for file in files:
        try:
            if filesystem is not None:
                with filesystem.open_input_file(in_fs(file)) as f:
                    pq.ParquetFile(f).metadata  # noqa: B018  (reads and checks the footer)
            else:
                pq.ParquetFile(file).metadata  # noqa: B018
        except Exception as exc:  # pyarrow raises several types for a broken file
            reason = f"unreadable Parquet file: {type(exc).__name__}: {str(exc)[:200]}"
            failed.append(_doc(file, source=file, error=reason))
            continue
        readable.append(file)
    parts = []
    if readable:
        parts.append(
            ray.data.read_parquet([in_fs(f) for f in readable], filesystem=filesystem).map_batches(
                parquet_to_docs,
                batch_format="pyarrow",
                fn_kwargs={"source": source, "max_doc_mb": max_doc_mb},
            )
        )
    if failed:
        parts.append(ray.data.from_arrow(pa.Table.from_pylist(failed, schema=DOC_SCHEMA)))
    return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]


def _visible_files(path: Path) -> Iterator[Path]:
    return (p for p in path.rglob("*") if p.is_file() and not p.name.startswith((".", "_")))


def _all_parquet(path: Path) -> bool:
    files = _visible_files(path)
    first = next(files, None)
    return first is not None and all(p.suffix.lower() == ".parquet" for p in (first, *files))


# --- object storage (s3://, gs://, az://) ---------------------------------------------------------


class _Listing(NamedTuple):
    kind: str  # "jsonl" | "parquet" | "files"
    items: list[dict[str, Any]]  # {path (a URI), error}
    fs: Any  # the pyarrow filesystem that reads them
    base: str  # the source's path in fs
    root: str  # what document ids of files are relative to


def _remote_listing(loc: Location, *, max_doc_mb: float) -> _Listing:
    """What an object-store source is, listed once with sizes so that too-large files fail unread."""
    fs, base = loc.filesystem()
    kind, items = _remote_items(loc, fs, base, max_doc_mb=max_doc_mb)
    one_file = len(items) == 1 and items[0]["path"] == loc.uri
    return _Listing(kind, items, fs, base, loc.uri.rsplit("/", 1)[0] if one_file else loc.uri)


def _remote_items(
    loc: Location, fs: Any, base: str, *, max_doc_mb: float
) -> tuple[str, list[dict[str, Any]]]:
    scheme = loc.uri.split("://", 1)[0] + "://"
    try:
        info = fs.get_file_info(base)
    except (OSError, pa.ArrowException) as exc:
        raise SourceError(f"Cannot read source {loc.uri}: {error_reason(exc, loc.uri)}") from exc
    if info.type == pafs.FileType.File:
        suffix = Path(base).suffix.lower()
        if suffix in {".jsonl", ".ndjson"}:
            return "jsonl", [{"path": loc.uri, "error": None}]
        if suffix == ".parquet":
            return "parquet", [{"path": loc.uri, "error": None}]
        infos = [info]
    elif info.type == pafs.FileType.Directory:
        try:
            infos = fs.get_file_info(pafs.FileSelector(base, recursive=True))
        except (OSError, pa.ArrowException) as exc:
            raise SourceError(f"Cannot list source {loc.uri}: {error_reason(exc, loc.uri)}") from exc
    else:
        raise SourceError(f"Source {loc.uri} does not exist (no object and no prefix of that name).")
    items: list[dict[str, Any]] = []
    for file in sorted((i for i in infos if i.type == pafs.FileType.File), key=lambda i: i.path):
        rel = file.path[len(base) :].lstrip("/") if file.path.startswith(base) else file.base_name
        if any(part.startswith(".") for part in rel.split("/")):
            continue  # hidden, as in a local folder
        error = None
        if file.size is not None and file.size > max_doc_mb * 1e6:
            error = f"file is {_mb(file.size)}, over max_doc_mb={max_doc_mb}"
        items.append({"path": scheme + file.path, "error": error})
    if info.type == pafs.FileType.File:
        return "files", items
    if not items:
        raise SourceError(f"Source {loc.uri} has no files.")
    if all(Path(i["path"]).suffix.lower() == ".parquet" for i in items):
        return "parquet", items
    return "files", items


def _read_remote(
    loc: Location, *, docs_per_block: int, max_doc_mb: float, parse_limits: ParseLimits | None
) -> ray.data.Dataset:
    kind, items, fs, base, root = _remote_listing(loc, max_doc_mb=max_doc_mb)
    scheme = loc.uri.split("://", 1)[0] + "://"
    if kind == "jsonl":
        return ray.data.read_datasource(
            JsonlDatasource(
                base, docs_per_block=docs_per_block, max_doc_mb=max_doc_mb, scheme=scheme, filesystem=fs
            )
        )
    if kind == "parquet":
        paths = [i["path"] for i in items]
        return _read_parquet(paths, source=loc.uri, max_doc_mb=max_doc_mb, filesystem=fs)
    return ray.data.from_items(items).map_batches(
        files_to_docs,
        batch_format="pyarrow",
        batch_size=16,
        fn_kwargs={"root": root, "max_doc_mb": max_doc_mb, "filesystem": fs, "parse_limits": parse_limits},
    )


def _iter_remote(
    loc: Location, *, docs_per_batch: int, max_doc_mb: float, parse_limits: ParseLimits | None
) -> Iterator[pa.Table]:
    kind, items, fs, base, root = _remote_listing(loc, max_doc_mb=max_doc_mb)
    if kind == "jsonl":
        with fs.open_input_stream(base) as f:
            yield from _jsonl_blocks(f, loc.uri, docs_per_block=docs_per_batch, max_doc_mb=max_doc_mb)
    elif kind == "parquet":
        import pyarrow.parquet as pq

        for item in items:
            try:
                with fs.open_input_file(item["path"].split("://", 1)[1]) as f:
                    for batch in pq.ParquetFile(f).iter_batches(batch_size=docs_per_batch):
                        yield parquet_to_docs(
                            pa.Table.from_batches([batch]), source=loc.uri, max_doc_mb=max_doc_mb
                        )
            except Exception as exc:  # as _read_parquet: a broken file is one failed row
                reason = f"unreadable Parquet file: {type(exc).__name__}: {str(exc)[:200]}"
                yield pa.Table.from_pylist(
                    [_doc(item["path"], source=item["path"], error=reason)], schema=DOC_SCHEMA
                )
    else:
        for start in range(0, len(items), 16):
            yield files_to_docs(
                pa.Table.from_pylist(items[start : start + 16]),
                root=root,
                max_doc_mb=max_doc_mb,
                filesystem=fs,
                parse_limits=parse_limits,
            )


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
