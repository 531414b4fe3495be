"""Compact ANN codes of a shard, held in memory by the processes that search it.

LanceDB's own ANN search costs ~13 ms of CPU per query on a 1M-row db of 4 shards here (its query
planning and runtime, per shard; README, "Search past RAM"), more than a query's whole budget at 150
QPS on 2 cores. ``embedpipe index`` therefore also stores, per indexed shard, faiss's IVF index of
RaBitQ codes (``bits`` per dimension) over the shard's vectors at the version it indexed, with each
code's LanceDB row id. A searching process loads it (no build), probes it in well under a millisecond
per shard, and re-ranks the candidates exactly with their float32 vectors read from LanceDB (a take by
row id): what it holds per row is the codes and two ids, never a vector or a text.

Row ids stay valid while a table only grows or loses rows: rows committed after the codes were built
(in fragments past ``max_fragment``) are found by a LanceDB scan of them alone, deleted rows are simply
not returned by the take. A compaction (``embedpipe index`` runs one) gives rows new ids, so the codes
are brought up to date right after it: the rows still there keep their codes (found again by
``key``: chunk id and content hash), deleted ones are removed, new ones added, in time for the changed
rows.

Files, under the generation's tables (local or in the bucket): ``_codes/<shard>.json`` names the
current ``_codes/<shard>-v<version>.faiss`` (faiss's index) and ``.npz`` beside it (each code's row id
and key), written after them, so a reader sees whole files or the previous ones. A local index file is
read by faiss itself, with no copy in Python's memory.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipelines.config import IndexSettings
from pipelines.store import Location
from pipelines.store.shard_files import ShardFiles

logger = logging.getLogger(__name__)

DIR = "_codes"
FORMAT = 1
FILES = ShardFiles(DIR, FORMAT)
FRAGMENT_SHIFT = 32  # a Lance row id is (fragment id << 32) | offset in the fragment
TRAIN_PER_PARTITION = 64  # k-means sample: this many rows per partition (faiss wants 39 to 256)
MAX_PARTITIONS = 65536
# From this many partitions the k-means runs in two levels (sqrt(partitions) clusters, then each one
# split): its work grows with rows x sqrt(partitions), not rows x partitions. Below, one level: at 1M
# rows in 4 shards (~2,000 partitions a shard) two levels built 2x faster but gave recall@10 0.974
# against 0.988 (README, "Search past RAM").
TWO_LEVEL_FROM = 4096
# From this many partitions rows (at the build) and queries find their partitions through an HNSW graph
# of the centroids instead of comparing them with every centroid.
HNSW_QUANTIZER_FROM = 4096
HNSW_M, HNSW_EF_ADD, HNSW_EF_SEARCH = 32, 32, 128
# codes_bits left to the shard's size (None): 4 bits a dimension below LARGE_SHARD_ROWS rows, 2 bits
# from there (10M rows on one node fit its memory only so), re-ranking index.codes_low_bits_refine x k
# candidates (README, "Search past RAM"). A shard whose codes have other bits keeps them while its rows
# stay within BITS_MARGIN of the line, so that one hovering at it is not built again at every index.
LARGE_SHARD_ROWS = 1_000_000
SMALL_BITS, LARGE_BITS = 4, 2
BITS_MARGIN = 0.1
TAKE_ROWS = 8192  # rows per LanceDB take when reading new rows' vectors
REBUILD_SHARE = 0.5  # more rows changed than this share of the codes: built again, not updated


def partitions_for(rows: int, settings: IndexSettings) -> int:
    """IVF partitions of a shard's codes: one per ``settings.codes_rows_per_partition`` rows."""
    return int(min(MAX_PARTITIONS, max(1, round(rows / settings.codes_rows_per_partition))))


def nprobe_for(partitions: int, settings: IndexSettings) -> int:
    """Partitions a query probes: ``codes_probe_factor`` * sqrt(partitions), at least ``min_nprobes``."""
    wanted = max(settings.min_nprobes, math.ceil(settings.codes_probe_factor * math.sqrt(partitions)))
    return int(min(partitions, wanted))


def bits_for(rows: int, settings: IndexSettings, held: int | None = None) -> int:
    """Bits a dimension of a shard's codes: ``settings.codes_bits``, or by the shard's rows when None
    (``held``: the bits of its current codes, kept near the line)."""
    if settings.codes_bits is not None:
        return settings.codes_bits
    if held is not None and abs(rows - LARGE_SHARD_ROWS) <= BITS_MARGIN * LARGE_SHARD_ROWS:
        return held
    return LARGE_BITS if rows >= LARGE_SHARD_ROWS else SMALL_BITS


