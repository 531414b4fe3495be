"""One pydantic model for every setting, loaded from YAML and validated once at the edge."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipelines.parsing import ParseLimits

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ReadConfig(_Strict):
    docs_per_block: int = Field(
        1000, gt=0, description="Rows per block when streaming JSONL; bounds read memory."
    )
    max_doc_mb: float = Field(
        64, gt=0, description="Documents larger than this are listed as failed, not read."
    )
    parse_timeout_s: float = Field(
        120,
        ge=0,
        description="Parsing one HTML or PDF file may take this long; past it the document is failed "
        "with its reason and the run goes on. 0: no deadline.",
    )
    parse_memory_mb: float = Field(
        2048,
        ge=0,
        description="Address space the process parsing one HTML or PDF file may use (its RLIMIT_AS; "
        "the parser itself takes ~130 MB); past it the document is failed. 0: no bound. With both "
        "limits 0, files are parsed in the read task itself.",
    )
    quick_check_s: float = Field(
        15,
        ge=0,
        description="Re-ingest into a db that has rows: first compare the source's content hashes in "
        "the driver, without Ray, for up to this long; when every document is unchanged (or fails to "
        "read) the run ends there. It stops at the first new or changed document. 0: off.",
    )

    def parse_limits(self) -> ParseLimits:
        return ParseLimits(timeout_s=self.parse_timeout_s, memory_mb=self.parse_memory_mb)


class ChunkingConfig(_Strict):
    max_tokens: int | None = Field(
        None,
        gt=8,
        description="Tokens per chunk, title included. Default: the model's max sequence length.",
    )
    overlap_tokens: int = Field(
        32, ge=0, description="Tokens repeated between neighbouring chunks of a long document."
    )
    docs_per_batch: int = Field(256, gt=0, description="Documents per chunking task batch.")
    num_cpus: float | None = Field(
        None,
        gt=0,
        description="CPUs each chunking task reserves. Set, chunking runs in tasks of its own beside the "
        "embedding actors, which then only embed; None (default) lets Ray Data fuse it into the actors, "
        "which on 2 cores was faster (SciFact 70.3 s fused, 72.3 s apart: the tasks slowed the passes).",
    )

    @model_validator(mode="after")
    def _overlap_below_max(self) -> ChunkingConfig:
        if self.max_tokens is not None and self.overlap_tokens >= self.max_tokens:
            raise ValueError(
                f"overlap_tokens ({self.overlap_tokens}) must be smaller than max_tokens ({self.max_tokens})"
            )
        return self


class EmbeddingConfig(_Strict):
    model: str = Field(
        DEFAULT_MODEL,
        min_length=1,
        description="A sentence-transformers model id or a local path. The default is bundled.",
    )
    dtype: Literal["auto", "fp32", "bf16", "fp16", "int8"] = Field(
        "auto",
        description="auto: fp16 on a GPU; on a CPU int8 (OpenVINO, quantized once and cached, see "
        "model_cache) when openvino is installed, else bf16 with native bf16 (AVX512-BF16/AMX), else fp32.",
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    engine: Literal["auto", "torch", "openvino"] = Field(
        "auto",
        description="What runs the model on a CPU. auto: measured once per machine "
        "(pipelines/embedding/autotune.py) with dtype auto choosing the precision too: the fastest "
        "whose vectors stay within cosine 0.995 of fp32. int8 always runs on OpenVINO; a GPU always on "
        "torch.",
    )
    openvino_streams: int = Field(
        2, gt=0, description="OpenVINO inference streams per CPU actor (throughput mode); 1: latency mode."
    )
    batch_size: int = Field(
        1024,
        gt=0,
        description="Chunks per Ray Data batch sent to an actor; more rows sort into passes of similar "
        "length, with less padding.",
    )
    batch_tokens: int = Field(
        8192, gt=0, description="Starting budget of padded tokens per forward pass (rows x longest row)."
    )
    min_batch_tokens: int = Field(256, gt=0, description="The budget never shrinks below this.")
    max_batch_tokens: int | None = Field(
        None,
        gt=0,
        description="The budget never grows above this. None: 16,384 on a CPU (a bigger pass is no "
        "faster there and holds more memory), 262,144 on a GPU; never below batch_tokens.",
    )
    adapt_batch: bool = Field(
        True, description="Grow the budget while throughput improves and memory allows; else keep it."
    )
    encode_batch_size: int = Field(
        32, gt=0, description="Texts per forward pass where texts are embedded directly (queries)."
    )
    cache: bool = Field(
        True, description="Reuse embeddings of texts embedded before (the _embed_cache table in the db)."
    )
    cache_flush_rows: int = Field(
        16_384, gt=0, description="The cache writer appends once this many new vectors have gathered..."
    )
    cache_flush_s: float = Field(
        5.0, gt=0, description="...or once the oldest has waited this long (what a killed run can lose)."
    )
    allow_mixed_dtypes: bool = Field(
        False,
        description="Let a run add vectors in another numeric format than the db holds (int8 on a CPU, "
        "fp16 on a GPU...). Off: such a run stops with an error; auto follows the db's format.",
    )
    model_cache: str | None = Field(
        None,
        description="Where the driver keeps quantized (int8) models. Default $EMBEDPIPE_CACHE or "
        "~/.cache/embedpipe; actors receive the model through Ray, so it need not be shared.",
    )
    calibration_chunks: int = Field(
        256, gt=0, description="Chunks of the corpus that calibrate int8 quantization."
    )
    min_actors: int = Field(1, gt=0, description="Smallest embedding actor pool.")
    max_actors: int | None = Field(
        None, gt=0, description="Largest actor pool. Default: one per GPU, else min_actors."
    )
    gpus_per_actor: float | None = Field(
        None, ge=0, description="Default: 1 when the cluster has GPUs, else 0."
    )
    cpu_threads: int | None = Field(
        None, gt=0, description="Torch threads per CPU actor. Default: all cores of its node."
    )
    resources: dict[str, float] = Field(
        default_factory=dict,
        description="Custom Ray resources per embedding actor, e.g. {embed_node: 1}: actors then run "
        "only on nodes started with that resource (ray start --resources).",
    )

    @model_validator(mode="after")
    def _pool_bounds(self) -> EmbeddingConfig:
        if self.max_actors is not None and self.max_actors < self.min_actors:
            raise ValueError(f"max_actors ({self.max_actors}) must be >= min_actors ({self.min_actors})")
        if not self.min_batch_tokens <= self.batch_tokens <= (self.max_batch_tokens or self.batch_tokens):
            raise ValueError(
                f"batch_tokens ({self.batch_tokens}) must lie between min_batch_tokens "
                f"({self.min_batch_tokens}) and max_batch_tokens ({self.max_batch_tokens})"
            )
        if self.dtype == "int8" and self.device == "cuda":
            raise ValueError("dtype int8 runs on the CPU (OpenVINO); on a GPU use fp16 or bf16")
        if self.dtype == "int8" and self.engine == "torch":
            raise ValueError("dtype int8 runs on OpenVINO: set engine to auto or openvino, or another dtype")
        if self.engine == "openvino" and self.device == "cuda":
            raise ValueError("engine openvino runs on the CPU; on a GPU use engine auto or torch")
        return self


class RayConfig(_Strict):
    address: str | None = Field(None, description="Ray cluster address; None starts an embedded local Ray.")
    num_cpus: int | None = Field(None, gt=0, description="CPUs for the embedded local Ray.")
    object_store_mb: int | None = Field(
        None, gt=0, description="Object store size of the embedded local Ray (Ray's default: 30% of RAM)."
    )
    data_object_store_limit_mb: int | None = Field(
        512,
        gt=0,
        description="Backpressure: Ray Data pauses reading when blocks in flight take more object store "
        "memory than this, so memory stays flat however large the corpus. None: Ray's default share.",
    )
    progress_bars: bool = Field(
        False, description="Ray Data's per-operator progress bars (embedpipe prints one progress line; -v)."
    )
    log_to_driver: bool = Field(
        False, description="Ray's and its workers' logs on the console (-v); they always go to Ray's log dir."
    )


STEM_LANGUAGES = (
    "Arabic", "Danish", "Dutch", "English", "Finnish", "French", "German", "Greek", "Hungarian", "Italian",
    "Norwegian", "Portuguese", "Romanian", "Russian", "Spanish", "Swedish", "Tamil", "Turkish",
)  # fmt: skip


class TextIndexSettings(_Strict):
    """How the keyword (BM25) index splits text into terms: LanceDB's full-text index options, under the
    same names. The same settings tokenize queries and the term statistics (pipelines/bm25.py)."""

    base_tokenizer: Literal["simple", "whitespace", "ngram"] = Field(
        "simple",
        description="simple: words split at punctuation and spaces; whitespace: at spaces only; ngram: "
        "overlapping character n-grams (Chinese, Japanese, Korean and other scripts without spaces).",
    )
    language: str = Field(
        "English",
        description=f"Stemming and stop words: one of {', '.join(STEM_LANGUAGES)}.",
    )
    stem: bool = Field(True, description="Reduce words to their stem (running -> run).")
    remove_stop_words: bool = Field(True, description="Drop the language's stop words (the, and, of).")
    ascii_folding: bool = Field(True, description="Fold accents away (café -> cafe).")
    lower_case: bool = Field(True, description="Match regardless of case.")
    max_token_length: int = Field(40, gt=0, description="Longer terms are dropped.")
    ngram_min_length: int = Field(2, gt=0, description="ngram only: the shortest n-gram.")
    ngram_max_length: int = Field(2, gt=0, description="ngram only: the longest n-gram.")

    @field_validator("language")
    @classmethod
    def _known_language(cls, value: str) -> str:
        for known in STEM_LANGUAGES:
            if value.lower() == known.lower():
                return known
        raise ValueError(f"Unsupported language: {value!r}. Supported: {', '.join(STEM_LANGUAGES)}.")

    @model_validator(mode="after")
    def _ngram_range(self) -> TextIndexSettings:
        if self.ngram_min_length > self.ngram_max_length:
            raise ValueError("ngram_min_length must be at most ngram_max_length")
        return self

    def options(self) -> dict[str, Any]:
        """The options as LanceDB's FTS index and ``lancedb.tokenize`` take them (the n-gram lengths
        at LanceDB's defaults unless the tokenizer is ngram, so that they never differ for nothing)."""
        options = self.model_dump()
        if self.base_tokenizer != "ngram":
            options.update(ngram_min_length=3, ngram_max_length=3)
        return options


