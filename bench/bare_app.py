"""The floor `bench/serve.py` compares serve's cache hits with: one Redis GET, returned.

A bare FastAPI app with the route shape of `GET /recommendations/{user_id}`, written the
two ways a FastAPI endpoint reads Redis: `/bare/{user_id}`, a sync route (run in the
threadpool) doing one redis-py GET, and `/bare-async/{user_id}`, an async route awaiting
one redis.asyncio GET. Each returns the value the benchmark stored beforehand (a real
recommendations response, so the same size). No validation beyond the path, no
middleware, no model. The benchmark drives both and compares serve with the faster.

With `BARE_MODEL` (and `BARE_MODEL_SHA`) naming a factor model artifact, the floor of a
cache miss is there too: `/bare-score/{user_id}?k=&offset=`, an async route doing what
any miss must, one product of the user's factors with the item factors (the same arrays,
float32, items laid out as serve lays them) and a top k + offset, returned as JSON; no
cache, history, feedback, exclusions or fold-in.

    BARE_REDIS_URL=redis://127.0.0.1:6379/14 BARE_KEY=k uvicorn bench.bare_app:app
"""

from __future__ import annotations

import json
import os

import numpy as np
import redis
import redis.asyncio
from fastapi import FastAPI, HTTPException, Response

REDIS_URL = os.environ.get("BARE_REDIS_URL", "redis://127.0.0.1:6379/14")
KEY = os.environ.get("BARE_KEY", "bench:bare")

client = redis.Redis.from_url(REDIS_URL, socket_timeout=1.0, socket_connect_timeout=1.0)
# Made on first use, in the worker's event loop (connections belong to their loop).
async_client: redis.asyncio.Redis | None = None
app = FastAPI(title="bare", docs_url=None, redoc_url=None, openapi_url=None)


def _load_model() -> tuple[dict[int, int], np.ndarray, np.ndarray, np.ndarray] | None:
    """(user id -> row, user factors, item factors by row, item ids) of BARE_MODEL."""
    path = os.environ.get("BARE_MODEL")
    if not path:
        return None
    from threadpoolctl import threadpool_limits

    from shared.artifacts import read_artifact

    # As serve does: one BLAS thread per process, or the workers' pools fight for the cores
    # (seen here: 150 requests/s, p50 80 ms, against serve's 1,100 with one thread).
    threadpool_limits(1, "blas")
    arrays, _ = read_artifact(path, os.environ.get("BARE_MODEL_SHA", ""))
    users = {int(u): row for row, u in enumerate(np.asarray(arrays["user_ids"]).tolist())}
    user_factors = np.ascontiguousarray(arrays["user_factors"], dtype=np.float32)
    by_row = np.ascontiguousarray(np.asarray(arrays["item_factors"], dtype=np.float32).T)
    return users, user_factors, by_row, np.asarray(arrays["item_ids"], dtype=np.int64)


MODEL = _load_model()


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


@app.get("/bare-score/{user_id}")
async def bare_score(user_id: int, k: int = 10, offset: int = 0) -> Response:
    """One product and a top k + offset on the event loop, as JSON (BARE_MODEL's arrays)."""
    if MODEL is None:
        raise HTTPException(404, "no BARE_MODEL loaded")
    users, user_factors, by_row, item_ids = MODEL
    row = users.get(user_id)
    if row is None:
        raise HTTPException(404, f"user {user_id} is not in the model")
    scores = user_factors[row] @ by_row
    n = min(k + offset, len(scores))
    top = np.argpartition(-scores, n - 1)[:n]
    top = top[np.argsort(-scores[top], kind="stable")][offset:]
    items = [{"movie_id": int(m), "score": round(float(v), 6)}
             for m, v in zip(item_ids[top].tolist(), scores[top].tolist(), strict=True)]
    return Response(json.dumps({"user_id": user_id, "items": items}),
                    media_type="application/json")