def refine_for(bits: int, settings: IndexSettings) -> int:
    """Candidates a query re-ranks exactly, per result wanted, from codes of ``bits`` bits:
    ``codes_low_bits_refine`` for 2 bits or fewer, else ``refine_factor``."""
    if bits <= LARGE_BITS:
        return settings.codes_low_bits_refine
    return settings.refine_factor or 1


def bytes_per_row(dim: int, bits: int, rows_per_partition: int = 128) -> int:
    """What a searching process holds per row: the RaBitQ code (``bits`` per dimension and its float
    factors: faiss's ``code_size``), faiss's id and the row id it maps to, and a share of the
    partitions' float32 centroids (240 B for 384-dim 4-bit codes; measured at 1M rows with LanceDB's
    metadata caches: 240.1 B a row held)."""
    code = math.ceil(dim * bits / 8) + (8 if bits == 1 else 20)
    return code + 8 + 8 + math.ceil(4 * dim / rows_per_partition)


@dataclass
class ShardCodes:
    """A shard's codes as a searching process holds them.

    Attributes:
        index: faiss's IVF-RaBitQ index; its ids are positions into ``rowids``.
        rowids: each position's LanceDB row id at ``version`` (-1: removed).
        version: the table version the codes describe.
        max_fragment: the largest fragment id at ``version``: rows in later fragments are new.
        partitions: IVF partitions.
        file: the file they were read from.
        bits: bits a dimension of the codes.
    """

    index: Any
    rowids: np.ndarray
    version: int
    max_fragment: int
    partitions: int
    file: str
    bits: int = SMALL_BITS

    @property
    def new_from(self) -> int:
        """The smallest row id a row committed after these codes can have."""
        return (self.max_fragment + 1) << FRAGMENT_SHIFT

    @property
    def nbytes(self) -> int:
        ivf = self.index
        codes = ivf.ntotal * (ivf.code_size + 8)  # each code and faiss's id for it
        graph = ivf.nlist * 2 * HNSW_M * 4 if _hnsw(ivf) is not None else 0  # the HNSW quantizer's links
        return codes + ivf.nlist * ivf.d * 4 + graph + self.rowids.nbytes  # and the centroids

    def search(self, vectors: np.ndarray, candidates: int, nprobe: int) -> np.ndarray:
        """The row ids of each query's ``candidates`` best codes (-1 where there are fewer)."""
        import faiss

        faiss.omp_set_num_threads(1)  # one thread a search (OpenMP's idle threads spin and cost CPU)
        params = faiss.IVFRaBitQSearchParameters()
        params.nprobe = nprobe
        if _hnsw(self.index) is not None:  # the graph must return every partition probed
            graph = faiss.SearchParametersHNSW()
            graph.efSearch = max(HNSW_EF_SEARCH, nprobe)
            params.quantizer_params = graph
        _, positions = self.index.search(np.ascontiguousarray(vectors, np.float32), candidates, params=params)
        found = np.where(positions >= 0, self.rowids[np.maximum(positions, 0)], -1)
        return found


def row_keys(chunk_ids: list[str], content_hashes: list[str]) -> np.ndarray:
    """A 64-bit key per row that names its vector: the chunk and the content it was cut from."""
    return np.fromiter(
        (
            int.from_bytes(hashlib.blake2b(f"{c}\0{h}".encode(), digest_size=8).digest(), "little")
            for c, h in zip(chunk_ids, content_hashes, strict=True)
        ),
        dtype=np.uint64,
        count=len(chunk_ids),
    )


def read(at: Location, shard: str, *, keys: bool = False) -> tuple[ShardCodes, np.ndarray | None] | None:
    """The codes ``embedpipe index`` stored for ``shard`` (and their keys, for an update), or None."""
    import faiss

    pointer = at.read_json(f"{DIR}/{shard}.json")
    if not pointer or pointer.get("format") != FORMAT:
        return None
    ids = at.read_bytes(f"{DIR}/{pointer['file']}.npz")
    if ids is None:
        return None
    with np.load(io.BytesIO(ids)) as arrays:
        rowids = arrays["rowids"]
        stored_keys = arrays["keys"] if keys else None
    del ids
    name = f"{DIR}/{pointer['file']}.faiss"
    if at.local:
        if not (at.path / name).is_file():
            return None
        index = faiss.read_index(str(at.path / name))
    else:
        data = at.read_bytes(name)
        if data is None:
            return None
        index = faiss.deserialize_index(np.frombuffer(data, np.uint8))
        del data
    _hnsw_ef(index, HNSW_EF_SEARCH)
    codes = ShardCodes(
        index, rowids, int(pointer["version"]), int(pointer["max_fragment"]), int(pointer["partitions"]),
        pointer["file"], int(pointer.get("bits", SMALL_BITS)),
    )  # fmt: skip
    return codes, stored_keys