class IndexSettings(_Strict):
    exact_below_rows: int = Field(
        20_000,
        ge=0,
        description="Shards with fewer rows keep exact search (held in memory by the process that serves "
        "them: a scan there beats LanceDB's per-query cost up to a few tens of thousands of rows).",
    )
    vector_index: Literal["ivf_rq", "ivf_sq", "ivf_pq", "ivf_hnsw_sq"] = Field(
        "ivf_rq",
        description="ANN index for larger shards, built by `embedpipe index` and kept in the db; its "
        "parameters follow from the shard's rows. ivf_rq: RaBitQ codes (rq_bits per dimension), the "
        "fastest to build and the smallest to hold (benchmarks/ann_recall.py).",
    )
    rows_per_partition: int = Field(
        1000, ge=16, description="IVF_RQ and IVF_SQ partitions: one per this many rows (at most 4096)."
    )
    rq_bits: int = Field(4, ge=1, le=8, description="IVF_RQ: bits per dimension of the RaBitQ codes.")
    probe_factor: float = Field(
        2.0,
        gt=0,
        description="IVF_RQ, IVF_SQ and IVF_PQ: a query searches probe_factor * sqrt(partitions) of them (at "
        "least min_nprobes), so the rows it scans grow as the square root of the shard's: 32 of 250 "
        "partitions, 71 of 1,250 (benchmarks/ann_recall.py: recall@10 0.97-0.99 at 1M and 10M rows here).",
    )
    min_nprobes: int = Field(20, gt=0, description="IVF partitions a query searches at the least.")
    fts: bool = Field(
        True, description="Full-text (BM25) indexes on title and text, for text and hybrid search."
    )
    text: TextIndexSettings = Field(
        default_factory=TextIndexSettings,
        description="How the full-text indexes split text into terms (language, stemming, n-grams).",
    )
    refine_factor: int | None = Field(
        2,
        gt=0,
        description="Re-rank refine_factor * k ANN candidates with exact distances (their vectors read from "
        "the table). 2 suffices for IVF_RQ's 4-bit codes; ivf_pq and ivf_hnsw_sq want about 5.",
    )
    ef: int = Field(200, gt=0, description="HNSW search breadth (at least k * refine_factor).")
    hnsw_probe_fraction: float = Field(
        0.5, gt=0, le=1, description="Share of IVF_HNSW_SQ partitions a query searches."
    )
    build_cpus: float = Field(
        1.0,
        gt=0,
        description="Ray CPUs reserved by each shard's index build: `embedpipe index` runs one Ray task per "
        "shard, so a cluster builds on every node and one machine builds CPUs / build_cpus shards at once.",
    )
    after_ingest: bool = Field(False, description="Run `embedpipe index` at the end of every ingest.")
    bm25_cache_mb: float = Field(
        32,
        ge=0,
        description="Keyword search: the term counts of rows it rescored lately, kept per searching "
        "process (MiB; ~1 KB a row), so that a row found again is not tokenized again. 0: none.",
    )
    bm25_postings: bool = Field(
        True,
        description="Keyword search of the shards a searching process holds in memory (serve.memory_rows): "
        "their rows' terms are kept there as postings lists (~1 KB a SciFact row, built in ~0.1 ms a row "
        "when the shards are loaded) and a query is scored from them, as fast as a vector query, with "
        "the same scores as through LanceDB's full-text index. false: through LanceDB (~1.4 ms of CPU "
        "a shard per query).",
    )
    codes: bool = Field(
        True,
        description="Also store, per indexed shard, faiss IVF codes (RaBitQ, codes_bits per dimension) that "
        "a searching process holds and probes in memory, re-ranking the candidates exactly with their "
        "vectors read from the table (pipelines/codes.py): ~10x less CPU per query than LanceDB's own ANN "
        "search here. Filtered queries, and shards without codes, use LanceDB's index.",
    )
    codes_bits: int | None = Field(
        None,
        ge=1,
        le=8,
        description="Bits per dimension of the in-memory RaBitQ codes. None: by the shard's rows, 4 below "
        "1M and 2 from 1M (re-ranking at least 5 x k candidates), so that 10M rows fit one node's memory "
        '(pipelines/codes.py, README "Search past RAM").',
    )
    codes_low_bits_refine: int = Field(
        5,
        gt=0,
        description="Candidates per result re-ranked exactly from codes of 2 bits or fewer (refine_factor is "
        "for the others): 5 x k gave recall@10 0.989 at 1M rows and 0.998 at 10M here, 2 x k 0.957 at 1M.",
    )
    codes_rows_per_partition: int = Field(
        128, ge=16, description="IVF partitions of the in-memory codes: one per this many rows."
    )
    codes_probe_factor: float = Field(
        0.7,
        gt=0,
        description="A query probes codes_probe_factor * sqrt(partitions) of the codes' partitions (at least "
        "min_nprobes): 32 of 1,979 at 253k rows (benchmarks/ann_recall.py).",
    )


