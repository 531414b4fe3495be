"""Per-replica request guard, run before FastAPI sees a request: Host header, API key, method, body size.

State lives in this module and is reached through ``import`` at call time: Serve ships the FastAPI app
to replicas by value, so module globals captured by the app's functions would be copies.
"""

import contextlib
import hmac
import ipaddress
import re
import socket

from fastapi import Request
from fastapi.responses import JSONResponse

# /healthz, and the HTML shells of the web pages (serve/ui.py): they hold no data, their scripts fetch
# it with the key. They answer GET (and HEAD) only.
OPEN_PATHS = {"/healthz", "/", "/runs"}
OPEN_PATTERN = re.compile(r"/runs/[^/]+")
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}
_state: dict = {"api_key": None, "max_body": 65536, "hosts": None, "limits": {}}


def configure(
    *,
    api_key: str | None,
    max_body_bytes: int,
    allowed_hosts: set[str] | None = None,
    limits: dict[str, int] | None = None,
) -> None:
    """Args:
    api_key: the bearer key every closed path needs; None: no key.
    max_body_bytes: larger bodies are a 413, cut off without reading the rest.
    allowed_hosts: host names a request's Host header may carry (any port); None or "*" in it: any.
    limits: the request limits the OpenAPI document states (max_k, max_query_chars).
    """
    hosts = None if allowed_hosts is None or "*" in allowed_hosts else {h.lower() for h in allowed_hosts}
    _state.update(api_key=api_key.encode() if api_key else None, max_body=max_body_bytes, hosts=hosts)
    _state["limits"] = dict(limits or {})


def limits() -> dict[str, int]:
    return _state["limits"]


def allowed_hosts(bind: str, extra: list[str]) -> set[str]:
    """The Host names a service bound to ``bind`` answers: loopback names, the bind address itself,
    and ``extra`` (serve.allowed_hosts). Checking them stops DNS rebinding, where a web page on
    another name reaches a service on 127.0.0.1 through the victim's browser."""
    hosts = set(LOOPBACK_NAMES) | {bind.lower().strip("[]")} | {h.lower() for h in extra}
    if _is_wildcard(bind):
        hosts |= _machine_names()  # bound to every interface: this machine's own names and addresses
    return hosts - {"0.0.0.0", "::"}


def authorized(request: Request) -> bool:
    """Whether the request carries the key (always true when the service has none)."""
    key = _state["api_key"]
    if key is None:
        return True
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key)


async def check(request: Request) -> JSONResponse | None:
    """A 400, 401, 405 or 413 response for a request that must not go further, else None."""
    if not _host_allowed(request.headers.get("host", "")):
        return JSONResponse({"detail": "Host header not allowed (see serve.allowed_hosts)"}, status_code=400)
    path = request.url.path
    if path in OPEN_PATHS or OPEN_PATTERN.fullmatch(path):
        if request.method not in {"GET", "HEAD"}:
            return JSONResponse(
                {"detail": f"{request.method} is not allowed here"}, status_code=405, headers={"Allow": "GET"}
            )
        return None  # no body is read for an open path
    if not authorized(request):
        return JSONResponse(
            {"detail": "missing or wrong API key (Authorization: Bearer <key>)"},
            status_code=401,
            headers={"WWW-Authenticate": "Bearer"},
        )
    if request.method in {"POST", "PUT", "PATCH"}:
        return await _read_body(request)
    return None


async def _read_body(request: Request) -> JSONResponse | None:
    """Read the body in pieces and stop at max_body_bytes; Starlette hands what was read on to the
    endpoint. Serve's proxy streams bodies to replicas without a content-length, so count the bytes."""
    limit = _state["max_body"]
    too_big = JSONResponse({"detail": f"request body over max_body_bytes={limit}"}, status_code=413)
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        return too_big
    pieces, size = [], 0
    async for piece in request.stream():
        size += len(piece)
        if size > limit:
            return too_big
        pieces.append(piece)
    request._body = b"".join(pieces)  # what Request.body() caches; the endpoint reads it from there
    return None


def _host_allowed(header: str) -> bool:
    hosts = _state["hosts"]
    if hosts is None:
        return True
    header = header.strip().lower()
    if header.startswith("["):  # [::1]:8000
        name = header[1 : header.find("]")] if "]" in header else ""
    else:
        name = header.rsplit(":", 1)[0] if header.count(":") == 1 else header
    return bool(name) and name in hosts


def _machine_names() -> set[str]:
    names = {socket.gethostname(), socket.getfqdn()}
    with contextlib.suppress(OSError):  # a host name that does not resolve: its name alone
        names |= {info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None)}
    return {name.lower() for name in names if name}


def _is_wildcard(bind: str) -> bool:
    try:
        return ipaddress.ip_address(bind.strip("[]")).is_unspecified
    except ValueError:
        return False
