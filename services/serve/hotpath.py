"""The plain list request, answered in front of FastAPI's routing.

Nearly all traffic is `GET /recommendations/{user_id}` with at most `k` and `offset`, both
plain integers, and most of it is a cache hit. For those requests FastAPI's routing and
per-request parameter solving cost as much as everything else a hit does, so this ASGI
layer answers them itself: the same service calls as the route (`begin`, then `answer`
on the event loop, hit or miss), the same body and headers.
Anything else (another path or method, any other parameter, a value out of the
documented range, a repeated name, no model loaded) goes on to FastAPI untouched, which
validates it, answers its errors and documents the route. The bounds are the schema's.
"""

from __future__ import annotations

from typing import Any

from services.serve.recommend import ListRequest, NoModel, Pending
from services.serve.schemas import MAX_ID, MAX_K, MAX_OFFSET

PREFIX = "/recommendations/"
BOUNDS = {b"k": (1, MAX_K), b"offset": (0, MAX_OFFSET)}


def _plain_int(text: bytes | str, low: int, high: int) -> int | None:
    """`text` as an int in [low, high] when it is written plainly (digits, no sign, no
    leading zero but "0" itself), else None."""
    if (not text.isascii() or not text.isdigit() or len(text) > 10
            or (len(text) > 1 and text[:1] in ("0", b"0"))):
        return None
    value = int(text)
    return value if low <= value <= high else None


def plain_request(path: str, query: bytes) -> ListRequest | None:
    """The list request of a plain URL, or None when FastAPI must look at it."""
    user_id = _plain_int(path[len(PREFIX):], 1, MAX_ID)
    if user_id is None:
        return None
    values = {b"k": 10, b"offset": 0}
    seen: set[bytes] = set()
    for pair in query.split(b"&") if query else ():
        name, equals, text = pair.partition(b"=")
        bounds = BOUNDS.get(name)
        if bounds is None or not equals or name in seen:
            return None
        seen.add(name)
        value = _plain_int(text, *bounds)
        if value is None:
            return None
        values[name] = value
    return ListRequest(user_id, values[b"k"], values[b"offset"], (), ())


class PlainListPath:
    """ASGI middleware: answers plain list requests, passes everything else on."""

    def __init__(self, app: Any, runtime: Any, route: Any) -> None:
        self.app = app
        self.runtime = runtime
        self.route = route  # the FastAPI route it stands for (metrics label by its path)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if (scope["type"] == "http" and scope["method"] == "GET"
                and scope["path"].startswith(PREFIX)):
            ask = plain_request(scope["path"], scope["query_string"])
            if ask is not None:
                try:
                    pending = self.runtime.service.begin(ask)
                except NoModel:  # FastAPI answers it (503, documented)
                    pass
                else:
                    await self._answer(pending, scope, send)
                    return
        await self.app(scope, receive, send)

    async def _answer(self, pending: Pending, scope: dict[str, Any], send: Any) -> None:
        body = await self.runtime.service.answer(pending)
        scope["route"] = self.route
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-length", str(len(body)).encode()),
            (b"content-type", b"application/json"),
            (b"x-request-id", pending.request_id.encode())]})
        await send({"type": "http.response.body", "body": body})
