"""Optuna studies in Postgres, so that the trials of one search can run on several workers.

optuna creates and versions its own tables (with its own ``alembic_version``), so they live
in a schema of their own, ``optuna``, beside the product's Alembic-owned tables.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache

import optuna
import sqlalchemy.exc
from sqlalchemy import text

from shared.db import engine_for

STUDY_SCHEMA = "optuna"


def shares_studies(database_url: str) -> bool:
    """Whether studies can be shared through this database (Postgres; SQLite is one process)."""
    return database_url.startswith("postgresql")


@lru_cache(maxsize=4)
def study_storage(database_url: str) -> optuna.storages.RDBStorage:
    """optuna's storage on ``database_url``, in the ``optuna`` schema (made when missing)."""
    if not shares_studies(database_url):
        raise ValueError(f"studies are shared through Postgres; DATABASE_URL is {database_url!r}")
    try:
        with engine_for(database_url).begin() as connection:
            connection.execute(text(f"CREATE SCHEMA IF NOT EXISTS {STUDY_SCHEMA}"))
    except sqlalchemy.exc.IntegrityError:
        pass  # another worker made it at the same moment: it exists, which is what we want
    return optuna.storages.RDBStorage(
        database_url,
        engine_kwargs={"pool_pre_ping": True,
                       "connect_args": {"options": f"-c search_path={STUDY_SCHEMA}"}},
    )


@contextmanager
def study_lock(database_url: str, study_name: str) -> Iterator[None]:
    """A Postgres advisory lock per study: counting its trials and starting the next one
    happen as one step among the workers, so a search never runs more than its cap."""
    with engine_for(database_url).connect() as connection:
        connection.execute(text("SELECT pg_advisory_lock(hashtext(:name))"),
                           {"name": study_name})
        try:
            yield
        finally:
            connection.execute(text("SELECT pg_advisory_unlock(hashtext(:name))"),
                               {"name": study_name})
            connection.commit()
