"""Alembic owns the schema: migrations build it on Postgres and SQLite, matching the models."""

from __future__ import annotations

from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from shared.db import Base, migrate
from shared.db.session import engine_for


def _differences(url: str) -> list:
    with engine_for(url).connect() as conn:
        return compare_metadata(MigrationContext.configure(conn), Base.metadata)


def test_postgres_schema_matches_models(pg_url: str) -> None:
    assert _differences(pg_url) == []


def test_sqlite_schema_matches_models(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'x.sqlite3'}"
    migrate(url)
    migrate(url)  # a second run is a no-op
    assert _differences(url) == []
