"""Engines, sessions and schema migration."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

from shared.errors import RecsysError
from shared.settings import get_settings

MIGRATIONS = Path(__file__).with_name("migrations")


def _make_sqlite_folder(url: str) -> None:
    path = url.split(":///", 1)[-1]
    if url.startswith("sqlite") and path and path != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)


@lru_cache(maxsize=8)
def engine_for(url: str) -> Engine:
    """One pooled engine per URL; SQLite gets its folder made and WAL switched on."""
    if url.startswith("sqlite"):
        _make_sqlite_folder(url)
        engine = create_engine(url, connect_args={"timeout": 30})

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=5)


def get_engine() -> Engine:
    """The engine of the configured database (SQLite under DATA_PATH when none is set)."""
    return engine_for(get_settings().resolved_database_url)


@contextmanager
def session_scope(engine: Engine | None = None) -> Iterator[Session]:
    """A session that commits on success and rolls back on error."""
    factory = sessionmaker(bind=engine or get_engine(), expire_on_commit=False)
    session = factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def migrate(url: str | None = None, revision: str = "head") -> None:
    """Bring the schema to `revision` with Alembic (the only way the schema is made)."""
    url = url or get_settings().resolved_database_url
    _make_sqlite_folder(url)
    command.upgrade(alembic_config(url), revision)


class DatabaseUnavailable(RecsysError):
    """The database did not answer (down, unreachable, refused the login)."""


class SchemaNotReady(RecsysError):
    """The database answers, but its schema is missing or at another revision."""


def require_schema(url: str | None = None, connect_timeout: int = 10) -> None:
    """Return when the database's schema is at this code's head revision; otherwise raise
    SchemaNotReady (missing or behind: run `recsys db upgrade`) or DatabaseUnavailable."""
    url = url or get_settings().resolved_database_url
    shown = make_url(url).render_as_string(hide_password=True)
    script = ScriptDirectory.from_config(alembic_config(url))
    heads = set(script.get_heads())
    postgres = url.startswith("postgresql")
    engine = create_engine(url, poolclass=NullPool, connect_args={
        "connect_timeout": connect_timeout} if postgres else {})
    try:
        with engine.connect() as connection:
            current = set(MigrationContext.configure(connection).get_current_heads())
    except SQLAlchemyError as error:
        reason = str(getattr(error, "orig", None) or error).strip().splitlines()[0]
        raise DatabaseUnavailable(f"database {shown} did not answer: {reason}") from None
    finally:
        engine.dispose()
    if current == heads:
        return
    if not current:
        raise SchemaNotReady(f"database {shown} has no recsys schema; run `recsys db upgrade` "
                             "first")
    known = {revision.revision for revision in script.walk_revisions()}
    if current - known:
        raise SchemaNotReady(f"database {shown} is at revision {', '.join(sorted(current))}, "
                             "which this recsys does not know (a newer release migrated it); "
                             "run a recsys at least as new")
    raise SchemaNotReady(f"database {shown} is at revision {', '.join(sorted(current))}, this "
                         f"recsys needs {', '.join(sorted(heads))}; run `recsys db upgrade`")
