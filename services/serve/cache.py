"""The recommendation cache: Redis, or without it an in-process dictionary per serve
process, the processes kept in step by a shared feedback journal (services/serve/journal.py).

Entries are keyed by user, model version, variant and request parameters, so a new
version never meets an old version's lists. Each user also has an index of their keys
(dropped whole when their feedback arrives), a hash of their recent feedback (so a
list reflects it before the ingest worker has stored it), and an epoch that a list
computed before the feedback must match to be stored. Redis failures are counted and
swallowed: after one, Redis is left alone for CACHE_RETRY_SECONDS and answers are
computed without it.
"""

from __future__ import annotations

import asyncio
import logging
import random
import sqlite3
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Protocol

import redis
import redis.asyncio
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.retry import Retry

from services.serve.journal import FeedbackJournal
from services.serve.metrics import CACHE, child
from shared.history import History, merge
from shared.settings import Settings

log = logging.getLogger(__name__)

# Store only if no feedback arrived since the list's history was read (same epoch).
_STORE = """
local epoch = redis.call('GET', KEYS[3]) or ''
if epoch ~= ARGV[3] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
redis.call('SADD', KEYS[2], KEYS[1])
redis.call('EXPIRE', KEYS[2], ARGV[4])
return 1
"""
# Drop the user's lists, remember the feedback, move the epoch on.
_FEEDBACK = """
local keys = redis.call('SMEMBERS', KEYS[1])
for i = 1, #keys, 500 do
  redis.call('DEL', unpack(keys, i, math.min(i + 499, #keys)))
end
redis.call('DEL', KEYS[1])
if #ARGV > 1 then
  for i = 2, #ARGV, 2 do
    if ARGV[i + 1] == '' then  -- seen only: never erases an earlier interaction
      redis.call('HSETNX', KEYS[2], ARGV[i], '')
    else
      redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
    end
  end
  redis.call('EXPIRE', KEYS[2], ARGV[1])
end
redis.call('INCR', KEYS[3])
redis.call('EXPIRE', KEYS[3], ARGV[1])
return #keys
"""


class Cache(Protocol):
    """What serve needs from a cache; no method raises on a cache failure."""

    def get(self, key: str) -> bytes | None: ...

    async def aget(self, key: str) -> bytes | None:
        """`get` for the event loop: never blocks it."""
        ...

    def put(self, key: str, value: bytes) -> None:
        """Store an entry that belongs to no user (popular and similar lists)."""
        ...

    async def aput(self, key: str, value: bytes, user_id: int, epoch: str) -> None:
        """Store a user's entry on the event loop, only while their epoch is still `epoch`
        (no feedback arrived since its history was read)."""
        ...

    async def auser_state(self, user_id: int) -> tuple[History, str, bool]:
        """(recent feedback {movie: value or None}, epoch, whether the cache answered)."""
        ...

    def note_feedback(self, by_user: dict[int, History]) -> None: ...

    def ping(self) -> tuple[bool, str]: ...

    def close(self) -> None: ...

    async def aclose(self) -> None: ...


def list_key(prefix: str, user_id: int, field: str) -> str:
    """Key of one cached list; `{user}` keeps a user's keys in one Redis Cluster slot."""
    return f"{prefix}:rec:{{{user_id}}}:{field}"