class ServeSettings(_Strict):
    host: str = Field("127.0.0.1", description="Address the HTTP proxy binds; loopback by default.")
    ingress: Literal["auto", "python", "haproxy"] = Field(
        "auto",
        description="HTTP ingress of an embedded Ray. haproxy: Ray Serve's HAProxy (needs the haproxy "
        "binary), with its stats and metrics ports bound to 127.0.0.1 and its admin socket private "
        "(serve/ingress.py); ~3x faster per request than python, Serve's Python proxy. auto: haproxy "
        "when the binary is installed. On a cluster the nodes' own Ray settings decide.",
    )
    port: int = Field(8000, ge=0, le=65535)
    shard_groups: Literal["auto"] | Annotated[int, Field(ge=0)] = Field(
        "auto",
        description="How the shards are split among deployments. 0: the router holds every shard and "
        "searches them in-process (no deployment-handle call per query; the fastest on one node). "
        "N >= 1: N shard-group deployments, shards dealt round-robin, each searching its own side by "
        "side; the router merges their answers. auto: 0 on a one-node Ray, one group per node (at "
        "most one per shard) on a cluster.",
    )
    shard_replicas: int = Field(1, gt=0, description="Replicas of each shard-group deployment.")
    shard_cpus: float = Field(0.25, ge=0, description="Ray CPUs reserved per shard-group replica.")
    shard_resources: dict[str, float] = Field(
        default_factory=dict,
        description="Custom Ray resources per shard-group replica, e.g. {search_node: 1}: groups then run "
        "only on nodes that declare the resource, as many per node as its amount allows.",
    )
    search_threads: int | None = Field(
        None,
        gt=0,
        description="Threads searching a group's shards side by side (LanceDB and numpy release the "
        "GIL). None: 2 per shard, at least 4, at most 32.",
    )
    router_replicas: int = Field(1, gt=0)
    router_cpus: float = Field(0.5, ge=0, description="Ray CPUs reserved per router replica.")
    router_gpus: float = Field(
        0,
        ge=0,
        description="GPUs reserved per router replica. Queries are embedded on a GPU only when one is "
        "reserved here (a router never takes cuda:0 unasked); else on the CPU.",
    )
    router_threads: int = Field(
        2,
        gt=0,
        description="CPU threads for query embedding. A batch is embedded while the shards wait for "
        "it, so 2 beat 1 here (c=1 p50 28 vs 32 ms); torch threads spin-wait, so keep it small there.",
    )
    query_dtype: Literal["auto", "fp32", "bf16", "fp16", "int8"] = Field(
        "auto",
        description="Precision queries are embedded in, by Serve and embedpipe query alike. auto follows "
        "the documents where this machine runs their precision natively (int8 with VNNI/AMX and the "
        "cached int8 model, bf16 with AVX512-BF16/AMX), else fp32 on a CPU and fp16 on a GPU.",
    )
    query_engine: Literal["auto", "torch", "openvino"] = Field(
        "auto",
        description="What embeds fp32/bf16 queries on a CPU. auto: OpenVINO if installed (exported once "
        "per machine and cached; ~2x faster than torch for one short query). int8 queries always run "
        "on OpenVINO, GPU queries on torch. embedpipe query makes the same choice.",
    )
    max_ongoing_requests: int = Field(
        64, gt=0, description="Requests a router replica takes at once; bounds the embed batch too."
    )
    max_batch_size: int = Field(16, gt=0, description="Most queries embedded in one forward pass.")
    batch_wait_timeout_s: float = Field(
        0.0,
        ge=0,
        description="How long a batch waits to fill up. 0: it takes the queries that queued while the "
        "previous batch ran, so a lone query is never held back and batches grow with the load.",
    )
    allowed_hosts: list[str] = Field(
        default_factory=list,
        description="Host names clients use to reach the service, besides loopback, the bind address and "
        "(when bound to every interface) this machine's names; other Host headers are a 400, which stops "
        "DNS rebinding. '*' allows any.",
    )
    max_query_chars: int = Field(
        8192,
        gt=0,
        description="Longer queries are a 422. The model reads a query's first max_seq_length tokens "
        "(256 for the default model), as embedpipe query does; hybrid mode's BM25 reads all of it.",
    )
    max_k: int = Field(300, gt=0, le=10000, description="Larger k is a 422.")
    max_body_bytes: int = Field(65536, gt=0, description="Larger request bodies are a 413.")
    filter_columns: list[str] = Field(
        default_factory=list,
        description="Columns a filter may use besides doc_id, chunk_id, title, text and chunk_index: "
        "source and/or metadata (never returned by /search, so off by default).",
    )
    health_check_period_s: float = Field(
        2.0,
        gt=0,
        description="How often Serve checks each replica; a crashed one is replaced within about this "
        "long (Serve's default of 10 s left a killed shard's queries failing for 12 s).",
    )
    query_timeout_s: float = Field(
        10.0, gt=0, description="A query not answered in this time is a 504 (its batch's others are not)."
    )
    refresh_s: float = Field(
        1.0, ge=0, description="Shards look for new table versions this often (0: on every query)."
    )
    generation_poll_s: float = Field(
        2.0,
        gt=0,
        le=3600,
        description="The router reads the db's manifest this often to follow `embedpipe promote`: a newly "
        "live generation is opened beside the old one, which answers until the new one is ready.",
    )
    other_generations: int = Field(
        1,
        ge=0,
        le=16,
        description="Generations other than the live one that a router keeps open for requests that "
        "name one (the search page's generation picker); each holds its query model and shards.",
    )
    memory_rows: int = Field(
        50_000,
        ge=0,
        description="A shard without a vector index and with at most this many rows is held in memory by the "
        "process that searches it (its vectors, row ids, the columns an answer shows and, with "
        "index.bm25_postings, its rows' keyword postings: ~3.1 KB a SciFact row of a 384-dim model, never "
        "source or metadata) and scanned there, its group's held shards as "
        "one; 0: always through LanceDB. Shards `embedpipe index` gave an ANN index are searched through it "
        "(LanceDB's index cache holds their codes: ~230 B a row; their text is read for answers only). "
        "Filtered queries go to LanceDB either way.",
    )
    row_cache_mb: float = Field(
        64,
        ge=0,
        description="Result columns of rows that were in recent answers, kept per router replica (LRU, in "
        "MiB of their values) so that an answer whose rows are all there reads nothing from the tables; "
        "0 turns it off. It holds answers' rows only, and its bound does not grow with the db.",
    )
    default_mode: Literal["vector", "text", "hybrid"] = Field(
        "vector",
        description="Search mode of a request that names none: vector (cosine), text (BM25) or hybrid.",
    )
    hybrid_candidates: int = Field(
        50,
        gt=0,
        description="Vector and full-text candidates fused per hybrid query (at least k; also the chunks "
        "a collapse to one per document picks from). benchmarks/fusion.py: 50 scored as 100 did.",
    )
    fusion: Literal["convex", "rrf"] = Field(
        "convex",
        description="How hybrid mode fuses its two rankings when a request names none: convex (weighted "
        "normalized scores) or rrf (reciprocal rank). Chosen by benchmarks/fusion.py (README, Hybrid).",
    )
    fusion_weight: float = Field(
        0.8, ge=0.0, le=1.0, description="convex: the vector ranking's weight when a request names none."
    )
    rrf_k: int = Field(60, gt=0, description="Reciprocal rank fusion constant: 1 / (rrf_k + rank).")
    cache_size: int = Field(
        4096, ge=0, description="Cached responses per router replica; 0 turns the cache off."
    )
    cache_mb: float = Field(
        64, gt=0, description="Bytes of cached responses per router replica (their JSON size), in MiB."
    )
    cache_max_k: int = Field(100, ge=0, description="Answers with a larger k are not cached.")
    cache_ttl_s: float = Field(300.0, gt=0, description="A cached response is dropped after this long.")

    @model_validator(mode="after")
    def _known_filter_columns(self) -> ServeSettings:
        from pipelines.filters import allowed_columns

        allowed_columns(self.filter_columns)  # raises, naming the unknown ones
        return self


