"""The API key check for writes and admin routes, and the request body size limit."""

from __future__ import annotations

import hmac
import json
from typing import Any

from fastapi import HTTPException, Request, Security
from fastapi.security import APIKeyHeader

from shared.settings import Settings

API_KEY_HEADER = APIKeyHeader(name="X-API-Key", auto_error=False,
                              description="The API_KEY setting; guards writes and admin routes.")


def key_matches(given: str | None, settings: Settings) -> None:
    """Raise 403 when no key is configured, 401 when it is missing or wrong."""
    expected = settings.api_key.get_secret_value()
    if not expected:
        raise HTTPException(403, "this server has no API_KEY configured, so writes and admin "
                                 "routes are disabled; set API_KEY (and FEEDBACK_ANONYMOUS=true "
                                 "to open feedback)")
    # compare_digest takes the same time wherever the first difference lies.
    if given is None or not hmac.compare_digest(given.encode(), expected.encode()):
        raise HTTPException(401, "missing or wrong X-API-Key header",
                            headers={"WWW-Authenticate": "X-API-Key"})


# Both checks are async (they only compare bytes): FastAPI runs a plain `def` dependency
# in its threadpool, one thread hop per request for nothing.
async def require_api_key(request: Request, given: str | None = Security(API_KEY_HEADER)
                          ) -> None:
    """Dependency of admin routes: the API key must be given."""
    key_matches(given, request.app.state.runtime.settings)


async def require_feedback_key(request: Request,
                               given: str | None = Security(API_KEY_HEADER)) -> None:
    """Dependency of POST /feedback: the API key, unless FEEDBACK_ANONYMOUS opens it."""
    settings = request.app.state.runtime.settings
    if not settings.feedback_anonymous:
        key_matches(given, settings)


class BodySizeLimit:
    """Refuse bodies over `limit` bytes with 413, by Content-Length or while streaming."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD"):
            await self.app(scope, receive, send)  # no body is read on these routes
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                too_large = int(declared) > self.limit
            except ValueError:
                await self._refuse(send, 400, "Content-Length is not a number")
                return
            if too_large:
                await self._refuse(send, 413, f"request body over {self.limit} bytes")
                return
            await self.app(scope, receive, send)
            return
        if b"chunked" not in headers.get(b"transfer-encoding", b""):
            await self.app(scope, receive, send)
            return
        # Chunked: read it all first (it is at most `limit` bytes), then replay it.
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                await self._refuse(send, 413, f"request body over {self.limit} bytes")
                return
            if not message.get("more_body"):
                break
        body = b"".join(chunks)
        sent = False

        async def replay() -> dict[str, Any]:
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    @staticmethod
    async def _refuse(send: Any, status: int, detail: str) -> None:
        body = json.dumps({"detail": detail}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})
