"""The first champion: run the whole pipeline on DATA_SOURCE when the registry has none.

`recsys bootstrap` is compose's one-shot `bootstrap` service, so a first `docker compose up`
ends with a champion served, and every later `up` finds one and does nothing. Two runs at
once (two `up`s, a bootstrap beside `recsys pipeline`'s first run) are serialised by a
lock in the database: a Postgres advisory lock held by one connection for the whole
run, released by the server if the process dies, so no expiry has to be guessed. The
embedded SQLite database has no such lock; a file lock under DATA_PATH stands in.
"""

from __future__ import annotations

import fcntl
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import text

from shared.db import ModelAlias, get_engine, session_scope
from shared.errors import RecsysError
from shared.settings import get_settings

MODEL_NAME = "recsys"  # the registry's model name (services/registry/registry.py)
LOCK_KEY = 0x7265637362  # pg_advisory_lock key of the bootstrap: "recsb"
LOCK_POLL_SECONDS = 1.0


class BootstrapError(RecsysError):
    """The bootstrap could not make a champion; the message says why."""


def champion_version() -> int | None:
    """The registry's champion version, None when there is none."""
    with session_scope() as session:
        alias = session.get(ModelAlias, (MODEL_NAME, "champion"))
        return alias.version if alias is not None else None


@contextmanager
def bootstrap_lock(timeout: float, waiting: Callable[[], None] | None = None) -> Iterator[None]:
    """Held by one bootstrap at a time; BootstrapError after `timeout` seconds of waiting.
    `waiting` is called once when another holder makes this one wait."""
    deadline = time.monotonic() + timeout
    told = False

    def wait() -> None:
        nonlocal told
        if time.monotonic() >= deadline:
            raise BootstrapError(f"another bootstrap held the lock for more than {timeout:g} s")
        if not told and waiting is not None:
            waiting()
        told = True
        time.sleep(LOCK_POLL_SECONDS)

    engine = get_engine()
    if engine.dialect.name == "postgresql":
        with engine.connect() as connection:
            while not connection.execute(text("SELECT pg_try_advisory_lock(:key)"),
                                         {"key": LOCK_KEY}).scalar_one():
                connection.rollback()
                wait()
            connection.commit()
            try:
                yield
            finally:
                connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": LOCK_KEY})
                connection.commit()
        return
    path = get_settings().data_path / "bootstrap.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                wait()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def bootstrap(source: str, timeout: float, algorithms: list[str] | None = None,
              trials: int | None = None, waiting: Callable[[], None] | None = None
              ) -> dict[str, Any]:
    """Run every pipeline stage on `source` unless the registry has a champion.

    Returns `status` `present` (nothing done; `waited` says whether another bootstrap made
    it meanwhile) or `trained` with the pipeline's summary, and the champion's version."""
    from shared.pipeline import run_pipeline

    found = champion_version()
    if found is not None:
        return {"status": "present", "champion": found, "waited": False}
    clock = time.monotonic()
    with bootstrap_lock(timeout, waiting):
        found = champion_version()  # another bootstrap may have finished while we waited
        if found is not None:
            return {"status": "present", "champion": found, "waited": True}
        left = max(1.0, timeout - (time.monotonic() - clock))
        summary = run_pipeline("all", None, timeout=left, source=source, protocol=None,
                               algorithms=algorithms, trials=trials, cv_folds=None)
        found = champion_version()
    if found is None:
        raise BootstrapError(f"the pipeline on {source} finished without a champion "
                             f"({summary.get('reason', 'no promote stage ran')})")
    return {"status": "trained", "champion": found, "source": source,
            "seconds": round(time.monotonic() - clock, 3), "pipeline": summary}
