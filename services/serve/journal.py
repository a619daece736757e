"""Recent feedback shared by every serve process of one machine when there is no Redis.

`recsys serve` runs several uvicorn workers, each with its own in-process cache. Feedback
accepted by one worker must reach the others before its 202 is answered, or a list
cached (or computed from a history the ingest service has not stored yet) by another
worker would show the movie again. Without Redis, the workers share an append-only
SQLite file under DATA_PATH: the accepting worker appends the events, and every worker
reads what was appended since its last look before it answers from its cache, so each
one drops the user's cached lists, remembers the feedback and moves the user's epoch on,
as Redis does for all of them at once.

The file is scratch state of serve, not product data (the feedback itself is stored by
the ingest service), so it is made here rather than by the Alembic migrations: it must
exist whichever database DATABASE_URL names. Rows older than the horizon (every cached
list and every remembered feedback older than it has expired) are pruned.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

from shared.history import History

JournalRow = tuple[int, int, int, float | None, float]  # seq, user, movie, value, noted at
_SCHEMA = ("CREATE TABLE IF NOT EXISTS recent_feedback (seq INTEGER PRIMARY KEY AUTOINCREMENT,"
           " user_id INTEGER NOT NULL, movie_id INTEGER NOT NULL, value REAL,"
           " noted_at REAL NOT NULL)")
PRUNE_EVERY = 60.0  # seconds between prunes by one process


class FeedbackJournal:
    """The shared file: `append` events, read `since` a sequence number.

    AUTOINCREMENT never reuses a sequence number, even after a prune, so a reader that
    remembers the last number it applied never misses a row that is still there. Two
    connections: the read (on the event loop, never waiting in WAL mode) does not queue
    behind a write that waits for another process's lock."""

    def __init__(self, path: Path, horizon: float, timeout: float = 5.0) -> None:
        self.path = path
        self.horizon = horizon
        path.parent.mkdir(parents=True, exist_ok=True)
        self._writer = self._connect(timeout)
        with self._writer:
            self._writer.execute(_SCHEMA)
        self._reader = self._connect(timeout)
        self._write_lock = threading.Lock()
        self._read_lock = threading.Lock()
        self._next_prune = 0.0

    def _connect(self, timeout: float) -> sqlite3.Connection:
        connection = sqlite3.connect(self.path, timeout=timeout, check_same_thread=False)
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=NORMAL")  # scratch state: no fsync per event
        return connection

    def append(self, by_user: dict[int, History], now: float | None = None) -> None:
        """Add each user's events (movie -> value, None: seen only) in one transaction;
        raises sqlite3.Error when the file cannot be written."""
        noted = time.time() if now is None else now
        rows = [(user, movie, value, noted) for user, items in by_user.items()
                for movie, value in items.items()]
        with self._write_lock, self._writer:
            self._writer.executemany("INSERT INTO recent_feedback (user_id, movie_id, value, "
                                     "noted_at) VALUES (?, ?, ?, ?)", rows)
            if noted >= self._next_prune:
                self._writer.execute("DELETE FROM recent_feedback WHERE noted_at < ?",
                                     (noted - self.horizon,))
                self._next_prune = noted + PRUNE_EVERY

    def since(self, seq: int) -> list[JournalRow]:
        """Rows appended after `seq`, oldest first; raises sqlite3.Error when unreadable."""
        with self._read_lock:
            return self._reader.execute(
                "SELECT seq, user_id, movie_id, value, noted_at FROM recent_feedback "
                "WHERE seq > ? ORDER BY seq", (seq,)).fetchall()

    def close(self) -> None:
        with self._write_lock:
            self._writer.close()
        with self._read_lock:
            self._reader.close()
