"""Impression logging off the request path: a buffer, and a thread that ships batches.

`log` appends a tuple to a deque (no I/O, no parsing); the thread wakes as soon as
IMPRESSION_BATCH lists wait and ships full batches only, or every IMPRESSION_FLUSH_SECONDS
and ships everything, handing them to the ingest service's `ingest.impressions` task. A
message per full batch keeps the publishing cost per list small under load (a thread that
shipped whatever trickled in during the last publish would send a message per few lists).
When the broker is unreachable the lists stay buffered (up to a bound, oldest dropped
first, counted) and go with the next flush.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from services.serve.metrics import IMPRESSIONS

log = logging.getLogger(__name__)
Sender = Callable[[list[dict[str, Any]]], None]
Pending = tuple[str, int, bytes, int, str, str, float]


class ImpressionLogger:
    """Buffers served lists and flushes them in batches from a background thread."""

    def __init__(self, send: Sender, flush_seconds: float = 1.0, batch: int = 200,
                 max_pending: int = 100_000) -> None:
        self.send = send
        self.flush_seconds = flush_seconds
        self.batch = batch
        self._pending: deque[Pending] = deque(maxlen=max_pending)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def log(self, request_id: str, user_id: int, items: bytes, version: int, variant: str,
            source: str) -> None:
        """Record one served list (items: comma-separated movie ids); costs an append."""
        if len(self._pending) == self._pending.maxlen:
            IMPRESSIONS.labels("dropped").inc()
        self._pending.append((request_id, user_id, items, version, variant, source,
                              time.time()))
        if len(self._pending) >= self.batch:
            self._wake.set()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="serve-impressions", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 10.0) -> None:
        """Stop the thread after a last flush (bounded by `timeout`)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            full = self._wake.wait(self.flush_seconds)
            self._wake.clear()
            self.flush(partial=not full or self._stop.is_set())
        self.flush()

    def flush(self, partial: bool = True) -> int:
        """Send what is buffered in batches of IMPRESSION_BATCH, and the last, smaller one
        too when `partial`; returns the lists sent."""
        sent = 0
        while len(self._pending) >= (1 if partial else self.batch):
            chunk: list[Pending] = []
            while self._pending and len(chunk) < self.batch:
                chunk.append(self._pending.popleft())
            try:
                self.send([_as_task_item(p) for p in chunk])
            except Exception as error:  # broker down or refusing: keep them for next time
                self._pending.extendleft(reversed(chunk))
                log.warning("impressions not sent, %d kept for the next flush: %s",
                            len(self._pending), error)
                return sent
            IMPRESSIONS.labels("sent").inc(len(chunk))
            sent += len(chunk)
        return sent


def _as_task_item(pending: Pending) -> dict[str, Any]:
    # Items stay the comma-separated ids and the time a Unix timestamp: the ingest worker
    # parses them, so serve's processes spend as little as possible per list.
    request_id, user_id, items, version, variant, source, served = pending
    return {"request_id": request_id, "user_id": user_id, "items": items.decode(),
            "model_version": version, "variant": variant, "source": source,
            "served_at": served}
