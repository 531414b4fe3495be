"""The ``embedpipe`` command: parse options, load config, call the library, report errors in one line.

Exit codes: 0 success; 1 fatal error (nothing committed by the failing step); 2 bad usage;
3 the run finished but some documents failed (they are listed in the report).
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import json
import logging
import os
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from pipelines import NOTICE
from pipelines.config import Config, ConfigError, api_key_from_env, load_config

EXIT_FATAL, EXIT_USAGE, EXIT_SOME_FAILED = 1, 2, 3

app = typer.Typer(
    help="Turn document collections into sharded, searchable embeddings (Ray Data + LanceDB).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)

ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        exists=True,
        dir_okay=False,
        help="YAML config (see configs/).",
        envvar="EMBEDPIPE_CONFIG",
    ),
]
DbOpt = Annotated[
    str,
    typer.Option(
        "--db", help="The db holding the shard tables: a folder or s3:// gs:// az://.", envvar="EMBEDPIPE_DB"
    ),
]
AddressOpt = Annotated[
    str | None,
    typer.Option(
        "--address", help="Ray cluster address; default: an embedded local Ray.", envvar="RAY_ADDRESS"
    ),
]
ModeOpt = Annotated[
    str | None,
    typer.Option("--mode", help="vector, text (BM25) or hybrid (vector + BM25 fused); default from config."),
]
FusionOpt = Annotated[
    str | None,
    typer.Option("--fusion", help="hybrid: convex (weighted normalized scores) or rrf; default from config."),
]
WeightOpt = Annotated[
    float | None,
    typer.Option(
        "--weight", help="convex fusion: the vector ranking's weight in [0, 1]; default from config."
    ),
]


def _search_overrides(mode: str | None, fusion: str | None, weight: float | None) -> dict[str, Any]:
    return {"serve.default_mode": mode, "serve.fusion": fusion, "serve.fusion_weight": weight}


ShardsOpt = Annotated[int | None, typer.Option("--shards", min=1, help="Number of shard tables (default 4).")]


def _search_options(cfg: Config) -> dict[str, Any]:
    """The config's hybrid settings as ``Searcher.search`` takes them."""
    serve = cfg.serve
    return {
        "candidates": serve.hybrid_candidates, "fusion": serve.fusion, "weight": serve.fusion_weight,
        "rrf_k": serve.rrf_k,
    }  # fmt: skip


def _fail(message: str, code: int = EXIT_FATAL) -> typer.Exit:
    console.print(f"[bold red]error:[/] {message}", highlight=False)
    return typer.Exit(code)


@contextlib.contextmanager
def _short_lived() -> Iterator[None]:
    """For a command that ends in a second or two: no cyclic garbage collection while it imports
    (~0.2 s of LanceDB's import) and none at exit (the interpreter's last collection, ~0.25 s)."""
    enabled = gc.isenabled()
    gc.disable()
    atexit.unregister(gc.freeze)
    atexit.register(gc.freeze)
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _user_errors() -> tuple[type[Exception], ...]:
    from pipelines.evaluate import BeirError
    from pipelines.sources import SourceError
    from pipelines.store import StoreError

    return (ConfigError, SourceError, StoreError, BeirError, ValueError, FileNotFoundError)


VERBOSE = {"ray.progress_bars": True, "ray.log_to_driver": True}  # what -v adds to a run's config


@app.callback()
def main(
    ctx: typer.Context,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Log more: INFO lines, Ray's logs and its progress bars.")
    ] = False,
) -> None:
    # The console shows warnings (INFO with -v); a run's log file gets INFO either way.
    handler = logging.StreamHandler()
    handler.setLevel(logging.INFO if verbose else NOTICE)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO if verbose else NOTICE, handlers=[handler])
    logging.captureWarnings(True)
    ctx.obj = {"ray": VERBOSE if verbose else {}}
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


class Progress:
    """One progress display for an ingest: a bar on a terminal, a line every 15 s elsewhere."""

    EVERY_S = 15.0

    def __init__(self) -> None:
        from rich.progress import BarColumn, TextColumn, TimeRemainingColumn
        from rich.progress import Progress as Bar

        self.bar = Bar(
            TextColumn("ingest"),
            BarColumn(),
            TextColumn("{task.fields[line]}"),
            TimeRemainingColumn(),
            console=console,
            transient=True,
        )
        self.task = None
        self.printed = 0.0

    def __enter__(self) -> Progress:
        if console.is_terminal:
            self.bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if console.is_terminal:
            self.bar.stop()

    def __call__(self, counts: dict) -> None:
        total, elapsed = counts["total_docs"], max(counts["elapsed_s"], 1e-9)
        line = (
            f"{counts['docs']:,}{f'/{total:,}' if total else ''} docs, {counts['chunks']:,} chunks, "
            f"{counts['tokens'] / elapsed:,.0f} tokens/s"
        )
        if console.is_terminal:
            if self.task is None:
                self.task = self.bar.add_task("ingest", total=total, line=line)
            self.bar.update(self.task, completed=counts["docs"], line=line)
        elif elapsed - self.printed >= self.EVERY_S:
            self.printed = elapsed
            eta = ""
            if total and counts["docs"]:
                eta = f", about {max(total - counts['docs'], 0) * elapsed / counts['docs']:.0f} s left"
            console.print(f"ingest: {line}{eta}", highlight=False, soft_wrap=True)


