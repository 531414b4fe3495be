"""What the processes of an embedded `embedpipe serve` skip at start (a Ray worker setup hook).

Every Ray worker imports pyarrow when it sets up its serialization context (to register Ray Data's
Arrow serializers), and Ray Serve's own actors (controller, proxy, HAProxy manager) import pandas for
one thing: encoding a pandas DataFrame that a deployment returns as JSON. Nothing in this service
needs either there: its deployments return bytes and dicts (shard groups send Arrow IPC bytes), and
the router imports pyarrow for LanceDB on its own, never pandas (LanceDB imports it lazily, for
``to_pandas``). Measured here: ``import ray.serve`` 234 MB of max RSS, 136 MB without the two; each of
Serve's three own actors was ~250 MB.

Kept tiny on purpose: Ray imports this module in every worker of the service before its actor.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from typing import Any

HOOK = "serve.lean.worker_setup"

logger = logging.getLogger(__name__)


class _Skip:
    """A meta path finder under which importing one of ``names`` raises ModuleNotFoundError, as where
    it is not installed (a None in ``sys.modules``, the usual trick, breaks pyarrow's pandas shim)."""

    def __init__(self, *names: str):
        self.names = set(names)

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
        if name.partition(".")[0] in self.names:
            raise ModuleNotFoundError(f"No module named {name!r} (skipped by embedpipe serve)", name=name)


@contextlib.contextmanager
def _skipping(*names: str) -> Iterator[None]:
    finder = _Skip(*names)
    sys.meta_path.insert(0, finder)
    try:
        yield
    finally:
        sys.meta_path.remove(finder)


def skip_pandas() -> None:
    """Keep pandas out of this process (the service's CLI, before it imports Ray Serve)."""
    if "pandas" not in sys.modules and not any(isinstance(f, _Skip) for f in sys.meta_path):
        sys.meta_path.insert(0, _Skip("pandas"))


def worker_setup() -> None:
    """Keep pandas out of this worker, and set up Ray's serialization context without pyarrow (Ray
    then registers no Arrow serializers, which this service does not use; pyarrow itself stays
    importable for LanceDB)."""
    skip_pandas()
    if "pyarrow" in sys.modules:
        return
    try:
        import ray._private.worker

        with _skipping("pyarrow"):
            ray._private.worker.global_worker.get_serialization_context()
    except Exception:  # noqa: BLE001 - Ray's internals moved: the worker only keeps pyarrow loaded
        logger.debug("Ray's serialization context was not set up early", exc_info=True)