class StorageConfig(_Strict):
    """Object storage for a db or a source given as s3://, gs:// or az://. Credentials are never
    set here: they come from the environment (AWS_ACCESS_KEY_ID..., an instance profile,
    GOOGLE_APPLICATION_CREDENTIALS, AZURE_STORAGE_ACCOUNT_KEY...)."""

    endpoint: str | None = Field(
        None,
        description="An S3-compatible endpoint URL (MinIO, moto, Ceph...); default: AWS_ENDPOINT_URL.",
    )
    region: str | None = Field(None, description="The bucket's region; default: AWS_REGION.")
    allow_http: bool | None = Field(
        None, description="Allow a plain-http endpoint; default: true when endpoint starts with http://."
    )
    options: dict[str, str] = Field(
        {}, description="More LanceDB storage_options for gs:// or az:// (e.g. account_name); no secrets."
    )
    lock_lease_s: float = Field(
        60.0, ge=2, le=3600, description="Lease of the db's writer lock; a run renews it every quarter."
    )
    lock_wait_s: float = Field(
        3600.0,
        ge=0,
        description="How long a run waits for another that is writing the same db; 0: fail at once.",
    )

    @field_validator("endpoint")
    @classmethod
    def _endpoint_is_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError(f"endpoint must start with http:// or https://, got {value!r}")
        return value

    @field_validator("options")
    @classmethod
    def _no_secrets(cls, value: dict[str, str]) -> dict[str, str]:
        secret = [
            k for k in value if any(w in k.lower() for w in ("secret", "password", "token", "key", "sas"))
        ]
        if secret:
            raise ValueError(
                f"{', '.join(sorted(secret))}: credentials go in the environment, never in a config file"
            )
        return value


