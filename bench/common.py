"""What every benchmark needs around its measurement: a scratch database on the
server's admin URL, the settings in force, waiting for a condition, and the processes of a
session it started."""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg2
from sqlalchemy.engine import URL, make_url


def libpq_dsn(url: URL) -> str:
    """A libpq connection string for psycopg2 from a SQLAlchemy URL."""
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


def admin_execute(admin: URL, sql: str, attempts: int = 30) -> None:
    """One statement on a fresh autocommit admin connection, retried while the server is down.

    Fresh, not held for the whole run: on this shared machine other jobs restart Postgres,
    and a long-held connection would then leave the scratch database behind.
    """
    for attempt in range(attempts):
        try:
            conn = psycopg2.connect(libpq_dsn(admin), connect_timeout=10)
        except psycopg2.OperationalError:
            if attempt == attempts - 1:
                raise
            time.sleep(2.0)
            continue
        conn.autocommit = True  # CREATE/DROP DATABASE cannot run in a transaction
        try:
            with conn.cursor() as cursor:
                cursor.execute(sql)
            return
        finally:
            conn.close()


@contextmanager
def scratch_database(admin_url: str, label: str = "") -> Iterator[URL]:
    """A fresh database on the admin URL's server, dropped afterwards whatever happens."""
    admin = make_url(admin_url)
    name = "_".join(filter(None, ("recsys_bench", label, str(os.getpid()),
                                  secrets.token_hex(3))))
    admin_execute(admin, f'CREATE DATABASE "{name}"')
    try:
        yield admin.set(database=name)
    finally:
        admin_execute(admin, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def database_exists(admin_url: str, name: str) -> bool:
    """Whether the admin URL's server has a database `name` (a scratch one left behind)."""
    conn = psycopg2.connect(libpq_dsn(make_url(admin_url)))
    try:
        with conn.cursor() as cursor:
            cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
            return cursor.fetchone() is not None
    finally:
        conn.close()


def wait_for_sole_worker(queue: str, timeout: float, why: str, poll: float = 2.0) -> None:
    """Wait until no other `recsys worker <queue>` answers on the broker in force (it would
    take the benchmark's tasks); SystemExit when one is still there after `timeout`."""
    from shared.celery_app import ServiceQueue, answering_workers

    deadline = time.monotonic() + timeout
    others = answering_workers(ServiceQueue(queue))
    if others:
        print(f"waiting up to {timeout:.0f} s for {others} other {queue} worker(s) on this "
              f"broker to stop ({why})")
    while others:
        if time.monotonic() > deadline:
            raise SystemExit(f"{others} other {queue} worker(s) still consume the `{queue}` "
                             "queue; stop them and rerun")
        time.sleep(poll)
        others = answering_workers(ServiceQueue(queue))


def session_pids(sid: int) -> list[int]:
    """Live processes of a session (a benchmark starts servers and workers as session
    leaders, so their children, such as Celery's pool, belong to it too)."""
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            raw = Path(f"/proc/{entry.name}/stat").read_text()
        except OSError:
            continue
        fields = raw[raw.rfind(")") + 2:].split()  # the command name may hold spaces
        if int(fields[3]) == sid and fields[0] not in {"Z", "X"}:
            pids.append(int(entry.name))
    return pids


def bare_top_k(user_factors, item_factors, seen, users, k: int,  # type: ignore[no-untyped-def]
               ordered: bool = False) -> None:
    """The baseline the scoring benchmarks share: numpy top-k of `users` from the factors,
    each user's `seen` (CSR row) items masked, in blocks of at most 2**24 score cells;
    `ordered` also sorts each top k by score."""
    import numpy as np

    block = max(1, (1 << 24) // item_factors.shape[0])
    for start in range(0, len(users), block):
        chunk = users[start:start + block]
        scores = user_factors[chunk] @ item_factors.T
        rows = seen[chunk]
        scores[np.repeat(np.arange(len(chunk)), np.diff(rows.indptr)), rows.indices] = -np.inf
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        if ordered:
            np.take_along_axis(top, np.argsort(-np.take_along_axis(scores, top, axis=1),
                                               axis=1), axis=1)


def configure_environment(env: dict[str, str]) -> None:
    """Make `env` the settings in force in this process (and the Celery app's config)."""
    from shared.celery_app import configure_app
    from shared.settings import get_settings

    os.environ.update(env)
    get_settings.cache_clear()
    configure_app()


def wait_until(predicate: Callable[[], Any], timeout: float, what: str,
               child: Any = None, interval: float = 0.2) -> Any:
    """The predicate's first truthy value within `timeout` seconds; SystemExit otherwise, or
    as soon as `child` (a process with `alive()`, `name` and `tail()`) has exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if child is not None and not child.alive():
            raise SystemExit(f"{child.name} exited while waiting for {what}:\n{child.tail()}")
        time.sleep(interval)
    raise SystemExit(f"timed out after {timeout:.0f} s waiting for {what}"
                     + (f":\n{child.tail()}" if child else ""))


def verdict(met: bool) -> str:
    """How a benchmark's line states a target."""
    return "met" if met else "NOT met"
