"""The floor `bench/serve.py` compares serve's cache hits with: one Redis GET, returned.

A bare FastAPI app with the route shape of `GET /recommendations/{user_id}`, written the
two ways a FastAPI endpoint reads Redis: `/bare/{user_id}`, a sync route (run in the
threadpool) doing one redis-py GET, and `/bare-async/{user_id}`, an async route awaiting
one redis.asyncio GET. Each returns the value the benchmark stored beforehand (a real
recommendations response, so the same size). No validation beyond the path, no
middleware, no model. The benchmark drives both and compares serve with the faster.

    BARE_REDIS_URL=redis://127.0.0.1:6379/14 BARE_KEY=k uvicorn bench.bare_app:app
"""

from __future__ import annotations

import os

import redis
import redis.asyncio
from fastapi import FastAPI, Response

REDIS_URL = os.environ.get("BARE_REDIS_URL", "redis://127.0.0.1:6379/14")
KEY = os.environ.get("BARE_KEY", "bench:bare")

client = redis.Redis.from_url(REDIS_URL, socket_timeout=1.0, socket_connect_timeout=1.0)
# Made on first use, in the worker's event loop (connections belong to their loop).
async_client: redis.asyncio.Redis | None = None
app = FastAPI(title="bare", docs_url=None, redoc_url=None, openapi_url=None)


@app.get("/bare/{user_id}")
def bare(user_id: int, k: int = 10, offset: int = 0) -> Response:
    """One blocking Redis GET in the threadpool; the stored bytes as the response."""
    return Response(client.get(KEY) or b"", media_type="application/json")


@app.get("/bare-async/{user_id}")
async def bare_async(user_id: int, k: int = 10, offset: int = 0) -> Response:
    """One awaited Redis GET on the event loop; the stored bytes as the response."""
    global async_client
    if async_client is None:
        async_client = redis.asyncio.Redis.from_url(REDIS_URL, socket_timeout=1.0,
                                                    socket_connect_timeout=1.0)
    return Response(await async_client.get(KEY) or b"", media_type="application/json")
