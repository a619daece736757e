"""The floor `bench/serve.py` compares serve's cache hits with: one Redis GET, returned.

A bare FastAPI app with the same route shape as `GET /recommendations/{user_id}`: a sync
route (run in the threadpool, as serve's is) that does one redis-py GET of a value the
benchmark stored beforehand (a real recommendations response, so the same size) and
returns it as the body. No validation beyond the path, no metrics middleware, no model.

    BARE_REDIS_URL=redis://127.0.0.1:6379/14 BARE_KEY=k uvicorn bench.bare_app:app
"""

from __future__ import annotations

import os

import redis
from fastapi import FastAPI, Response

REDIS_URL = os.environ.get("BARE_REDIS_URL", "redis://127.0.0.1:6379/14")
KEY = os.environ.get("BARE_KEY", "bench:bare")

client = redis.Redis.from_url(REDIS_URL, socket_timeout=1.0, socket_connect_timeout=1.0)
app = FastAPI(title="bare", docs_url=None, redoc_url=None, openapi_url=None)


@app.get("/bare/{user_id}")
def bare(user_id: int, k: int = 10, offset: int = 0) -> Response:
    """One Redis GET; the stored bytes as the response."""
    return Response(client.get(KEY) or b"", media_type="application/json")
