"""Per-replica request guard: API key and body size, checked before FastAPI validates a body.

State lives in this module and is reached through ``import`` at call time: Serve ships the FastAPI app
to replicas by value, so module globals captured by the app's functions would be copies.
"""

import hmac
import re

from fastapi import Request
from fastapi.responses import JSONResponse

# /healthz, and the HTML shells of the web pages (serve/ui.py): they hold no data, their scripts fetch
# it with the key.
OPEN_PATHS = {"/healthz", "/", "/runs"}
OPEN_PATTERN = re.compile(r"/runs/[^/]+")
_state: dict = {"api_key": None, "max_body": 65536}


def configure(*, api_key: str | None, max_body_bytes: int) -> None:
    _state.update(api_key=api_key.encode() if api_key else None, max_body=max_body_bytes)


async def check(request: Request) -> JSONResponse | None:
    """A 401 or 413 response for a request that must not go further, else None."""
    key = _state["api_key"]
    path = request.url.path
    if key is not None and path not in OPEN_PATHS and not OPEN_PATTERN.fullmatch(path):
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key):
            return JSONResponse(
                {"detail": "missing or wrong API key (Authorization: Bearer <key>)"},
                status_code=401,
                headers={"WWW-Authenticate": "Bearer"},
            )
    # Serve's proxy streams bodies to replicas without a content-length, so measure the body itself
    # (Starlette hands the body read here on to the endpoint).
    if request.method in {"POST", "PUT", "PATCH"} and len(await request.body()) > _state["max_body"]:
        return JSONResponse(
            {"detail": f"request body over max_body_bytes={_state['max_body']}"}, status_code=413
        )
    return None
