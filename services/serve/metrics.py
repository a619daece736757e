"""Prometheus metrics of serve, and the ASGI middleware that times every request.

With several uvicorn workers, `recsys serve` sets PROMETHEUS_MULTIPROC_DIR before the
workers start, so each worker writes its samples there and `/metrics` (answered by any
one worker) aggregates them all. Without it, each process reports only its own.
"""

from __future__ import annotations

import functools
import os
import time
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client import multiprocess as prometheus_multiprocess
from prometheus_client.registry import Collector

REQUESTS = Counter("recsys_serve_requests_total", "HTTP requests by route template, method "
                   "and status code.", ["route", "method", "status"])
LATENCY = Histogram("recsys_serve_request_duration_seconds", "HTTP request latency by route "
                    "template.", ["route", "method"],
                    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                             1.0, 2.5, 5.0, 10.0))
CACHE = Counter("recsys_serve_cache_total", "Recommendation cache look-ups: hit, miss, or "
                "error (Redis or the feedback journal failed, or was skipped after failing).",
                ["result"])
SERVED = Counter("recsys_serve_lists_total", "Recommendation lists served by source.",
                 ["source", "variant"])
FEEDBACK = Counter("recsys_serve_feedback_accepted_total", "Feedback events accepted (durably "
                   "queued) by type.", ["type"])
FEEDBACK_OUTBOX = Counter("recsys_serve_feedback_outbox_events_total", "Feedback events "
                          "kept in the outbox while the broker was down, and shipped from it "
                          "once confirmed.", ["action"])
IMPRESSIONS = Counter("recsys_serve_impression_lists_total", "Served lists handed to the "
                      "ingest service (sent), or dropped when the buffer overflowed.",
                      ["outcome"])
MODEL_VERSION = Gauge("recsys_serve_model_version", "Model version in use per variant (0: "
                      "none loaded).", ["variant"], multiprocess_mode="liveall")
MODEL_LOADS = Counter("recsys_serve_model_loads_total", "Model loads by outcome.", ["outcome"])
SCORE_BATCH = Histogram("recsys_serve_score_batch_users", "Trained users scored together "
                        "by one matrix product (cache misses reaching scoring at once).",
                        buckets=(1, 2, 4, 8, 16, 32, 64))
DEGRADED = Counter("recsys_serve_degraded_total", "Answers computed without a dependency.",
                   ["dependency"])


@functools.lru_cache(maxsize=4096)
def child(metric: Any, *labels: str) -> Any:
    """The labelled child of a metric, looked up once: `labels()` takes a lock and checks
    the values on every call, which the per-request paths need not pay."""
    return metric.labels(*labels)


def render(extra: Collector | None = None) -> tuple[bytes, str]:
    """The exposition text: every worker's samples in multiprocess mode, else this one's,
    plus `extra` (the online figures, read from the database at scrape time)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        prometheus_multiprocess.MultiProcessCollector(registry)
    else:
        registry = REGISTRY
    body = generate_latest(registry)
    if extra is not None:
        scrape = CollectorRegistry()
        scrape.register(extra)
        body += generate_latest(scrape)
    return body, CONTENT_TYPE_LATEST


class MetricsMiddleware:
    """Counts and times requests by route template (never the raw path: bounded labels)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_and_note(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            method = scope.get("method", "")
            child(REQUESTS, template, method, str(status)).inc()
            child(LATENCY, template, method).observe(time.perf_counter() - started)