def pointer(at: Location, shard: str) -> dict[str, Any] | None:
    """The small file naming ``shard``'s current codes (None: it has none)."""
    return FILES.pointer(at, shard)


def drop(at: Location, shard: str) -> None:
    """Remove ``shard``'s codes (it went back to exact search)."""
    FILES.drop(at, shard)


def update(table: Any, at: Location, *, settings: IndexSettings, rebuild: bool = False) -> dict[str, Any]:
    """Bring ``table``'s codes up to its current version: add new rows, remove deleted ones, follow
    the new row ids of a compaction; or build them whole (none yet, ``rebuild``, a partition count
    the rows have outgrown, bits the shard's size no longer calls for, or most rows changed).

    Returns:
        What was done: ``action`` (built or updated), rows, rows added and removed, seconds.
    """
    import faiss

    started = time.perf_counter()
    shard, version = table.name, table.version
    scan = table.search().select(["chunk_id", "content_hash"]).with_row_id(True).limit(None).to_arrow()
    rowids = scan.column("_rowid").to_numpy().astype(np.int64)
    keys = row_keys(scan.column("chunk_id").to_pylist(), scan.column("content_hash").to_pylist())
    del scan
    rows = len(rowids)
    previous = None if rebuild else read(at, shard, keys=True)
    partitions = partitions_for(rows, settings)
    bits = bits_for(rows, settings, held=previous[0].bits if previous is not None else None)
    action, added, removed = "built", rows, 0
    if previous is not None and len(np.unique(keys)) == rows:
        codes, old_keys = previous
        fits = 0.5 < codes.partitions / partitions < 2.0 and codes.index.d == _dim(table)
        fits = fits and codes.bits == bits
        live = codes.rowids >= 0
        gone = live & ~np.isin(old_keys, keys)
        new = ~np.isin(keys, old_keys[live])
        changed = int(gone.sum()) + int(new.sum())
        if fits and changed <= REBUILD_SHARE * max(1, int(live.sum())):
            index = codes.index
            if gone.any():
                index.remove_ids(faiss.IDSelectorBatch(np.flatnonzero(gone).astype(np.int64)))
            positions = np.arange(len(codes.rowids), len(codes.rowids) + int(new.sum()), dtype=np.int64)
            if len(positions):
                _add(index, _vectors(table, rowids[new]), positions)
            all_keys = np.concatenate([old_keys, keys[new]])
            where = dict(zip(keys.tolist(), rowids.tolist(), strict=True))
            mapped = np.fromiter((where.get(k, -1) for k in all_keys.tolist()), np.int64, len(all_keys))
            mapped[: len(gone)][gone | ~live] = -1
            action, added, removed = "updated", len(positions), int(gone.sum())
            _write(at, shard, index, mapped, all_keys, version=version, rowids=rowids,
                   partitions=codes.partitions, bits=bits)  # fmt: skip
    if action == "built":
        vectors = _vectors(table, rowids)
        index = build(vectors, partitions, bits)
        del vectors
        _write(
            at,
            shard,
            index,
            rowids,
            keys,
            version=version,
            rowids=rowids,
            partitions=partitions,
            bits=bits,
        )
    return {
        "action": action,
        "rows": rows,
        "added": added,
        "removed": removed,
        "partitions": partitions if action == "built" else previous[0].partitions,
        "seconds": round(time.perf_counter() - started, 2),
    }


def build(vectors: np.ndarray, partitions: int, bits: int) -> Any:
    """faiss's IVF index of ``bits``-bit RaBitQ codes of unit ``vectors`` (ids: their positions), its
    partitions trained by k-means on a sample (in two levels from TWO_LEVEL_FROM partitions)."""
    import faiss

    rows, dim = vectors.shape
    graph = f"_HNSW{HNSW_M}" if partitions >= HNSW_QUANTIZER_FROM else ""
    index = faiss.index_factory(dim, f"IVF{partitions}{graph},{_quantizer(bits)}", faiss.METRIC_INNER_PRODUCT)
    picked = np.random.default_rng(0).choice(rows, min(rows, TRAIN_PER_PARTITION * partitions), replace=False)
    sample = vectors[np.sort(picked)]
    if partitions >= TWO_LEVEL_FROM:
        centroids = _two_level_centroids(sample, partitions)
        if centroids is not None:
            index.quantizer.add(centroids)
            index.quantizer.is_trained = True
    index.train(sample)  # the codes' own training; the quantizer's too when it has no centroids yet
    _add(index, vectors, np.arange(rows, dtype=np.int64))
    return index


