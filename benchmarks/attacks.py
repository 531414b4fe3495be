"""Send hostile requests to a running ``embedpipe serve`` and print what came back, with the router's RSS.

python benchmarks/attacks.py --url http://127.0.0.1:8000 [--db DIR]

Each row: the attack, the request, the status and (the start of) the body, and the router replica's peak
RSS while it ran (psutil, on this machine). Run it against a service started with a key in
EMBEDPIPE_API_KEY_FILE or EMBEDPIPE_API_KEY (sent where an attack needs it). With --db, a body that holds
the db's path counts as a leak. Exits 1 if any answer is a 5xx or leaks.
"""

from __future__ import annotations

import argparse
import contextlib
import threading
import time
from collections.abc import Callable, Iterator

import psutil
import requests

LEAKS = ("Traceback", "lance error", "DataFusion", "/tmp/", "/home/", "/root/")


def _router() -> psutil.Process | None:
    for proc in psutil.process_iter(["cmdline"]):
        if any("ServeReplica:embedpipe:Router" in part for part in proc.info["cmdline"] or []):
            return proc
    return None


class _Peak:
    """The router's peak RSS while a block runs (sampled every 20 ms)."""

    def __init__(self, proc: psutil.Process | None):
        self.proc, self.peak, self._stop = proc, 0, threading.Event()

    def __enter__(self) -> _Peak:
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        while not self._stop.is_set():
            if self.proc is not None:
                with contextlib.suppress(psutil.Error):  # the process is gone: keep the peak seen
                    self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.02)


def _chunks(mib: int) -> Iterator[bytes]:
    piece = b"x" * (1 << 20)
    for _ in range(mib):
        yield piece


def attacks(url: str, key: str | None) -> list[tuple[str, str, Callable[[], requests.Response]]]:
    auth = {"Authorization": f"Bearer {key}"} if key else {}
    port = url.rsplit(":", 1)[-1]

    def search(body: dict, headers: dict | None = None) -> Callable[[], requests.Response]:
        merged = {**auth, **(headers or {})}
        return lambda: requests.post(f"{url}/search", json=body, headers=merged, timeout=120)

    def raw(method: str, path: str, data, headers: dict | None = None) -> Callable[[], requests.Response]:
        return lambda: requests.request(method, f"{url}{path}", data=data, headers=headers or {}, timeout=120)

    flt = lambda f: search({"query": "cancer", "k": 5, "filter": f})  # noqa: E731
    json_type = {**auth, "Content-Type": "application/json"}
    return [
        (
            "filter oracle on a hidden column",
            "filter: source LIKE '/home/alice%'",
            flt("source LIKE '/home/alice%'"),
        ),
        ("filter oracle on metadata", "filter: metadata LIKE '%secret%'", flt("metadata LIKE '%secret%'")),
        ("filter oracle on the vectors", "filter: vector[1] > 0.5", flt("vector[1] > 0.5")),
        ("schema echo", "filter: nosuchcolumn = 1", flt("nosuchcolumn = 1")),
        (
            "regex CPU burn",
            r"filter: regexp_like(repeat(text,200),'(\w+\s+){1,30}zz')",
            flt(r"regexp_like(repeat(text,200),'(\w+\s+){1,30}zz')"),
        ),
        ("memory burn", "filter: length(repeat(text,1000)) > 0", flt("length(repeat(text,1000)) > 0")),
        (
            "stacked statement",
            "filter: doc_id = 'a'; DROP TABLE shard_000",
            flt("doc_id = 'a'; DROP TABLE shard_000"),
        ),
        (
            "subquery",
            "filter: doc_id IN (SELECT doc_id FROM shard_000)",
            flt("doc_id IN (SELECT doc_id FROM shard_000)"),
        ),
        ("quote breakout", "filter: title = 'x'' OR 1=1 --'", flt("title = 'x'' OR 1=1 --'")),
        ("deep nesting", "filter: 900 x ( ... )", flt("(" * 900 + "doc_id='a'" + ")" * 900)),
        (
            "200 MiB chunked POST to an open path",
            "POST /healthz, 200 MiB, chunked",
            raw("POST", "/healthz", _chunks(200)),
        ),
        (
            "200 MiB chunked POST to /search",
            "POST /search, 200 MiB, chunked, key",
            raw("POST", "/search", _chunks(200), json_type),
        ),
        ("huge k", "k: 1000, mode: hybrid", search({"query": "cancer", "k": 1000, "mode": "hybrid"})),
        ("long query", "query: 9,000 characters", search({"query": "word " * 1800})),
        (
            "DNS rebinding",
            "Host: evil.example:" + port,
            search({"query": "x"}, {"Host": f"evil.example:{port}"}),
        ),
        ("no key", "POST /search without Authorization", search({"query": "x"}, {"Authorization": ""})),
        ("wrong key", "Authorization: Bearer nope", search({"query": "x"}, {"Authorization": "Bearer nope"})),
        ("health details without the key", "GET /healthz", raw("GET", "/healthz", None)),
        (
            "run report path probe",
            "GET /api/runs/../../etc/passwd",
            raw("GET", "/api/runs/..%2F..%2Fetc%2Fpasswd", None, auth),
        ),
        (
            "missing run",
            "GET /api/runs/20990101-000000-abcdef",
            raw("GET", "/api/runs/20990101-000000-abcdef", None, auth),
        ),
        ("bad JSON", "POST /search {not json", raw("POST", "/search", b"{not json", json_type)),
        ("unknown field", "extra: 1", search({"query": "x", "extra": 1})),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--db", default=None, help="the served db: its path in a body counts as a leak")
    args = parser.parse_args()
    from pipelines.config import api_key_from_env

    key = api_key_from_env()
    router = _router()
    base = router.memory_info().rss if router else 0
    print(f"router pid {router.pid if router else '?'}, RSS at start {base / 2**20:.0f} MiB\n")
    print("| attack | request | status | body | router peak RSS MiB | s |")
    print("|---|---|---|---|---|---|")
    bad = 0
    for name, request, send in attacks(args.url.rstrip("/"), key):
        started = time.perf_counter()
        with _Peak(router) as peak:
            try:
                response = send()
                status, body = str(response.status_code), response.text
            except requests.RequestException as exc:  # the service closed on a refused upload
                status, body = "closed", type(exc).__name__
        took = time.perf_counter() - started
        leaks = [w for w in LEAKS if w in body] + ([args.db] if args.db and args.db in body else [])
        bad += status.startswith("5") or bool(leaks)
        shown = body.replace("|", "\\|").replace("\n", " ")[:110]
        print(
            f"| {name} | `{request[:60]}` | {status} | `{shown}`{' LEAK ' + str(leaks) if leaks else ''} "
            f"| {peak.peak / 2**20:.0f} | {took:.2f} |"
        )
    print(f"\n{bad} answers were 5xx or leaked")
    raise SystemExit(1 if bad else 0)


if __name__ == "__main__":
    main()
