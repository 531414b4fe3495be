"""Grow a db to N chunks for scale tests: every chunk of SOURCE_DB repeated with a unique id and a
perturbed vector (``--noise`` sets how far each copy strays from its original: 0.2 keeps copies tight
around it, 0.4 spreads them), dealt over ``--shards`` shards by doc_id.

python benchmarks/scale_db.py --from /tmp/sf-db --to /tmp/db-1m --rows 1000000 [--noise 0.3] [--shards 8]

Rows are written in large appends (``--write-rows`` per shard at a time) so that a 10M-row db is a few
hundred fragments, not thousands; each shard is compacted once at the end and the replaced files
deleted. Check ``df`` first: a row of
a 384-dim model and its SciFact text takes about 3 KB on disk.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import time
import warnings
from pathlib import Path

import lancedb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--from", dest="source", required=True, type=Path, help="an ingested db")
    parser.add_argument("--to", dest="target", required=True, type=Path, help="a new db directory")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--noise", type=float, default=0.3, help="norm of the noise added to each copy")
    parser.add_argument(
        "--shards", type=int, default=None, help="shards of the new db (default: the source's)"
    )
    parser.add_argument("--write-rows", type=int, default=100_000, help="rows per append, per shard")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from pipelines import store

    manifest = store.read_manifest(args.source)
    if args.shards:
        manifest = dataclasses.replace(manifest, shards=args.shards)
    store.init_db(args.target, manifest)
    base = pa.concat_tables(list(t.to_arrow() for t in store.open_shards(args.source).values()))
    rng = np.random.default_rng(args.seed)
    vectors = base.column("vector").combine_chunks().flatten().to_numpy().reshape(-1, manifest.dim)
    conn = lancedb.connect(str(args.target))
    tables = {i: conn.open_table(store.shard_name(i)) for i in range(manifest.shards)}
    schema = store.table_schema(manifest.dim)
    pending: dict[int, list[pa.Table]] = {i: [] for i in tables}
    started, written, copy = time.time(), 0, 0

    def flush(i: int) -> None:
        if pending[i]:
            tables[i].add(pa.concat_tables(pending[i]).cast(schema))
            pending[i] = []

    while written < args.rows:
        n = min(base.num_rows, args.rows - written)
        batch = base.slice(0, n)
        suffix = f"~r{copy}"
        noisy = vectors[:n] + rng.normal(scale=args.noise / np.sqrt(manifest.dim), size=(n, manifest.dim))
        noisy /= np.linalg.norm(noisy, axis=1, keepdims=True)
        doc_ids = pc.binary_join_element_wise(batch.column("doc_id"), suffix, "")
        batch = batch.set_column(batch.schema.get_field_index("doc_id"), "doc_id", doc_ids)
        chunk_ids = pc.binary_join_element_wise(batch.column("chunk_id"), suffix, "")
        batch = batch.set_column(batch.schema.get_field_index("chunk_id"), "chunk_id", chunk_ids)
        flat = pa.array(noisy.astype(np.float32).ravel())
        batch = batch.set_column(
            batch.schema.get_field_index("vector"),
            "vector",
            pa.FixedSizeListArray.from_arrays(flat, manifest.dim),
        )
        shard = np.array([store.shard_of(d, manifest.shards) for d in doc_ids.to_pylist()])
        for i in tables:
            part = batch.filter(pa.array(shard == i))
            if part.num_rows:
                pending[i].append(part)
            if sum(t.num_rows for t in pending[i]) >= args.write_rows:
                flush(i)
        written += n
        copy += 1
    for i in tables:
        flush(i)
    # Compact once at the end (a scan over many small fragments is slower), and delete the files the
    # compaction replaced at once: nothing else reads this new db, and at 10M rows they are ~30 GB.
    with warnings.catch_warnings():  # LanceDB's warning that older versions go: they are meant to
        warnings.simplefilter("ignore", UserWarning)
        for table in tables.values():
            table.optimize(cleanup_older_than=datetime.timedelta(0), delete_unverified=True)
    print(
        json.dumps(
            {
                "rows": written,
                "copies": copy,
                "noise": args.noise,
                "shards": store.shard_rows(args.target),
                "seconds": round(time.time() - started, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