class RedisCache:
    """Redis with short socket timeouts and a breaker; failures count as cache errors.

    The list path (read, user state, store) runs on the event loop with an asyncio client
    made in that loop (its connections belong to the loop that opened them); blocking
    calls from threads (popular and similar lists, feedback invalidation) use another."""

    def __init__(self, settings: Settings) -> None:
        self.prefix = settings.cache_prefix
        self.ttl = settings.cache_ttl
        self.jitter = settings.cache_ttl_jitter
        self.feedback_ttl = settings.recent_feedback_ttl
        self.retry_seconds = settings.cache_retry_seconds
        self.url = settings.redis_url
        self.timeout = settings.cache_socket_timeout
        self.client = redis.Redis.from_url(
            self.url, socket_timeout=self.timeout, socket_connect_timeout=self.timeout,
            retry=Retry(NoBackoff(), 0), health_check_interval=0)
        self._async: tuple[asyncio.AbstractEventLoop, redis.asyncio.Redis, Any] | None = None
        self._feedback = self.client.register_script(_FEEDBACK)
        self._down_until = 0.0
        self._random = random.Random()

    def _keys(self, user_id: int) -> tuple[str, str, str]:
        tag = f"{{{user_id}}}"
        return (f"{self.prefix}:recidx:{tag}", f"{self.prefix}:fb:{tag}",
                f"{self.prefix}:ep:{tag}")

    def _available(self) -> bool:
        return time.monotonic() >= self._down_until

    def _failed(self, error: Exception, what: str) -> None:
        CACHE.labels("error").inc()
        if self._available():
            log.warning("Redis %s failed (%s); serving without the cache for %.1f s",
                        what, error, self.retry_seconds)
        self._down_until = time.monotonic() + self.retry_seconds

    def _ttl(self) -> int:
        spread = self.ttl * self.jitter
        return max(1, round(self.ttl + self._random.uniform(-spread, spread)))

    def _bypassed(self) -> bool:
        """Whether a read skips Redis: caching off, or Redis failed moments ago."""
        if not self.ttl:
            return True
        if not self._available():
            CACHE.labels("error").inc()
            return True
        return False

    @staticmethod
    def _counted(value: bytes | None) -> bytes | None:
        child(CACHE, "hit" if value is not None else "miss").inc()
        return value

    def get(self, key: str) -> bytes | None:
        if self._bypassed():
            return None
        try:
            value = self.client.get(key)
        except redis.RedisError as error:
            self._failed(error, "GET")
            return None
        return self._counted(value)  # type: ignore[arg-type]

    def _async_client(self) -> tuple[redis.asyncio.Redis, Any]:
        """This loop's client and its store script."""
        loop = asyncio.get_running_loop()
        if self._async is None or self._async[0] is not loop:
            client = redis.asyncio.Redis.from_url(
                self.url, socket_timeout=self.timeout, socket_connect_timeout=self.timeout,
                retry=AsyncRetry(NoBackoff(), 0), health_check_interval=0)
            self._async = (loop, client, client.register_script(_STORE))
        return self._async[1], self._async[2]

    async def aget(self, key: str) -> bytes | None:
        if self._bypassed():
            return None
        try:
            value = await self._async_client()[0].get(key)
        except (redis.RedisError, OSError) as error:
            self._failed(error, "GET")
            return None
        return self._counted(value)

    def put(self, key: str, value: bytes) -> None:
        if not self.ttl or not self._available():
            return
        try:
            self.client.set(key, value, ex=self._ttl())
        except redis.RedisError as error:
            self._failed(error, "SET")

    async def aput(self, key: str, value: bytes, user_id: int, epoch: str) -> None:
        if not self.ttl or not self._available():
            return
        _client, store = self._async_client()
        try:
            await store(keys=[key, *self._keys(user_id)[::2]], args=[
                value, self._ttl(), epoch, round(self.ttl * (1 + self.jitter)) + 1])
        except (redis.RedisError, OSError) as error:
            self._failed(error, "SET")

    async def auser_state(self, user_id: int) -> tuple[History, str, bool]:
        if not self._available():
            return {}, "", False
        _index, feedback, epoch = self._keys(user_id)
        try:
            async with self._async_client()[0].pipeline(transaction=False) as pipe:
                pipe.hgetall(feedback)
                pipe.get(epoch)
                items, current = await pipe.execute()
        except (redis.RedisError, OSError) as error:
            self._failed(error, "read of recent feedback")
            return {}, "", False
        recent: History = {int(movie): float(value) if value else None
                           for movie, value in items.items()}
        return recent, (current or b"").decode(), True

    def note_feedback(self, by_user: dict[int, History]) -> None:
        """Each user's invalidation, all in one round trip: a pipeline of EVALSHA. (A
        pipeline of registered scripts would first ask SCRIPT EXISTS, a second round trip
        every time; here the script is loaded only when Redis says it does not know it.)"""
        if not by_user or not self._available():
            return
        try:
            for attempt in (1, 2):
                try:
                    with self.client.pipeline(transaction=False) as pipe:
                        for user_id, items in by_user.items():
                            args: list[object] = [self.feedback_ttl]
                            for movie, value in items.items():
                                args += [movie, "" if value is None else value]  # "": seen
                            pipe.evalsha(self._feedback.sha, 3, *self._keys(user_id), *args)
                        pipe.execute()
                    return
                except redis.exceptions.NoScriptError:  # new or restarted Redis: none ran
                    if attempt == 2:
                        raise
                    self.client.script_load(_FEEDBACK)
        except redis.RedisError as error:
            self._failed(error, "invalidation")

    def ping(self) -> tuple[bool, str]:
        try:
            self.client.ping()
        except redis.RedisError as error:
            return False, f"Redis unreachable: {error}"
        self._down_until = 0.0  # answered: stop bypassing it
        return True, "Redis answers"

    def close(self) -> None:
        self.client.close()

    async def aclose(self) -> None:
        if self._async is not None and self._async[0] is asyncio.get_running_loop():
            await self._async[1].aclose()
        self._async = None


