"""The Ray a command runs on: the one already initialized, a cluster's, or an embedded local one."""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator
from typing import Any

import ray

from pipelines.config import RayConfig
from pipelines.stderr_relay import relay_stderr


@contextlib.contextmanager
def ray_session(cfg: RayConfig, *, worker_setup: str | None = None, ray_data: bool = True) -> Iterator[None]:
    """Use the Ray already initialized, else connect to ``address`` / RAY_ADDRESS, else start one.

    Ray's own console output follows ``cfg.log_to_driver`` (the CLI's -v): by default the workers'
    logs stay in Ray's log dir and Ray Data's console handler shows errors only. ``worker_setup``
    (``module.function``) runs in every worker of an embedded Ray this starts, before its task or
    actor (Ray's ``worker_process_setup_hook``); a cluster's job sets its own runtime env.
    ``ray_data=False`` (the service) leaves Ray Data unimported.
    """
    if ray_data:
        quiet_ray_data(verbose=cfg.log_to_driver)
    if ray.is_initialized():
        yield
        return
    address = cfg.address or os.environ.get("RAY_ADDRESS") or "local"
    kwargs: dict[str, Any] = {
        "address": address,
        "logging_level": logging.INFO if cfg.log_to_driver else logging.WARNING,
        "log_to_driver": cfg.log_to_driver,
    }
    if address == "local":
        kwargs.update(num_cpus=cfg.num_cpus, include_dashboard=False)
        if worker_setup:
            kwargs["runtime_env"] = {"worker_process_setup_hook": worker_setup}
        if cfg.object_store_mb:
            kwargs["object_store_memory"] = cfg.object_store_mb * 2**20
        # Ray 2.60 turns token authentication on for a new local cluster and warns that it did,
        # each time; on is what we want. One filter however many runs this process makes.
        token_logger = logging.getLogger("ray._private.authentication.authentication_token_setup")
        if not any(isinstance(f, _TokenAuthNotice) for f in token_logger.filters):
            token_logger.addFilter(_TokenAuthNotice())
    with warnings.catch_warnings():
        # Ray starts its processes with fork+exec, which lancedb's fork hook cannot tell from a bare fork.
        warnings.filterwarnings("ignore", message="lancedb fork support", category=RuntimeWarning)
        ray.init(**kwargs)
    try:
        # Ray's C++ core prints one ERROR line per Ray Data actor pool that does not apply to Ray Data
        # (ray#53727); -v shows it, the relay's docstring says why it is dropped otherwise.
        with contextlib.nullcontext() if cfg.log_to_driver else relay_stderr():
            yield
    finally:
        ray.shutdown()


class _TokenAuthNotice(logging.Filter):
    """Drops Ray's "token authentication is enabled" notice; its "disabled" warning stays."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "authentication is enabled" not in record.getMessage()


def quiet_ray_data(*, verbose: bool) -> None:
    """Ray Data logs each dataset's plan and, off a terminal, its progress every few seconds, on
    a console handler of its own (the 'ray.data' logger does not propagate). Keep that handler to
    errors unless ``verbose``; its file handler (Ray's session log dir) keeps everything."""
    import ray.data  # noqa: F401  (configures the 'ray.data' logger)
    from ray.data._internal.logging import SessionFileHandler

    for handler in logging.getLogger("ray.data").handlers:
        if not isinstance(handler, logging.FileHandler | SessionFileHandler):
            handler.setLevel(logging.INFO if verbose else logging.ERROR)