def _two_level_centroids(sample: np.ndarray, partitions: int) -> np.ndarray | None:
    """Unit centroids of a two-level k-means of ``sample``, or None where it cannot split it (a
    first-level cluster too small for a centroid of its own: the caller trains in one level)."""
    from faiss.contrib.clustering import two_level_clustering

    try:
        # min_points_per_centroid=1: small second-level runs are not warned about on the console.
        centroids, _ = two_level_clustering(
            sample, math.isqrt(partitions), partitions, min_points_per_centroid=1
        )
    except RuntimeError as exc:  # faiss refuses a k-means of 0 centroids
        logger.info("two-level k-means of %d partitions failed (%s); training in one level", partitions, exc)
        return None
    return np.ascontiguousarray(unit_rows(centroids), np.float32)  # unit: inner product = nearest


def _hnsw(index: Any) -> Any:
    """The HNSW quantizer of an IVF index, or None (a flat one)."""
    import faiss

    quantizer = faiss.downcast_index(index.quantizer)
    return quantizer if isinstance(quantizer, faiss.IndexHNSW) else None


def _hnsw_ef(index: Any, ef: int) -> None:
    """Set the default search breadth of an HNSW quantizer (a flat one has none)."""
    quantizer = _hnsw(index)
    if quantizer is not None:
        quantizer.hnsw.efSearch = ef


def _add(index: Any, vectors: np.ndarray, ids: np.ndarray) -> None:
    """Add codes of ``vectors``: their partitions found by a narrow search of an HNSW quantizer, whose
    default breadth is the queries' again afterwards."""
    _hnsw_ef(index, HNSW_EF_ADD)
    index.add_with_ids(vectors, ids)
    _hnsw_ef(index, HNSW_EF_SEARCH)


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """``vectors`` with every row scaled to norm 1 (a zero row stays zero)."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.where(norms > 0, norms, 1.0)


def _quantizer(bits: int) -> str:
    return "RaBitQ" if bits == 1 else f"RaBitQ{bits}"


def _dim(table: Any) -> int:
    return table.schema.field("vector").type.list_size


def _vectors(table: Any, rowids: np.ndarray) -> np.ndarray:
    """Unit float32 vectors of ``rowids``, in that order (LanceDB takes of TAKE_ROWS rows)."""
    from pipelines.search.shard import _async_table, run_async

    dim = _dim(table)
    out = np.empty((len(rowids), dim), np.float32)
    for start in range(0, len(rowids), TAKE_ROWS):
        part = rowids[start : start + TAKE_ROWS]
        query = _async_table(table).take_row_ids(part.tolist()).select(["vector"]).with_row_id()
        got = run_async(query.to_arrow())
        order = {r: i for i, r in enumerate(got.column("_rowid").to_pylist())}
        flat = got.column("vector").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        block = np.asarray(flat, np.float32).reshape(-1, dim)
        out[start : start + len(part)] = block[[order[int(r)] for r in part]]
    return unit_rows(out)


def _write(
    at: Location,
    shard: str,
    index: Any,
    positions_rowids: np.ndarray,
    keys: np.ndarray,
    *,
    version: int,
    rowids: np.ndarray,
    partitions: int,
    bits: int,
) -> None:
    import faiss

    name = f"{shard}-v{version}"
    at.write_bytes(f"{DIR}/{name}.faiss", faiss.serialize_index(index).tobytes())
    buffer = io.BytesIO()
    np.savez(buffer, rowids=positions_rowids, keys=keys)
    at.write_bytes(f"{DIR}/{name}.npz", buffer.getvalue())
    max_fragment = int(rowids.max() >> FRAGMENT_SHIFT) if len(rowids) else -1
    FILES.publish(at, shard, name, {
        "version": version, "max_fragment": max_fragment, "partitions": partitions,
        "rows": int((positions_rowids >= 0).sum()), "bits": bits, "faiss": faiss.__version__,
    })  # fmt: skip
