"""What a user has rated or reacted to, read from Postgres on a cache miss.

Serve only reads the database. On Postgres the read is awaited on the event loop
(asyncpg: a pool per loop, the query prepared once per connection), so a miss waiting for
its history holds no thread; elsewhere (SQLite, embedded) the blocking read runs in the
threadpool. Both have short connect and statement timeouts, and after a failure the
database is left alone for a moment, so a Postgres outage costs a request milliseconds:
the answer then comes from the model's snapshot alone.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from typing import Any

import asyncpg
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.exc import SQLAlchemyError
from starlette.concurrency import run_in_threadpool

from services.serve.metrics import DEGRADED
from shared.db import engine_for
from shared.history import History, event_value, merge
from shared.settings import Settings

log = logging.getLogger(__name__)

# Ratings by time, then feedback by time with ties in arrival order (its id): the order
# the batch lists merge in too (services/eval/batch.py).
_HISTORY = text(
    "SELECT movie_id, rating AS value, 'rating' AS type, 0 AS part, "
    "CAST(rated_at AS DOUBLE PRECISION) AS at, CAST(0 AS BIGINT) AS id "
    "FROM rating WHERE user_id = :user "
    "UNION ALL SELECT movie_id, value, type, 1 AS part, "
    "CAST(EXTRACT(EPOCH FROM occurred_at) AS DOUBLE PRECISION) AS at, id "
    "FROM feedback WHERE user_id = :user ORDER BY part, at, id"
)
_HISTORY_ASYNCPG = _HISTORY.text.replace(":user", "$1")
_HISTORY_SQLITE = text(
    "SELECT movie_id, rating AS value, 'rating' AS type, 0 AS part, rated_at AS at, 0 AS id "
    "FROM rating WHERE user_id = :user "
    "UNION ALL SELECT movie_id, value, type, 1 AS part, occurred_at AS at, id FROM feedback "
    "WHERE user_id = :user ORDER BY part, at, id"
)


def serve_engine(settings: Settings) -> Engine:
    """A read engine that fails fast: 2 s to connect, 2 s per statement on Postgres.

    One round trip per read: autocommit (no BEGIN, no ROLLBACK when the connection goes
    back to the pool) and no pre-ping. A connection that died with the server fails its
    query, SQLAlchemy then discards the whole pool, and the reader answers from the
    snapshot for CACHE_RETRY_SECONDS."""
    url = settings.resolved_database_url
    if not url.startswith("postgresql"):
        return engine_for(url)
    return create_engine(url, isolation_level="AUTOCOMMIT", pool_size=4, max_overflow=8,
                         pool_timeout=2, connect_args={
                             "connect_timeout": 2, "options": "-c statement_timeout=2000"})


# What a failed asyncpg read raises: the server's error, a closed or refused connection,
# a timeout.
ASYNC_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError,
                OSError, TimeoutError)


async def _nothing_to_reset(_connection: asyncpg.Connection) -> None:
    """The reads change no session state, so a connection goes back to the pool as it is
    (asyncpg's default reset is one more round trip per read)."""


class HistoryReader:
    """A user's ratings and feedback as {movie_id: value or None}, later events winning."""

    def __init__(self, engine: Engine, implicit_rating: float = 4.0,
                 retry_seconds: float = 2.0, timeout: float = 2.0) -> None:
        self.engine = engine
        self.implicit_rating = implicit_rating
        self.retry_seconds = retry_seconds
        self.timeout = timeout
        self._down_until = 0.0
        self._postgres = engine.dialect.name == "postgresql"
        self._query = _HISTORY if self._postgres else _HISTORY_SQLITE
        self._pool: tuple[asyncio.AbstractEventLoop, asyncio.Future[asyncpg.Pool]] | None = None

    def _history(self, rows: Iterable[Any]) -> History:
        history: History = {}
        for movie_id, value, kind, _part, _at, _id in rows:
            merge(history, int(movie_id), event_value(kind, value, self.implicit_rating))
        return history

    def _failed(self, user_id: int, error: Exception) -> tuple[History, bool]:
        DEGRADED.labels("postgres").inc()
        if time.monotonic() >= self._down_until:
            log.warning("history of user %s unreadable (%s); answering from the snapshot "
                        "for %.1f s", user_id, (str(error) or type(error).__name__
                                                ).splitlines()[0], self.retry_seconds)
        self._down_until = time.monotonic() + self.retry_seconds
        return {}, False

    def _resting(self) -> bool:
        """Whether the database failed moments ago and is left alone."""
        if time.monotonic() < self._down_until:
            DEGRADED.labels("postgres").inc()
            return True
        return False

    def interactions(self, user_id: int) -> tuple[History, bool]:
        """(history, whether the database answered); an empty history when it did not."""
        if self._resting():
            return {}, False
        try:
            with self.engine.connect() as conn:
                rows = conn.execute(self._query, {"user": user_id}).all()
        except SQLAlchemyError as error:
            return self._failed(user_id, error)
        return self._history(rows), True

    async def ainteractions(self, user_id: int) -> tuple[History, bool]:
        """`interactions` for the event loop: awaited on Postgres, else in the threadpool."""
        if not self._postgres:
            return await run_in_threadpool(self.interactions, user_id)
        if self._resting():
            return {}, False
        try:
            pool = await self._async_pool()
            async with pool.acquire(timeout=self.timeout) as conn:
                rows = await conn.fetch(_HISTORY_ASYNCPG, user_id)
        except ASYNC_ERRORS as error:
            return self._failed(user_id, error)
        return self._history(rows), True

    async def _async_pool(self) -> asyncpg.Pool:
        """This loop's pool (connections belong to the loop that opened them); made on
        first use, connecting lazily, so a database that is down fails only the reads."""
        loop = asyncio.get_running_loop()
        made = self._pool
        if (made is None or made[0] is not loop
                or made[1].done() and (made[1].cancelled() or made[1].exception())):
            dsn = self.engine.url.set(drivername="postgresql").render_as_string(
                hide_password=False)
            made = self._pool = (loop, asyncio.ensure_future(asyncpg.create_pool(
                dsn, min_size=0, max_size=16, timeout=self.timeout,
                command_timeout=self.timeout, reset=_nothing_to_reset,
                server_settings={"statement_timeout": str(round(self.timeout * 1000))})))
        return await asyncio.shield(made[1])  # a cancelled read leaves the pool be

    async def aclose(self) -> None:
        """Close this loop's pool (serve's shutdown)."""
        if self._pool is not None and self._pool[0] is asyncio.get_running_loop():
            made, self._pool = self._pool[1], None
            try:
                await asyncio.wait_for((await made).close(), self.timeout)
            except (*ASYNC_ERRORS, asyncio.CancelledError):
                log.warning("history pool closed uncleanly")
        self._pool = None

    def ping(self) -> tuple[bool, str]:
        try:
            with self.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        except SQLAlchemyError as error:
            return False, f"database unreachable: {str(error).splitlines()[0]}"
        self._down_until = 0.0
        return True, f"{self.engine.dialect.name} answers"
