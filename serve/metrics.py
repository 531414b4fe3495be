"""Prometheus metrics of one router replica, served at GET /metrics.

Like serve/guard.py, reach this module through ``import`` at call time (or keep a reference made in
the replica): Serve ships the FastAPI app by value, and metric objects must be the replica's own.
"""

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest

REGISTRY = CollectorRegistry()
# Known paths only, so that probes for random URLs cannot grow the label set without bound.
PATHS = {"/search", "/healthz", "/metrics", "/openapi.json", "/docs", "/", "/runs", "/api/runs"}

REQUESTS = Counter(
    "embedpipe_requests", "HTTP requests by path and status.", ["path", "status"], registry=REGISTRY
)
LATENCY = Histogram(
    "embedpipe_request_seconds",
    "Time from request to response inside the router replica.",
    ["path"],
    buckets=(0.002, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0, 2.5, 5.0),
    registry=REGISTRY,
)
CACHE = Counter(
    "embedpipe_cache_lookups",
    "Query cache lookups: hit, shared (joined an identical request in flight) or miss.",
    ["outcome"],
    registry=REGISTRY,
)
EMBED_BATCH = Histogram(
    "embedpipe_embed_batch_size",
    "Queries embedded per forward pass (@serve.batch).",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128),
    registry=REGISTRY,
)
SHARD_FANOUT = Histogram(
    "embedpipe_shard_fanout_seconds",
    "Time for every shard to answer one search.",
    buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0),
    registry=REGISTRY,
)


def observe(path: str, status: int, seconds: float) -> None:
    label = path if path in PATHS else "other"
    REQUESTS.labels(path=label, status=str(status)).inc()
    LATENCY.labels(path=label).observe(seconds)


def render() -> tuple[bytes, str]:
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