@app.command()
def ingest(
    ctx: typer.Context,
    source: Annotated[
        str,
        typer.Argument(
            help="A directory of documents, a .jsonl or a .parquet file; local or s3:// gs:// az://."
        ),
    ],
    db: DbOpt,
    config: ConfigOpt = None,
    shards: ShardsOpt = None,
    report: Annotated[Path | None, typer.Option("--report", help="Also write the run report here.")] = None,
    address: AddressOpt = None,
    prune: Annotated[
        bool, typer.Option("--prune", help="Delete stored documents of SOURCE that it no longer has.")
    ] = False,
) -> None:
    """Read, chunk, embed and write SOURCE into the shard tables under --db.

    Documents stored with the same content hash are skipped as unchanged; changed ones have all
    their chunks replaced in one commit per shard.
    """
    from pipelines import ingest as pipeline
    from pipelines.reporting.report import summary_table

    try:
        cfg = load_config(config, shards=shards, **{"ray.address": address, **(ctx.obj or {}).get("ray", {})})
        with Progress() as progress:
            result = pipeline.build(
                source=source, db=db, cfg=cfg, report_path=report, prune=prune, progress=progress
            )
    except _user_errors() as exc:
        raise _fail(str(exc)) from exc
    Console().print(summary_table(result))
    report_file = f"{result['db']}/_runs/{result['run_id']}.json"
    console.print(f"report: {report_file}", highlight=False, soft_wrap=True)  # paths unbroken
    console.print(f"log:    {result['log']}", highlight=False, soft_wrap=True)
    if result["docs"]["failed"]:
        raise typer.Exit(EXIT_SOME_FAILED)


