"""The db's manifest (``embedpipe.json``): its generations and which one is live.

A generation is one complete set of shard tables with its own model, vector size and shard count. A db
starts with generation 1, whose tables sit at the db's root (where every db made before generations
keeps them); ``reshard`` and ``reembed`` build generation n under ``_gen/<n>/``, and ``promote`` makes
one live by rewriting the manifest, one whole-file write that readers see before or after, never in
part. Ingest writes the live generation; search reads it unless told another.

Callers that change the manifest hold the db's writer lock (``pipelines.store.lock``).
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines.store.location import Location, location

MANIFEST = "embedpipe.json"
GENERATIONS_DIR = "_gen"
_LAYOUT_VERSION = 2
BUILDING, READY = "building", "ready"


def shard_name(index: int) -> str:
    return f"shard_{index:03d}"


class StoreError(ValueError):
    """A db directory that does not exist, or that does not match what is asked of it."""


@dataclass(frozen=True)
class Manifest:
    """One generation of a db: its tables' model, vector size and shard count, and where they are."""

    shards: int
    model: str
    dim: int
    # The numeric format that computed the stored vectors (fp32, bf16, fp16, int8), set by the first
    # run that embeds; "mixed" once a run was allowed to add another; None before any (or in a db
    # made before it was recorded).
    vectors: str | None = None
    generation: int = 1
    path: str = ""  # the tables' folder under the db ("" for the root)
    state: str = READY  # building until reshard/reembed has checked that every chunk landed once
    created: float | None = None
    made_by: str = "ingest"  # ingest, or "reshard of 1", "reembed of 2"...

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def require_ready(self, uri: str = "the db") -> None:
        """Raise StoreError unless the generation is ready (a build that stopped is still building)."""
        if self.state != READY:
            raise StoreError(
                f"generation {self.generation} of {uri} is still {self.state}, not ready: run the "
                f"{self.made_by.split()[0]} command that started it again to finish it."
            )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        known = {f.name for f in dataclasses.fields(cls)}
        data = {k: v for k, v in data.items() if k in known}
        return cls(
            **{
                **data,
                "shards": int(data["shards"]),
                "dim": int(data["dim"]),
                "generation": int(data.get("generation", 1)),
            }
        )


@dataclass(frozen=True)
class Catalog:
    """Every generation of a db, and the live one."""

    live: int
    generations: dict[int, Manifest] = field(default_factory=dict)
    # The highest number ever given: a dropped generation's number is never given again, so that a
    # process still holding the old one open cannot take a new one for it.
    last: int = 0

    @property
    def next_number(self) -> int:
        return max(self.last, *self.generations) + 1

    def get(self, generation: int, *, uri: str = "") -> Manifest:
        if generation not in self.generations:
            known = ", ".join(str(g) for g in sorted(self.generations))
            raise StoreError(f"{uri or 'the db'} has no generation {generation}. It has: {known}.")
        return self.generations[generation]

    @property
    def live_manifest(self) -> Manifest:
        return self.generations[self.live]

    def to_json(self) -> str:
        return json.dumps(
            {
                "layout": _LAYOUT_VERSION,
                "live": self.live,
                "last": max(self.last, *self.generations),
                "generations": [self.generations[g].to_dict() for g in sorted(self.generations)],
            },
            indent=2,
        )

    def with_generation(self, manifest: Manifest) -> Catalog:
        return dataclasses.replace(self, generations={**self.generations, manifest.generation: manifest})


def read_catalog(db: str | Path | Location) -> Catalog:
    """The db's generations. A db written before generations (layout 1) is generation 1.

    Raises:
        StoreError: no embedpipe db there.
    """
    loc = location(db)
    data = loc.read_json(MANIFEST)
    if data is None:
        raise StoreError(f"{loc.uri!r} is not an embedpipe db (no {MANIFEST}); run ingest first.")
    if int(data.get("layout", 1)) == 1:
        return Catalog(live=1, generations={1: Manifest.from_dict(data)})
    generations = {int(g["generation"]): Manifest.from_dict(g) for g in data["generations"]}
    return Catalog(live=int(data["live"]), generations=generations, last=int(data.get("last", 0)))


def write_catalog(db: str | Path | Location, catalog: Catalog) -> None:
    """Write the manifest whole: readers see the old one or the new one."""
    location(db).write_bytes(MANIFEST, catalog.to_json().encode())


def read_manifest(db: str | Path | Location, generation: int | None = None) -> Manifest:
    """A generation of the db (default: the live one)."""
    loc = location(db)
    catalog = read_catalog(loc)
    return catalog.get(catalog.live if generation is None else generation, uri=loc.uri)


def tables_of(db: str | Path | Location, manifest: Manifest) -> Location:
    """Where a generation's shard tables (and its embedding cache) are."""
    loc = location(db)
    return loc.join(manifest.path) if manifest.path else loc


def new_generation(db: str | Path | Location, *, shards: int, model: str, dim: int, made_by: str) -> Manifest:
    """Add a generation in state ``building`` to the manifest (its tables are the caller's to make)."""
    loc = location(db)
    catalog = read_catalog(loc)
    number = catalog.next_number
    manifest = Manifest(
        shards=shards, model=model, dim=dim, generation=number, path=f"{GENERATIONS_DIR}/{number}",
        state=BUILDING, created=time.time(), made_by=made_by,
    )  # fmt: skip
    write_catalog(loc, catalog.with_generation(manifest))
    return manifest


def update_generation(db: str | Path | Location, generation: int, **changes: Any) -> Manifest:
    loc = location(db)
    catalog = read_catalog(loc)
    manifest = dataclasses.replace(catalog.get(generation, uri=loc.uri), **changes)
    write_catalog(loc, catalog.with_generation(manifest))
    return manifest


def promote(db: str | Path | Location, generation: int) -> Catalog:
    """Make ``generation`` live: one write of the manifest.

    Raises:
        StoreError: no such generation, or one still building.
    """
    loc = location(db)
    catalog = read_catalog(loc)
    catalog.get(generation, uri=loc.uri).require_ready(repr(loc.uri))
    promoted = dataclasses.replace(catalog, live=generation)
    write_catalog(loc, promoted)
    return promoted


def drop(db: str | Path | Location, generation: int) -> Manifest:
    """Remove a generation that is not live: its entry first (no reader finds it after), then its tables.

    Raises:
        StoreError: no such generation, or the live one.
    """
    loc = location(db)
    catalog = read_catalog(loc)
    manifest = catalog.get(generation, uri=loc.uri)
    if generation == catalog.live:
        raise StoreError(
            f"generation {generation} is live in {loc.uri!r}; promote another one first. Nothing was changed."
        )
    rest = {g: m for g, m in catalog.generations.items() if g != generation}
    write_catalog(loc, dataclasses.replace(catalog, generations=rest, last=catalog.next_number - 1))
    if manifest.path:
        loc.delete_tree(manifest.path)
    else:  # generation 1: its tables sit at the root, beside the run reports and the error table
        conn = loc.connect()
        from pipelines.embedding.cache import TABLE as EMBED_CACHE

        names = set(conn.list_tables().tables)
        for name in [shard_name(i) for i in range(manifest.shards)] + [EMBED_CACHE]:
            if name in names:
                conn.drop_table(name)
        loc.delete_tree("_codes")  # the shards' in-memory codes (pipelines.codes.DIR)
    return manifest
