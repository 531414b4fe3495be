"""build_app(cfg) -> the Serve application: one ShardSearcher per shard behind one Router.

Start it with ``embedpipe serve --db DIR`` or the Ray way: ``serve run serve.app:build_app db=DIR``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from ray.serve import Application

from pipelines import store
from pipelines.config import IndexSettings, ServeSettings, api_key_from_env
from serve.router import Router
from serve.shard import ShardSearcher


class ServeConfig(BaseModel):
    """Arguments of the application builder (``serve run serve.app:build_app db=...``)."""

    model_config = ConfigDict(extra="forbid")

    db: str = Field(..., description="The db directory written by embedpipe ingest.")
    settings: ServeSettings = ServeSettings()
    index: IndexSettings = IndexSettings()
    api_key: str | None = Field(
        None,
        min_length=1,
        description="Bearer key; default from EMBEDPIPE_API_KEY_FILE or EMBEDPIPE_API_KEY (an empty one "
        "is refused, not taken as 'no key').",
    )
    device: str = Field(
        "auto",
        description="Where queries are embedded: the router's reserved GPU (serve.router_gpus) "
        "or the CPU; 'cuda' without router_gpus is refused.",
    )
    dtype: str = "auto"


def build_app(cfg: ServeConfig | dict[str, Any]) -> Application:
    """The search application over every shard of ``cfg.db``.

    Args:
        cfg: the db, serve settings and optional API key; ``serve run serve.app:build_app db=DIR``
            passes them as a dict of strings.

    Returns:
        A bound Serve application; pass it to ``serve.run``.
    """
    cfg = ServeConfig.model_validate(cfg) if isinstance(cfg, dict) else cfg
    if cfg.device == "cuda" and not cfg.settings.router_gpus:
        raise ValueError("device 'cuda' for queries needs a reserved GPU: set serve.router_gpus (e.g. 1).")

    db = cfg.db if "://" in cfg.db else str(Path(cfg.db).expanduser().resolve())  # replicas run elsewhere
    manifest = store.read_manifest(db)
    settings = cfg.settings
    shards = [
        ShardSearcher.options(
            name=f"ShardSearcher-{store.shard_name(i)}",
            num_replicas=settings.shard_replicas,
            ray_actor_options={"num_cpus": settings.shard_cpus, "resources": settings.shard_resources},
            health_check_period_s=settings.health_check_period_s,
        ).bind(db, store.shard_name(i), settings.refresh_s, cfg.index.model_dump(), settings.memory_rows)
        for i in range(manifest.shards)
    ]
    return Router.options(
        num_replicas=settings.router_replicas,
        max_ongoing_requests=settings.max_ongoing_requests,
        ray_actor_options={"num_cpus": settings.router_cpus, "num_gpus": settings.router_gpus},
        health_check_period_s=settings.health_check_period_s,
    ).bind(
        shards,
        model=manifest.model,
        settings=settings.model_dump(),
        api_key=cfg.api_key if cfg.api_key is not None else api_key_from_env(),
        dtype=cfg.dtype,
        db=db,
    )