@app.command()
def query(
    text: Annotated[str, typer.Argument(help="What to search for.")],
    db: DbOpt,
    k: Annotated[int, typer.Option("-k", "--top-k", min=1, max=1000, help="Results to return.")] = 10,
    where: Annotated[
        str | None,
        typer.Option(
            "--filter",
            help="A predicate over the shard columns (the same checked grammar as /search), "
            "e.g. \"doc_id = 'x'\".",
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    mode: ModeOpt = None,
    fusion: FusionOpt = None,
    weight: WeightOpt = None,
    collapse: Annotated[
        bool, typer.Option("--collapse", help="One result per document (its best chunk): k documents.")
    ] = False,
    exact: Annotated[
        bool, typer.Option("--exact", help="Scan every row even where an ANN index exists.")
    ] = False,
    config: ConfigOpt = None,
) -> None:
    """Embed TEXT, search every shard, and print the global top-k.

    The score is the cosine similarity in vector mode, BM25 (with the whole db's term statistics) in
    text mode, and the fused score in hybrid mode.
    """
    from concurrent.futures import ThreadPoolExecutor

    from pipelines import store
    from pipelines.embedding.query import query_embedder

    with _short_lived(), ThreadPoolExecutor(1, thread_name_prefix="embed-query") as pool:
        try:
            cfg = load_config(config, **_search_overrides(mode, fusion, weight))
            mode = cfg.serve.default_mode
            if exact and mode != "vector":
                raise ValueError("--exact applies to vector mode only.")
            if where:
                from pipelines.filters import TABLE_COLUMNS, compile_filter

                # The db's owner may filter on every column, in the grammar /search checks.
                where = compile_filter(where, columns=TABLE_COLUMNS)
            loc = store.location(db, cfg.storage)
            loc.check()
            manifest = store.read_manifest(loc)
            manifest.require_ready(repr(loc.uri))

            # The query is embedded while LanceDB is imported (~1 s) and the shards open.
            # Choosing the embedder imports OpenVINO and reads the model: in the thread too.
            def embed() -> Any:
                if mode == "text":  # BM25 alone: nothing to embed
                    return None
                embedder = query_embedder(
                    manifest.model, vectors=manifest.vectors, dtype=cfg.serve.query_dtype
                )
                return embedder.encode([text])[0]

            vector = pool.submit(embed)
            from pipelines.search import Searcher

            searcher = Searcher(loc, index=cfg.index, generation=manifest.generation)
            if exact:
                hits = searcher.search_vector(vector.result(), k=k, where=where, exact=True)
            else:
                hits = searcher.search(
                    text, k=k, where=where, mode=mode, vector=vector.result(),
                    collapse="doc_id" if collapse else None, **_search_options(cfg),
                )  # fmt: skip
        except _user_errors() as exc:
            raise _fail(str(exc)) from exc
    rows = hits.select(["chunk_id", "doc_id", "title", "text", "score", "shard"]).to_pylist()
    if as_json:
        typer.echo(json.dumps({"query": text, "results": rows}, ensure_ascii=False, indent=2))
        return
    from rich.table import Table

    table = Table(title=f"top {k} for {text!r}")
    for column in ("#", "score", "doc_id", "title", "text"):
        table.add_column(column, overflow="fold")
    for rank, row in enumerate(rows, start=1):
        snippet = " ".join(row["text"].split())[:160]
        table.add_row(str(rank), f"{row['score']:.4f}", row["doc_id"], row["title"][:60], snippet)
    Console().print(table)


@app.command("eval")
def evaluate(
    beir_dir: Annotated[Path, typer.Argument(help="A BEIR collection: corpus.jsonl, queries.jsonl, qrels/.")],
    db: Annotated[
        str | None,
        typer.Option("--db", help="The db to score (ingested first if needed).", envvar="EMBEDPIPE_DB"),
    ] = None,
    endpoint: Annotated[
        str | None,
        typer.Option(
            "--endpoint",
            help="Score a running service instead, e.g. http://127.0.0.1:8000 (the key of "
            "EMBEDPIPE_API_KEY_FILE or EMBEDPIPE_API_KEY is sent).",
        ),
    ] = None,
    config: ConfigOpt = None,
    shards: ShardsOpt = None,
    address: AddressOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the scores as JSON.")] = False,
    mode: ModeOpt = None,
    fusion: FusionOpt = None,
    weight: WeightOpt = None,
    generation: Annotated[
        int | None,
        typer.Option(
            "--generation",
            min=1,
            help="Score this generation of --db (see `embedpipe generations`) instead of the live one; "
            "nothing is ingested then.",
        ),
    ] = None,
) -> None:
    """Print nDCG@10, Recall@100, MRR@10 on BEIR_DIR for --db (ingested first if needed) or --endpoint."""
    from pipelines import evaluate as ev
    from pipelines import store

    if (db is None) == (endpoint is None):
        raise _fail("give exactly one of --db and --endpoint", EXIT_USAGE)
    if generation is not None and db is None:
        raise _fail("--generation scores a generation of --db", EXIT_USAGE)
    try:
        queries, qrels = ev.load_beir(beir_dir)
        cfg = load_config(
            config, shards=shards, **{"ray.address": address, **_search_overrides(mode, fusion, weight)}
        )
        refused: dict[str, str] = {}
        if endpoint is not None:
            key = api_key_from_env()
            options = {"mode": mode, "fusion": fusion, "weight": weight}
            run = ev.run_endpoint(endpoint, queries, api_key=key, refused=refused, **options)
            if not run:
                raise ev.EndpointError(f"{endpoint} refused every query, e.g. {next(iter(refused.values()))}")
        else:
            from pipelines import ingest as pipeline
            from pipelines.search import Searcher

            db = store.location(db, cfg.storage)
            db.check()
            if generation is None and not ev.corpus_ingested(db, beir_dir):
                result = pipeline.build(source=beir_dir / "corpus.jsonl", db=db, cfg=cfg)
                console.print(
                    f"ingested {result['docs']['ingested']} docs into {result['chunks']['written']} chunks "
                    f"in {result['wall_s']:.0f} s",
                    highlight=False,
                )
            searcher = Searcher(db, index=cfg.index, dtype=cfg.serve.query_dtype, generation=generation)
            if generation is not None:
                console.print(
                    f"generation {generation}: {searcher.manifest.model}, {searcher.manifest.shards} shards",
                    highlight=False,
                )
            if searcher.manifest.vectors == "mixed":
                console.print(
                    "note: this db mixes vectors of several numeric formats (embedding.allow_mixed_dtypes); "
                    "scores may differ from a db embedded in one.",
                    highlight=False,
                )
            run = ev.run_local(searcher, queries, mode=cfg.serve.default_mode, **_search_options(cfg))
        scores = ev.score(run, {qid: qrels[qid] for qid in run})
    except _user_errors() as exc:
        raise _fail(str(exc)) from exc
    if refused:
        # Scored over the queries the service answered; the refused ones are named, not hidden.
        scores["refused"] = len(refused)
        for qid, reason in sorted(refused.items()):
            console.print(f"query {qid} refused by the service: {reason}", highlight=False, markup=False)
        console.print(
            f"{len(refused)} of {len(queries)} queries refused by the service; "
            f"scores are over the other {len(run)}.",
            highlight=False,
        )
    if as_json:
        typer.echo(json.dumps({**scores, "refused_queries": refused} if refused else scores))
        return
    for name, value in scores.items():
        typer.echo(f"{name:>11}  {value}")


@app.command("index")
def index_command(
    ctx: typer.Context,
    db: DbOpt,
    config: ConfigOpt = None,
    rebuild: Annotated[bool, typer.Option("--rebuild", help="Rebuild indexes that already fit.")] = False,
    fts: Annotated[
        bool | None, typer.Option("--fts/--no-fts", help="Full-text indexes for hybrid search.")
    ] = None,
    address: AddressOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Index every shard for its size: exact search when small, an ANN index (IVF_RQ by default) when
    large, BM25 full-text indexes on title and text for hybrid search. One Ray task per shard: a
    cluster builds on all its nodes. An index that fits its shard takes new rows incrementally."""
    from pipelines import index as indexing
    from pipelines import store
    from pipelines.ray_session import ray_session

    started = time.time()

    def progress(summary: dict) -> None:
        if not as_json:
            done.append(summary)
            console.print(
                f"index: {len(done)}/{shards} shards, {summary['shard']} {summary['action']} "
                f"in {summary['seconds']} s ({time.time() - started:.0f} s)",
                highlight=False,
            )

    done: list[dict] = []
    try:
        cfg = load_config(
            config, **{"index.fts": fts, "ray.address": address, **(ctx.obj or {}).get("ray", {})}
        )
        loc = store.location(db, cfg.storage)
        loc.check()
        shards = store.read_manifest(loc).shards  # a missing db fails before Ray starts
        with ray_session(cfg.ray):
            summaries = indexing.build(
                loc, settings=cfg.index, rebuild=rebuild, lock=cfg.storage, progress=progress
            )
    except _user_errors() as exc:
        raise _fail(str(exc)) from exc
    if as_json:
        typer.echo(json.dumps(summaries))
        return
    for s in summaries:
        new = f", {s['new_rows']:,} new rows added" if s.get("new_rows") else ""
        vector = (
            "exact search (no ANN index)"
            if s["vector_index"] == "exact"
            else f"{s['vector_index']} {s['action']}{new} ({s['num_partitions']} partitions, query "
            f"{s['query_params']})"
        )
        c = s.get("codes")
        held = (
            f", in-memory codes {c['action']} (+{c['added']:,} -{c['removed']:,} rows, {c['partitions']} "
            f"partitions, {c['seconds']} s)"
            if c
            else ""
        )
        typer.echo(
            f"{s['shard']}: {s['rows']:,} rows, {vector}{held}, fts {s['fts'] or 'none'}, {s['seconds']} s"
        )
    typer.echo(f"indexed {len(summaries)} shards in {time.time() - started:.1f} s")


GenerationArg = Annotated[int, typer.Argument(help="A generation number (see `embedpipe generations`).")]
CommitEveryOpt = Annotated[
    float,
    typer.Option(
        "--commit-every-s",
        min=0.0,
        help="Commit what was built this often: what a crash keeps (resume builds the rest).",
    ),
]


class RebuildProgress:
    """Progress of a reshard or reembed: a spinner line on a terminal, a line every 15 s elsewhere."""

    def __init__(self, kind: str):
        self.kind, self.started, self.printed = kind, time.time(), 0.0

    def __call__(self, counts: dict) -> None:
        elapsed = time.time() - self.started
        if elapsed - self.printed >= Progress.EVERY_S:
            self.printed = elapsed
            console.print(
                f"{self.kind}: {counts['chunks']:,} chunks built, {counts['committed']:,} committed, "
                f"{elapsed:.0f} s",
                highlight=False,
            )


def _rebuilt(result: dict) -> None:
    passes = result["passes"]
    check = result["check"]
    embedded = result["embeddings"]
    console.print(
        f"generation {result['generation']} ({result['kind']} of {result['from_generation']}"
        f"{', resumed' if result['resumed'] else ''}): {result['shards']} shards of {result['model']} "
        f"(dim {result['dim']}), {check['docs']:,} documents, {check['chunks']:,} chunks, each once; "
        f"{embedded.get('computed', 0):,} embeddings computed"
        + (f", {embedded.get('cache_hits', 0):,} from the cache" if embedded.get("cache_hits") else "")
        + f"; {result['wall_s']:.1f} s ({len(passes)} passes: "
        + ", ".join(f"{p['docs']:,} docs" for p in passes)
        + ")",
        highlight=False,
        soft_wrap=True,
    )
    console.print(
        f"promote it with: embedpipe promote --db {result['db']} {result['generation']}",
        highlight=False,
        soft_wrap=True,
    )


def _build_generation(
    ctx: typer.Context, config: Path | None, address: str | None, as_json: bool, build
) -> None:
    """Load the config, run ``build(cfg)`` (reshard or reembed) and print its report or its error."""
    try:
        cfg = load_config(config, **{"ray.address": address, **(ctx.obj or {}).get("ray", {})})
        result = build(cfg)
    except _user_errors() as exc:
        raise _fail(str(exc)) from exc
    typer.echo(json.dumps(result, default=str)) if as_json else _rebuilt(result)


@app.command("reshard")
def reshard_command(
    ctx: typer.Context,
    db: DbOpt,
    shards: Annotated[int, typer.Option("--shards", help="The new shard count (1 or more).")],
    config: ConfigOpt = None,
    address: AddressOpt = None,
    commit_every_s: CommitEveryOpt = 30.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the build report as JSON.")] = False,
) -> None:
    """Build a new generation of the db with --shards shard tables from its stored chunks and vectors
    (no source read, no model run). It is not live until `embedpipe promote`."""
    from pipelines import rebuild

    def build(cfg):
        return rebuild.reshard(
            db=db, shards=shards, cfg=cfg, commit_every_s=commit_every_s, progress=RebuildProgress("reshard")
        )

    _build_generation(ctx, config, address, as_json, build)


@app.command("reembed")
def reembed_command(
    ctx: typer.Context,
    db: DbOpt,
    model: Annotated[
        str, typer.Option("--model", help="A sentence-transformers model id or directory to embed with.")
    ],
    shards: Annotated[
        int | None,
        typer.Option("--shards", help="The new generation's shard count (default: the live one's)."),
    ] = None,
    config: ConfigOpt = None,
    address: AddressOpt = None,
    commit_every_s: CommitEveryOpt = 30.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the build report as JSON.")] = False,
) -> None:
    """Build a new generation of the db embedded with --model from its stored chunk texts (no source
    read). Run it again after a crash to resume. It is not live until `embedpipe promote`."""
    from pipelines import rebuild

    def build(cfg):
        return rebuild.reembed(
            db=db, model=model, shards=shards, cfg=cfg, commit_every_s=commit_every_s,
            progress=RebuildProgress("reembed"),
        )  # fmt: skip

    _build_generation(ctx, config, address, as_json, build)


@app.command("promote")
def promote_command(
    ctx: typer.Context,
    generation: GenerationArg,
    db: DbOpt,
    config: ConfigOpt = None,
    address: AddressOpt = None,
) -> None:
    """Make GENERATION live, atomically: ingest writes it and a running `embedpipe serve` answers
    from it from then on. Documents ingested since it was built are caught up first."""
    from pipelines import rebuild

    try:
        cfg = load_config(config, **{"ray.address": address, **(ctx.obj or {}).get("ray", {})})
        result = rebuild.promote(db=db, generation=generation, cfg=cfg)
    except _user_errors() as exc:
        raise _fail(str(exc)) from exc
    if result["previous"] == generation:
        console.print(f"generation {generation} is live already", highlight=False)
        return
    caught = result["caught_up"]
    extra = (
        f" after catching up {caught['docs']} changed and {caught['stale_docs']} removed documents"
        if caught
        else ""
    )
    console.print(f"generation {generation} is live (was {result['previous']}){extra}", highlight=False)


@app.command("generations")
def generations_command(
    db: DbOpt,
    config: ConfigOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """List the db's generations: model, rows, shards, when made, and which is live."""
    from datetime import UTC, datetime

    from pipelines import rebuild

    try:
        cfg = load_config(config)
        listed = rebuild.generations(db, cfg)
    except _user_errors() as exc:
        raise _fail(str(exc)) from exc
    if as_json:
        typer.echo(json.dumps(listed))
        return
    for g in listed:
        created = (
            datetime.fromtimestamp(g["created"], UTC).strftime("%Y-%m-%d %H:%M") if g["created"] else "-"
        )
        rows = f"{g['rows']:,}" if g["rows"] is not None else "-"
        typer.echo(
            f"{'*' if g['live'] else ' '} {g['generation']:>3}  {g['state']:<8}  {g['shards']:>4} shards  "
            f"{rows:>11} rows  {g['vectors'] or '-':<5}  {g['model']} (dim {g['dim']})  "
            f"{g['made_by']}, {created}"
        )
    typer.echo("(* live)")


@app.command("drop")
def drop_command(generation: GenerationArg, db: DbOpt, config: ConfigOpt = None) -> None:
    """Delete GENERATION and its tables; the live one cannot be dropped."""
    from pipelines import rebuild

    try:
        cfg = load_config(config)
        dropped = rebuild.drop(db=db, generation=generation, cfg=cfg)
    except _user_errors() as exc:
        raise _fail(str(exc)) from exc
    console.print(
        f"dropped generation {generation} ({dropped.shards} shards of {dropped.model})", highlight=False
    )


@app.command("serve")
def serve_command(
    db: DbOpt,
    config: ConfigOpt = None,
    host: Annotated[str | None, typer.Option("--host", help="Bind address (default 127.0.0.1).")] = None,
    port: Annotated[
        int | None, typer.Option("--port", min=0, max=65535, help="HTTP port (default 8000).")
    ] = None,
    address: AddressOpt = None,
) -> None:
    """Serve POST /search, GET /healthz and /docs over HTTP with Ray Serve until interrupted.

    Set EMBEDPIPE_API_KEY_FILE (a file holding the key) or EMBEDPIPE_API_KEY to require
    ``Authorization: Bearer <key>`` on every endpoint but /healthz and the pages' HTML shells.
    """
    from serve import lean

    lean.skip_pandas()  # Ray Serve imports it for nothing this service does (serve.lean)
    from ray import serve

    from pipelines import store
    from pipelines.ray_session import ray_session
    from serve.app import ServeConfig, build_app

    try:
        cfg = load_config(config, **{"serve.host": host, "serve.port": port, "ray.address": address})
        key = api_key_from_env()
        serve_cfg = ServeConfig(db=db, settings=cfg.serve, index=cfg.index, storage=cfg.storage, api_key=key)
        loc = store.location(db, cfg.storage)
        loc.check()
        store.read_manifest(loc)  # a missing db or bucket fails before Ray starts
    except _user_errors() as exc:
        raise _fail(str(exc)) from exc
    if cfg.ray.address is None and not os.environ.get("RAY_ADDRESS"):
        _check_port_free(cfg.serve.host, cfg.serve.port)  # Serve's proxy would fail on it without a word
    # Serve reads these when Ray starts, so they shape an embedded Ray only; set them on a cluster's nodes.
    os.environ.setdefault("RAY_SERVE_THROUGHPUT_OPTIMIZED", "1")
    # No idle worker started ahead for the driver's tasks (it runs none; 87 MB of RSS otherwise)
    os.environ.setdefault("RAY_prestart_worker_first_driver", "0")
    ingress, hardened = cfg.serve.ingress, None
    if ingress == "auto":
        ingress = "haproxy" if shutil.which("haproxy") else "python"
    if ingress == "haproxy" and not (cfg.ray.address or os.environ.get("RAY_ADDRESS")):
        from serve.ingress import haproxy_environment

        try:
            hardened = haproxy_environment()
        except FileNotFoundError as exc:
            raise _fail(str(exc)) from exc
        os.environ.update(hardened)
        atexit.register(shutil.rmtree, Path(hardened["RAY_SERVE_HAPROXY_SOCKET_PATH"]).parent, True)
        os.environ["RAY_SERVE_ENABLE_HA_PROXY"] = "1"
    with ray_session(cfg.ray, worker_setup=lean.HOOK, ray_data=False):
        try:  # with Ray up: the layout is checked against the cluster's resources
            application = build_app(serve_cfg)
        except _user_errors() as exc:
            raise _fail(str(exc)) from exc
        try:
            serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
            serve.run(application, name="embedpipe", route_prefix="/")
        except Exception as exc:  # noqa: BLE001 - Ray's own errors; the details are in Ray's logs
            last = [line for line in str(exc).splitlines() if line.strip()][-1:] or [type(exc).__name__]
            message = f"the service did not start: {last[0].strip()[:300]} (details: Ray's serve logs)"
            raise _fail(message) from exc
        console.print(
            f"serving {db} on http://{cfg.serve.host}:{cfg.serve.port} through the {ingress} ingress "
            "(POST /search, GET /healthz, /metrics, /docs); Ctrl-C stops",
            highlight=False,
        )
        # SIGTERM (a service manager, kill) stops it as Ctrl-C does: Serve shuts down and takes its
        # proxy with it; HAProxy, started by Ray, would otherwise outlive it and keep the port.
        signal.signal(signal.SIGTERM, _interrupt)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            serve.shutdown()
        finally:
            if hardened:
                _stop_processes_under(Path(hardened["RAY_SERVE_HAPROXY_SOCKET_PATH"]).parent)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _stop_processes_under(root: Path) -> None:
    """Terminate the HAProxy processes run from ``root`` (the private dir of this service's HAProxy)."""
    import psutil

    for proc in psutil.process_iter(["cmdline"]):
        if any(str(root) in part for part in proc.info["cmdline"] or []):
            proc.terminate()


def _check_port_free(host: str, port: int) -> None:
    """Fail in one line when the port is taken, unless what holds it is the HAProxy of an embedpipe
    service that died (serve.ingress.orphaned_haproxy): that one is ended, and said so."""
    import socket

    import psutil

    from serve.ingress import end_orphan, orphaned_haproxy

    def bind() -> OSError | None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, port))
            except OSError as exc:
                return exc
        return None

    failed = bind()
    orphan = orphaned_haproxy(port) if failed else None
    if orphan is not None:
        try:
            end_orphan(orphan)
        except (OSError, psutil.Error) as exc:
            raise _fail(
                f"cannot serve on {host}:{port}: an HAProxy left by an embedpipe service that died holds it "
                f"(pid {orphan.pid}) and could not be stopped ({exc}); end it with `kill {orphan.pid}`"
            ) from None
        console.print(
            f"ended pid {orphan.pid}, an HAProxy left on port {port} by an embedpipe service that died",
            highlight=False,
        )
        failed = bind()
    if failed is not None:
        raise _fail(f"cannot serve on {host}:{port}: {failed.strerror} (another service there? use --port)")


@app.command("sample-corpus")
def sample_corpus(
    out_dir: Annotated[Path, typer.Argument(help="Directory to write the sample documents into.")],
) -> None:
    """Write a real sample corpus that needs no download: Python's reference topics (pydoc_data)."""
    from pipelines.sources import write_pydoc_topics

    count = write_pydoc_topics(out_dir)
    console.print(f"wrote {count} documents to {out_dir}", highlight=False)


@app.command("report")
def report_command(
    run_json: Annotated[
        Path, typer.Argument(exists=True, dir_okay=False, help="A run report: DB/_runs/RUN_ID.json.")
    ],
    html: Annotated[
        Path | None, typer.Option("--html", dir_okay=False, help="Write the run's dashboard page here.")
    ] = None,
    png: Annotated[
        Path | None, typer.Option("--png", dir_okay=False, help="Write the run's charts as an image here.")
    ] = None,
) -> None:
    """Turn a run report into a standalone dashboard page (charts inline) and a chart image.

    With neither --html nor --png, print the run's headline numbers.
    """
    from pipelines.reporting import pages
    from pipelines.reporting.report import summary_table

    try:
        report = json.loads(run_json.read_text())
        if not isinstance(report, dict):
            raise ValueError("not a run report (a JSON object)")
        if html is None and png is None:
            Console().print(summary_table(report))
            return
        if html is not None:
            html.parent.mkdir(parents=True, exist_ok=True)
            html.write_text(pages.run_page(report))
            console.print(f"wrote {html}", highlight=False)
        if png is not None:
            png.parent.mkdir(parents=True, exist_ok=True)
            pages.write_png(report, png)
            console.print(f"wrote {png}", highlight=False)
    except (ValueError, KeyError, TypeError, OSError) as exc:
        raise _fail(f"cannot render {run_json}: {exc}") from exc


@app.command("quantize")
def quantize_command(
    source: Annotated[
        str,
        typer.Argument(help="The corpus to calibrate on (a sample of its chunks is used); local or s3://."),
    ],
    config: ConfigOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Quantize again even if one is cached.")] = False,
) -> None:
    """Make the int8 OpenVINO model that dtype int8 uses, calibrated on chunks of SOURCE.

    It is cached (embedding.model_cache, $EMBEDPIPE_CACHE or ~/.cache/embedpipe) for every later run.
    Ingest does this by itself on first use; run it ahead to keep the first ingest's time clean.
    """
    from pipelines import ingest as pipeline
    from pipelines import sources
    from pipelines.embedding import backends, setup
    from pipelines.ray_session import ray_session

    try:
        cfg = load_config(config, **{"ray.progress_bars": False})
        source = sources.resolve(source, cfg.storage)
        sources.check_exists(source, cfg.storage)
        target = backends.int8_dir(backends.cache_root(cfg.embedding.model_cache), cfg.embedding.model)
        if force and target.exists():
            shutil.rmtree(target)
        with ray_session(cfg.ray):
            path, meta = setup.int8_model(pipeline.sample(source, cfg), cfg)
        if path is None:
            raise ValueError(meta["reason"])
    except _user_errors() as exc:
        raise _fail(str(exc)) from exc
    console.print(
        f"int8 model: {path} (calibrated on {meta['calibration_texts']} chunks, {meta['quantize_s']} s)",
        highlight=False,
    )


@app.command("bench")
def bench_command(
    source: Annotated[
        Path, typer.Argument(exists=True, help="A BEIR directory (scores nDCG@10) or a corpus file/dir.")
    ],
    config: ConfigOpt = None,
    workdir: Annotated[
        Path, typer.Option("--workdir", help="Where the bench db (and its int8 model) live.")
    ] = Path(".embedpipe-bench"),
    limit: Annotated[
        int | None, typer.Option("--limit", min=1, help="Use only the first N documents (no nDCG then).")
    ] = None,
    json_out: Annotated[
        Path | None, typer.Option("--json", dir_okay=False, help="Write the figures here.")
    ] = None,
    png: Annotated[Path | None, typer.Option("--png", dir_okay=False, help="Write a chart here.")] = None,
    baseline: Annotated[
        Path | None,
        typer.Option("--baseline", exists=True, dir_okay=False, help="A saved --json to compare with."),
    ] = None,
    fail_on_regression: Annotated[
        bool, typer.Option("--fail-on-regression", help="Exit 4 when a figure is >10% below the baseline.")
    ] = False,
    repeat: Annotated[
        int,
        typer.Option(
            "--repeat",
            min=1,
            help="Run every phase N times in a row; the ratios are the medians, with their range.",
        ),
    ] = 1,
) -> None:
    """Time (a) a plain fp32 encode loop, (b) the same loop in the pipeline's dtype, (c) the full
    pipeline and (d) a re-ingest of the unchanged corpus, on the same texts; print the ratios."""
    from pipelines import bench

    try:
        cfg = load_config(config, **{"ray.progress_bars": False})
        source = source.resolve()
        if limit is not None:
            corpus, _ = bench.corpus_of(source)
            if corpus.suffix != ".jsonl":
                raise ValueError("--limit needs a JSONL corpus (or a BEIR directory)")
            workdir.mkdir(parents=True, exist_ok=True)
            sample = workdir / f"first-{limit}.jsonl"
            with corpus.open() as src, sample.open("w") as dst:
                for _, line in zip(range(limit), src, strict=False):
                    dst.write(line)
            source = sample.resolve()
        result = bench.run_repeated(source, workdir=workdir, cfg=cfg, repeat=repeat)
        if baseline is not None:
            result["regressions"] = bench.compare(result, json.loads(baseline.read_text()))
    except _user_errors() as exc:
        raise _fail(str(exc)) from exc
    Console().print(bench.table(result))
    Console().print(bench.plain_table(result))
    typer.echo(bench.ratios_text(result))
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(bench.dumps(result))
    if png is not None:
        bench.write_png(result, png)
    for worse in result.get("regressions", []):
        console.print(
            f"[bold red]regression:[/] {worse['figure']} {worse['now']} vs baseline {worse['baseline']} "
            f"({worse['change']:+.0%})",
            highlight=False,
        )
    if result.get("regressions") and fail_on_regression:
        raise typer.Exit(4)


@app.command("plan")
def plan_command(
    docs: Annotated[int, typer.Option("--docs", min=1, help="Documents to plan for.")],
    db: Annotated[
        str | None, typer.Option("--db", help="Plan from this db's latest run.", envvar="EMBEDPIPE_DB")
    ] = None,
    report: Annotated[
        Path | None, typer.Option("--report", exists=True, dir_okay=False, help="Plan from this run report.")
    ] = None,
    qps: Annotated[
        float | None, typer.Option("--qps", min=0.001, help="Queries per second to serve.")
    ] = None,
    nodes: Annotated[int | None, typer.Option("--nodes", min=1, help="Embedding nodes/GPUs to use.")] = None,
    hours: Annotated[
        float | None, typer.Option("--hours", min=0.001, help="Finish within this time.")
    ] = None,
    hourly_usd: Annotated[
        float | None, typer.Option("--hourly-usd", min=0, help="Price per node-hour (default: config cost).")
    ] = None,
    shards: Annotated[
        int | None, typer.Option("--shards", min=1, help="Shards to plan serving for (default: the run's).")
    ] = None,
    serve_nodes: Annotated[
        int, typer.Option("--serve-nodes", min=1, help="Nodes that serve the shards.")
    ] = 1,
    config: ConfigOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan as JSON.")] = False,
) -> None:
    """Estimate time, nodes/GPUs, storage and cost for --docs documents from a measured run, and the
    memory each serving node holds for them (its processes and, per row, its index)."""
    from pipelines import plan, store

    if (db is None) == (report is None):
        raise _fail("give exactly one of --db and --report", EXIT_USAGE)
    try:
        cfg = load_config(config)
        if report is not None:
            run = json.loads(report.read_text())
        else:
            loc = store.location(db, cfg.storage)
            loc.check()
            run = plan.latest_report(loc)
        db_bytes = dim = None
        if run.get("db") and (db is not None or store.is_uri(run["db"]) or Path(run["db"]).is_dir()):
            run_db = store.location(run["db"] if db is None else db, cfg.storage)
            if store.is_db(run_db):
                db_bytes = sum(
                    obj["size"] for name in run.get("shards", {}) for obj in run_db.list(f"{name}.lance/")
                )
                dim = store.read_manifest(run_db).dim
        if hourly_usd is None and cfg.cost.hourly_usd:
            hourly_usd = cfg.cost.hourly_usd
        result = plan.plan(
            run,
            docs=docs,
            qps=qps,
            nodes=nodes,
            hours=hours,
            hourly_usd=hourly_usd,
            db_bytes=db_bytes,
            dim=dim or run.get("dim"),
            shards=shards,
            serve_nodes=serve_nodes,
            index=cfg.index,
        )
    except (*_user_errors(), OSError, json.JSONDecodeError) as exc:
        raise _fail(str(exc)) from exc
    if as_json:
        typer.echo(json.dumps(result, indent=2))
    else:
        typer.echo(plan.format_plan(result))


if __name__ == "__main__":
    app()