class MemoryCache:
    """Without Redis: the same behaviour in this process, bounded by entry count, kept in
    step with the other serve processes of this machine through the feedback journal.

    Every operation first applies what the journal gained since this process last looked
    (the user's lists dropped, the feedback remembered, the epoch moved on), and feedback
    is written to the journal before it counts here, so feedback any worker accepted is
    known to every worker before that worker's 202. When the journal cannot be read, the
    cache answers nothing and stores nothing until it can again."""

    def __init__(self, settings: Settings, max_entries: int = 10_000,
                 journal: FeedbackJournal | None = None) -> None:
        self.ttl = settings.cache_ttl
        self.jitter = settings.cache_ttl_jitter
        self.feedback_ttl = settings.recent_feedback_ttl
        self.retry_seconds = settings.cache_retry_seconds
        self.max_entries = max_entries
        # Past the horizon every list cached before a row, and the row's feedback, expired.
        self.journal = journal or FeedbackJournal(
            journal_path(settings), max(self.feedback_ttl, self.ttl * (1 + self.jitter)) + 1)
        self._entries: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self._by_user: dict[int, set[str]] = {}
        self._feedback: dict[int, tuple[float, History]] = {}  # wall-clock expiry
        self._epochs: dict[int, int] = {}
        self._seen = 0  # the journal's last row applied here
        self._lock = threading.Lock()
        self._random = random.Random()
        self._down_until = 0.0

    def _synced(self) -> bool:
        """Apply the journal's new rows (call under the lock); False when it is unreadable."""
        try:
            rows = self.journal.since(self._seen)
        except sqlite3.Error as error:
            CACHE.labels("error").inc()
            if time.monotonic() >= self._down_until:
                log.warning("feedback journal %s unreadable (%s); serving without the "
                            "in-process cache", self.journal.path, error)
            self._down_until = time.monotonic() + self.retry_seconds
            return False
        by_user: dict[int, tuple[float, History]] = {}
        for seq, user_id, movie_id, value, noted_at in rows:
            _, items = by_user.setdefault(user_id, (noted_at, {}))
            merge(items, movie_id, value)
            by_user[user_id] = (noted_at, items)
            self._seen = seq
        for user_id, (noted_at, items) in by_user.items():
            self._apply(user_id, items, noted_at)
        return True

    def _apply(self, user_id: int, items: History, noted_at: float) -> None:
        """One user's feedback: drop their lists, remember it, move their epoch on."""
        for key in self._by_user.pop(user_id, set()):
            self._entries.pop(key, None)
        expires, known = self._feedback.get(user_id, (0.0, {}))
        merged = dict(known) if expires >= noted_at else {}
        for movie, value in items.items():
            merge(merged, movie, value)
        self._feedback[user_id] = (noted_at + self.feedback_ttl, merged)
        self._epochs[user_id] = self._epochs.get(user_id, 0) + 1

    def get(self, key: str) -> bytes | None:
        if not self.ttl:
            return None
        with self._lock:
            if not self._synced():
                return None
            found = self._entries.get(key)
            if found is not None and found[0] < time.monotonic():
                del self._entries[key]
                found = None
        child(CACHE, "hit" if found else "miss").inc()
        return found[1] if found else None

    async def aget(self, key: str) -> bytes | None:
        # A dictionary look-up and one indexed SQLite read (WAL: never waits on a writer).
        return self.get(key)

    def put(self, key: str, value: bytes, user_id: int | None = None, epoch: str = "") -> None:
        if not self.ttl:
            return
        spread = self.ttl * self.jitter
        expires = time.monotonic() + self.ttl + self._random.uniform(-spread, spread)
        with self._lock:
            if not self._synced():
                return
            if user_id is not None:
                if str(self._epochs.get(user_id, "")) != epoch:
                    return
                self._by_user.setdefault(user_id, set()).add(key)
            self._entries[key] = (expires, value)
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    async def aput(self, key: str, value: bytes, user_id: int, epoch: str) -> None:
        self.put(key, value, user_id, epoch)

    async def auser_state(self, user_id: int) -> tuple[History, str, bool]:
        with self._lock:
            synced = self._synced()
            expires, items = self._feedback.get(user_id, (0.0, {}))
            recent = dict(items) if expires >= time.time() else {}
            return recent, str(self._epochs.get(user_id, "")), synced

    def note_feedback(self, by_user: dict[int, History]) -> None:
        """Into the journal for every worker, then applied here from it."""
        if not by_user:
            return
        noted_at = time.time()
        try:
            self.journal.append(by_user, noted_at)
        except sqlite3.Error as error:  # this worker at least keeps its own promise
            CACHE.labels("error").inc()
            log.error("feedback journal %s not written (%s); other serve workers may show "
                      "these users their rated movies for up to CACHE_TTL",
                      self.journal.path, error)
            with self._lock:
                for user_id, items in by_user.items():
                    self._apply(user_id, items, noted_at)
            return
        with self._lock:
            self._synced()

    def ping(self) -> tuple[bool, str]:
        with self._lock:
            if not self._synced():
                return False, f"feedback journal {self.journal.path} unreadable"
        return True, "in-process cache (no REDIS_URL), shared feedback journal"

    def close(self) -> None:
        with self._lock:
            self._entries.clear()
        self.journal.close()

    async def aclose(self) -> None:
        self.close()


def journal_path(settings: Settings) -> Path:
    """The feedback journal every serve process of this DATA_PATH shares."""
    return settings.data_path.resolve() / "serve" / "recent-feedback.sqlite3"


def make_cache(settings: Settings) -> Cache:
    """Redis when REDIS_URL is set, else the in-process cache."""
    return RedisCache(settings) if settings.redis_url else MemoryCache(settings)
