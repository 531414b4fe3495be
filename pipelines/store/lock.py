"""The db's writer lock: one run writes a db at a time, on a local disk or an object store alike.

Object stores have no flock and no atomic rename, but they have a conditional put: "create this key
unless it exists" (S3's ``If-None-Match: *``; GCS and Azure have the same). The lock is a sequence of
lease objects ``_lock/writer/<n>.json``: the holder of the highest n holds the lock while its lease
is fresh, and renews it from a thread. A run that finds the highest lease released or expired takes
the lock by creating lease n+1, and since only one create of a key can succeed, only one contender
gets it. The highest lease is never deleted (a holder removes only older ones), so n only grows.

A lease whose holder ran on this machine (same host, boot id and pid namespace) in a process that is
gone is stale at once:
a killed run on one machine does not make the next run wait out its lease. Expiry compares the
holder's clock with a contender's, so machines writing one db need clocks within a small part of a
lease of each other (NTP keeps them within milliseconds).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

from pipelines.store.location import Location, LocationError

logger = logging.getLogger(__name__)

PREFIX = "_lock/writer/"


class LockTimeout(LocationError):
    """Another run held the db's writer lock for longer than this run would wait."""


class LockLost(LocationError):
    """This run's lease ran out and another run took the lock: this run must not commit."""


def _machine() -> dict[str, str]:
    """What makes a pid mean one process: the kernel's boot, the host and the pid namespace (two
    containers on one host share the boot id but not their pids)."""
    found = {"host": socket.gethostname()}
    for key, path in (("boot_id", "/proc/sys/kernel/random/boot_id"), ("pid_ns", "/proc/self/ns/pid")):
        try:
            found[key] = os.readlink(path) if key == "pid_ns" else open(path).read().strip()  # noqa: SIM115
        except OSError:
            found[key] = ""
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class WriterLock:
    """Hold the writer lock of ``db`` (a context manager; see the module doc)."""

    def __init__(self, db: Location, *, run_id: str, lease_s: float = 60.0, wait_s: float = 3600.0):
        self.db, self.run_id, self.lease_s, self.wait_s = db, run_id, lease_s, wait_s
        self.number: int | None = None
        self.token = secrets.token_hex(8)
        self._stop = threading.Event()
        self._lost = threading.Event()
        self._thread: threading.Thread | None = None
        self._renewed = 0.0  # time.monotonic() of the last lease written

    def _body(self, *, released: bool = False) -> bytes:
        return json.dumps(
            {
                "run_id": self.run_id,
                "token": self.token,
                **_machine(),
                "pid": os.getpid(),
                "expires": time.time() + self.lease_s,
                "released": released,
            }
        ).encode()

    def _name(self, number: int) -> str:
        return f"{PREFIX}{number:012d}.json"

    def _leases(self) -> list[int]:
        numbers = []
        for obj in self.db.list(PREFIX):
            name = obj["path"].rsplit("/", 1)[-1]
            if name.endswith(".json") and name[:-5].isdigit():
                numbers.append(int(name[:-5]))
        return sorted(numbers)

    def holder(self) -> tuple[int, dict[str, Any] | None]:
        """The highest lease number and its content (None when it is free: none, released, expired, or
        held by a process that is gone on this machine)."""
        leases = self._leases()
        if not leases:
            return 0, None
        top = leases[-1]
        data = self.db.read_json(self._name(top))
        if not data or data.get("released") or float(data.get("expires", 0)) < time.time():
            return top, None
        here = _machine()
        same = all(data.get(k) == here[k] and here[k] for k in ("host", "boot_id", "pid_ns"))
        if same and not _alive(int(data.get("pid", 0))):
            return top, None
        return top, data

    def acquire(self) -> None:
        deadline, told = time.monotonic() + self.wait_s, False
        while True:
            top, holder = self.holder()
            if holder is None:
                if not self.db.create(self._name(top + 1), self._body()):
                    continue  # another run created it first: look again
                # A contender that stalled between its look and its create could have made a number
                # that others passed meanwhile: only the highest lease holds.
                if self._leases()[-1] == top + 1:
                    self.number, self._renewed = top + 1, time.monotonic()
                    break
                self.db.delete(self._name(top + 1))
                continue
            if time.monotonic() > deadline:
                raise LockTimeout(
                    f"{self.db.uri} is being written by run {holder.get('run_id')} (pid {holder.get('pid')} "
                    f"on {holder.get('host')}); waited {self.wait_s:.0f} s (storage.lock_wait_s)."
                )
            if not told:
                logger.warning(
                    "waiting for run %s (pid %s on %s), which is writing %s",
                    holder.get("run_id"), holder.get("pid"), holder.get("host"), self.db.uri,
                )  # fmt: skip
                told = True
            time.sleep(min(1.0, max(self.lease_s / 10, 0.05)))
        # Older leases are history, but the one just before ours stays: a stalled contender's create
        # of that number then fails instead of succeeding a second time.
        with contextlib.suppress(Exception):
            for old in self._leases():
                if old < self.number - 1:
                    self.db.delete(self._name(old))
        self._thread = threading.Thread(target=self._renew, name="embedpipe-lease", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        while not self._stop.wait(self.lease_s / 4):
            try:
                if self._newest() != self.number:
                    self._lost.set()
                    return
                self.db.write_bytes(self._name(self.number), self._body())
                self._renewed = time.monotonic()
            except Exception as exc:  # a blip; the next renewal may get through before the lease ends
                logger.warning("could not renew the db's writer lease: %s", exc)

    def _newest(self) -> int | None:
        leases = self._leases()
        return leases[-1] if leases else None

    def check(self) -> None:
        """Raise LockLost if another run took the lock or this run's lease may have run out (call
        before every write to the db's tables or files)."""
        if self.number is None:
            return
        expired = time.monotonic() - self._renewed > self.lease_s * 0.9
        if self._lost.is_set() or expired or self._newest() != self.number:
            self._lost.set()
            raise LockLost(
                f"run {self.run_id} lost the writer lock of {self.db.uri} (its lease of {self.lease_s:.0f} s "
                "ran out or could not be renewed); nothing more is written. Run it again."
            )

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.lease_s)
        if self.number is not None and not self._lost.is_set():
            with contextlib.suppress(Exception):
                self.db.write_bytes(self._name(self.number), self._body(released=True))
        self.number = None

    def __enter__(self) -> WriterLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


@contextlib.contextmanager
def writer_lock(
    db: Location, *, run_id: str, lease_s: float = 60.0, wait_s: float = 3600.0
) -> Iterator[WriterLock]:
    with WriterLock(db, run_id=run_id, lease_s=lease_s, wait_s=wait_s) as lock:
        yield lock