class CostConfig(_Strict):
    hourly_usd: float = Field(0.0, ge=0, description="Price of the cluster per hour, for the report.")


class Config(_Strict):
    shards: int = Field(4, gt=0, le=1024, description="Number of LanceDB tables to spread chunks over.")
    read: ReadConfig = ReadConfig()
    chunking: ChunkingConfig = ChunkingConfig()
    embedding: EmbeddingConfig = EmbeddingConfig()
    ray: RayConfig = RayConfig()
    index: IndexSettings = IndexSettings()
    serve: ServeSettings = ServeSettings()
    storage: StorageConfig = StorageConfig()
    cost: CostConfig = CostConfig()


class ConfigError(ValueError):
    """A config file that is missing, unreadable or invalid."""


def load_config(path: Path | None = None, **overrides: Any) -> Config:
    """Load and validate a YAML config, then apply dotted-key overrides.

    Args:
        path: YAML file; None gives the defaults.
        overrides: ``{"shards": 8, "ray.address": "auto"}``; None values are ignored.

    Returns:
        The validated config.
    """
    data: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except OSError as exc:
            raise ConfigError(f"Cannot read config {str(path)!r}: {exc.strerror}") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"Config {str(path)!r} is not valid YAML: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"Config {str(path)!r} must be a mapping, got {type(loaded).__name__}")
        data = loaded or {}
    for dotted, value in overrides.items():
        if value is None:
            continue
        node = data
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        where = f" in {str(path)!r}" if path else ""
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"Invalid config{where}: {problems}") from exc


