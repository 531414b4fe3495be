"""build_app(cfg) -> the Serve application: a Router that holds every shard (one node), or a Router in
front of shard-group deployments spread over a cluster's nodes (``serve.shard_groups``).

Start it with ``embedpipe serve --db DIR`` or the Ray way: ``serve run serve.app:build_app db=DIR``.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from ray.serve import Application

from pipelines import store
from pipelines.config import IndexSettings, ServeSettings, StorageConfig, api_key_from_env
from serve.group import ShardGroupSearcher
from serve.router import Router


class LayoutError(ValueError):
    """A layout whose CPU or resource reservations the cluster cannot meet."""


class ServeConfig(BaseModel):
    """Arguments of the application builder (``serve run serve.app:build_app db=...``)."""

    model_config = ConfigDict(extra="forbid")

    db: str = Field(..., description="The db written by embedpipe ingest: a folder or s3:// gs:// az://.")
    settings: ServeSettings = ServeSettings()
    storage: StorageConfig = StorageConfig()
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

    db = store.location(cfg.db, cfg.storage)  # replicas on other nodes open it the same way
    manifest = store.read_manifest(db)  # the live generation; the router follows later ones
    settings = cfg.settings
    groups = shard_groups(settings.shard_groups, shards=manifest.shards, nodes=_alive_nodes())
    check_fit(settings, groups, _cluster_resources())
    handles = [
        ShardGroupSearcher.options(
            name=f"ShardGroup-{g}",
            num_replicas=settings.shard_replicas,
            ray_actor_options={"num_cpus": settings.shard_cpus, "resources": settings.shard_resources},
            health_check_period_s=settings.health_check_period_s,
        ).bind(
            db,
            g,
            groups,
            settings.refresh_s,
            cfg.index.model_dump(),
            settings.memory_rows,
            settings.search_threads,
        )  # fmt: skip
        for g in range(groups)
    ]
    return Router.options(
        num_replicas=settings.router_replicas,
        max_ongoing_requests=settings.max_ongoing_requests,
        ray_actor_options={"num_cpus": settings.router_cpus, "num_gpus": settings.router_gpus},
        health_check_period_s=settings.health_check_period_s,
    ).bind(
        handles,
        settings=settings.model_dump(),
        db=db,
        api_key=cfg.api_key if cfg.api_key is not None else api_key_from_env(),
        dtype=cfg.dtype if cfg.dtype != "auto" else settings.query_dtype,
        index=cfg.index.model_dump(),
    )


def shard_groups(setting: int | str, *, shards: int, nodes: int) -> int:
    """How many shard-group deployments to run: 0 (the router holds every shard) on one node,
    else one group per node, never more groups than shards."""
    if setting == "auto":
        return 0 if nodes <= 1 else min(nodes, shards)
    return min(int(setting), shards)


def check_fit(settings: ServeSettings, groups: int, available: dict[str, float] | None) -> None:
    """Raise LayoutError, saying what to change, when the cluster's resources cannot hold the layout's
    reservations (Serve would wait for them for ever, answering nothing). ``available`` is
    ``ray.cluster_resources()``; None skips the check (no Ray yet: ``serve run`` starts it later)."""
    if available is None:
        return
    router_cpus = settings.router_cpus * settings.router_replicas
    group_cpus = settings.shard_cpus * settings.shard_replicas * groups
    cpus = available.get("CPU", 0.0)
    if router_cpus + group_cpus > cpus + 1e-9:
        raise LayoutError(
            f"the serve layout reserves {router_cpus + group_cpus:g} CPUs (router {settings.router_cpus:g} "
            f"x {settings.router_replicas} replicas + {groups} shard groups x {settings.shard_cpus:g} x "
            f"{settings.shard_replicas} replicas) but the cluster has {cpus:g}. Lower serve.shard_groups "
            "(0: the router holds every shard), serve.shard_cpus, serve.router_cpus or the replicas, "
            "or add nodes."
        )
    gpus = settings.router_gpus * settings.router_replicas
    if gpus > available.get("GPU", 0.0) + 1e-9:
        raise LayoutError(
            f"serve.router_gpus reserves {gpus:g} GPUs but the cluster has {available.get('GPU', 0.0):g}. "
            "Set serve.router_gpus: 0 (queries are then embedded on the CPU) or add GPU nodes."
        )
    if groups:
        for name, amount in settings.shard_resources.items():
            need = amount * settings.shard_replicas * groups
            if need > available.get(name, 0.0) + 1e-9:
                raise LayoutError(
                    f"{groups} shard groups x {settings.shard_replicas} replicas need {need:g} of the "
                    f"resource {name!r} (serve.shard_resources) but the cluster declares "
                    f"{available.get(name, 0.0):g}. Lower serve.shard_groups or declare it on more nodes "
                    f"(ray start --resources '{{\"{name}\": 1}}')."
                )


def _cluster_resources() -> dict[str, float] | None:
    import ray

    return ray.cluster_resources() if ray.is_initialized() else None


def _alive_nodes() -> int:
    import ray

    if not ray.is_initialized():
        return 1
    return sum(1 for node in ray.nodes() if node.get("Alive"))
