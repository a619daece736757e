"""The feedback outbox: events serve accepted while RabbitMQ could not confirm them.

A SQLite file under DATA_PATH in WAL mode with `synchronous=FULL`, so a row is on disk
(fsync'd) when `add` returns, and every process of a serve replica (its uvicorn workers)
writes and drains the same file. A drainer claims rows for a lease, publishes them with
publisher confirms and deletes them only after the confirm; a drainer that dies holding a
claim leaves the rows to the next one once the lease runs out. A row shipped twice (a
confirm that came after the lease, or a crash between the confirm and the delete) is
stored once all the same: the ingest service skips event ids it already holds.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from shared.errors import RecsysError

Events = list[dict[str, Any]]
OUTBOX_FILE = "feedback-outbox.sqlite3"  # under DATA_PATH
# Longer than any bounded publish (connect, confirm, one reconnect), so a live drainer's
# claim never runs out while it ships.
LEASE_SECONDS = 30.0
_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    events TEXT NOT NULL,
    size INTEGER NOT NULL,
    added_at REAL NOT NULL,
    claimed_until REAL NOT NULL DEFAULT 0
)
"""


class OutboxUnavailable(RecsysError):
    """The outbox file cannot be opened or written."""


class FeedbackOutbox:
    """Durable rows of feedback events awaiting a confirmed publish; safe across threads
    (a connection per thread) and processes (SQLite's locking)."""

    def __init__(self, path: Path, lease_seconds: float = LEASE_SECONDS) -> None:
        self.path = path
        self.lease_seconds = lease_seconds
        self._local = threading.local()
        try:  # create the file and table now: a bad path stops start-up, saying which
            path.parent.mkdir(parents=True, exist_ok=True)
            self._connection()
        except (sqlite3.Error, OSError) as error:
            raise OutboxUnavailable(f"the feedback outbox {path} (under DATA_PATH) cannot "
                                    f"be opened: {error}") from None

    def _connection(self) -> sqlite3.Connection:
        connection: sqlite3.Connection | None = getattr(self._local, "connection", None)
        if connection is None:
            # isolation_level=None: transactions only where BEGIN says so.
            connection = sqlite3.connect(self.path, timeout=10.0, isolation_level=None)
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=FULL")  # fsync the WAL on every commit
            connection.execute(_SCHEMA)
            self._local.connection = connection
        return connection

    def add(self, events: Events) -> None:
        """Keep `events` as one row; on disk when this returns."""
        self._connection().execute(
            "INSERT INTO outbox (events, size, added_at) VALUES (?, ?, ?)",
            (json.dumps(events, separators=(",", ":")), len(events), time.time()))

    def claim(self, max_events: int) -> list[tuple[int, Events]]:
        """The oldest unclaimed rows, up to `max_events` events (at least one row), claimed
        for this caller for the lease."""
        connection = self._connection()
        now = time.time()
        connection.execute("BEGIN IMMEDIATE")
        try:
            rows = connection.execute(
                "SELECT id, events, size FROM outbox WHERE claimed_until < ? ORDER BY id "
                "LIMIT 500", (now,)).fetchall()
            taken: list[tuple[int, Events]] = []
            total = 0
            for row_id, events, size in rows:
                if taken and total + size > max_events:
                    break
                taken.append((row_id, json.loads(events)))
                total += size
            if taken:
                connection.execute(
                    "UPDATE outbox SET claimed_until = ? WHERE id BETWEEN ? AND ? "
                    "AND claimed_until < ?", (now + self.lease_seconds, taken[0][0],
                                              taken[-1][0], now))
            connection.execute("COMMIT")
        except BaseException:
            connection.execute("ROLLBACK")
            raise
        return taken

    def remove(self, ids: list[int]) -> None:
        """Forget rows whose events RabbitMQ confirmed."""
        self._by_ids("DELETE FROM outbox WHERE id IN ({})", ids)

    def release(self, ids: list[int]) -> None:
        """Give claimed rows back at once (their publish failed)."""
        self._by_ids("UPDATE outbox SET claimed_until = 0 WHERE id IN ({})", ids)

    def _by_ids(self, statement: str, ids: list[int]) -> None:
        """One statement, so one commit (one fsync) for all the rows."""
        if ids:
            self._connection().execute(statement.format(",".join("?" * len(ids))), ids)

    def pending(self) -> int:
        """Events waiting in the outbox, claimed or not."""
        return int(self._connection().execute(
            "SELECT coalesce(sum(size), 0) FROM outbox").fetchone()[0])

    def close(self) -> None:
        """Close this thread's connection (others close with their threads)."""
        connection = getattr(self._local, "connection", None)
        if connection is not None:
            connection.close()
            self._local.connection = None