def api_key_from_env(environ: Mapping[str, str] | None = None) -> str | None:
    """The service's API key: the contents of $EMBEDPIPE_API_KEY_FILE, or $EMBEDPIPE_API_KEY; None
    when neither is set. A file keeps the key off command lines (``ps``, ``ray job list`` show those).

    Raises:
        ConfigError: a variable that is set but empty (which would silently turn auth off), both set,
            or a file that cannot be read.
    """
    env = os.environ if environ is None else environ
    path, key = env.get("EMBEDPIPE_API_KEY_FILE"), env.get("EMBEDPIPE_API_KEY")
    if path is not None and key is not None:
        raise ConfigError("Set EMBEDPIPE_API_KEY or EMBEDPIPE_API_KEY_FILE, not both.")
    if path is not None:
        if not path.strip():
            raise ConfigError("EMBEDPIPE_API_KEY_FILE is set but empty; name the file that holds the key.")
        try:
            key = Path(path).expanduser().read_text().strip()
        except OSError as exc:
            raise ConfigError(f"Cannot read EMBEDPIPE_API_KEY_FILE: {exc.strerror}") from None
        if not key:
            raise ConfigError("The file named by EMBEDPIPE_API_KEY_FILE is empty; put the key in it.")
        return key
    if key is not None and not key.strip():
        raise ConfigError(
            "EMBEDPIPE_API_KEY is set but empty, which would turn authentication off; "
            "unset it to serve without a key, or set a key."
        )
    return key.strip() if key is not None else None
