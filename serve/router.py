"""The ingress: validates a request, embeds the query (batched), fans out to every shard, merges.

The ``app`` object is the FastAPI application Serve wraps; its OpenAPI document is at /openapi.json.
No ``from __future__ import annotations`` here: FastAPI must see the real request and response types.
"""

import asyncio
import logging
import time
from typing import Any, Literal

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve.handle import DeploymentHandle

from pipelines.config import ServeSettings
from serve.merge import merge_topk
from serve.shard import FilterError

logger = logging.getLogger(__name__)

VERSION = "0.1.0"


class SearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    query: str = Field(..., min_length=1, description="Text to search for.")
    k: int = Field(10, ge=1, le=1000, description="How many chunks to return.")
    filter: str | None = Field(
        None, max_length=2000, description="SQL predicate over doc_id, source, title, metadata..."
    )
    mode: Literal["vector"] | None = Field(None, description="Search mode; default from config.")


class Hit(BaseModel):
    chunk_id: str
    doc_id: str
    title: str
    text: str
    score: float = Field(..., description="Cosine similarity; higher is better.")
    shard: str


class SearchResponse(BaseModel):
    results: list[Hit]
    took_ms: float


class ShardHealth(BaseModel):
    shard: str
    rows: int
    version: int


class Health(BaseModel):
    status: Literal["ok"]
    model: str
    shards: list[ShardHealth]
    rows: int


class ErrorBody(BaseModel):
    # A message, or FastAPI's list of field errors for a 422.
    detail: str | list[dict[str, Any]]


app = FastAPI(
    title="embedpipe search",
    version=VERSION,
    description="Semantic search over embedpipe's sharded LanceDB tables.",
)


@app.middleware("http")
async def _guard_requests(request: Request, call_next):
    from serve import guard  # imported here: see serve/guard.py

    problem = await guard.check(request)
    return problem if problem is not None else await call_next(request)


@app.exception_handler(HTTPException)
async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if exc.status_code == 401 else None
    return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=headers)


@serve.deployment
@serve.ingress(app)
class Router:
    """Ingress deployment.

    Args:
        shards: handles of the ShardSearcher deployments, one per shard.
        model: the model id the db was embedded with (queries must use the same one).
        settings: serve settings (limits, batching).
        api_key: when set, every endpoint but /healthz needs ``Authorization: Bearer <key>``.
    """

    def __init__(
        self,
        shards: list[DeploymentHandle],
        *,
        model: str,
        settings: dict[str, Any],
        api_key: str | None = None,
        device: str = "auto",
        dtype: str = "auto",
    ):
        from pipelines.embedding import Embedder

        self.shards = shards
        self.model = model
        self.settings = ServeSettings.model_validate(settings)
        # The guard middleware runs before FastAPI validates a body, so a request without the key is a
        # 401 whatever it holds. One replica per process: module state is this replica's.
        from serve import guard

        guard.configure(api_key=api_key, max_body_bytes=self.settings.max_body_bytes)
        self.embedder = Embedder(model=model, device=device, dtype=dtype)
        self._embed.set_max_batch_size(self.settings.max_batch_size)
        self._embed.set_batch_wait_timeout_s(self.settings.batch_wait_timeout_s)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.003)
    async def _embed(self, texts: list[str]) -> list[np.ndarray]:
        # The forward pass blocks; a thread keeps the event loop serving other requests meanwhile.
        vectors = await asyncio.to_thread(self.embedder.encode, texts)
        return list(vectors)

    @app.post(
        "/search",
        response_model=SearchResponse,
        responses={400: {"model": ErrorBody}, 401: {"model": ErrorBody}, 413: {"model": ErrorBody},
                   422: {"model": ErrorBody}},
    )  # fmt: skip
    async def search(self, body: SearchRequest) -> SearchResponse:
        """Embed the query, search every shard concurrently, and return the global top-k."""
        started = time.perf_counter()
        if len(body.query) > self.settings.max_query_chars:
            raise HTTPException(422, f"query is {len(body.query)} characters, over max_query_chars="
                                     f"{self.settings.max_query_chars}")  # fmt: skip
        if body.k > self.settings.max_k:
            raise HTTPException(422, f"k={body.k} is over max_k={self.settings.max_k}")
        vector = await self._embed(body.query)
        try:
            per_shard = await asyncio.gather(
                *(shard.search.remote(vector, body.k, body.filter) for shard in self.shards)
            )
        except FilterError as exc:
            raise HTTPException(400, str(exc).splitlines()[-1].split("FilterError: ")[-1]) from None
        merged = merge_topk(list(per_shard), k=body.k)
        hits = merged.select(["chunk_id", "doc_id", "title", "text", "score", "shard"]).to_pylist()
        return SearchResponse(
            results=[Hit(**hit) for hit in hits], took_ms=round((time.perf_counter() - started) * 1000, 3)
        )

    @app.get("/healthz", response_model=Health)
    async def healthz(self) -> Health:
        """Shards, their rows and table versions, and the model."""
        stats = await asyncio.gather(*(shard.stats.remote() for shard in self.shards))
        return Health(
            status="ok",
            model=self.model,
            shards=[ShardHealth(**s) for s in stats],
            rows=sum(s["rows"] for s in stats),
        )
