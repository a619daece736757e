"""Writing a validated source to the database in one transaction.

Postgres takes ratings, tags and movies through `COPY` from the validated blocks; SQLite
(the embedded default) through batched inserts. Any error rolls everything back.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import pandas as pd
from sqlalchemy import Connection, Table, insert
from sqlalchemy.dialects import postgresql, sqlite

from services.ingest.errors import IngestError

RATING_COLUMNS = "user_id, movie_id, rating, rated_at"
TAG_COLUMNS = "user_id, movie_id, tag, tagged_at"


class CopyStream:
    """A file-like view of an iterator of byte chunks, for psycopg2's copy_expert.

    psycopg2 turns an exception raised in read() into QueryCanceled; the original is
    kept in `error` so the caller can raise it instead.
    """

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self.chunks = chunks
        self.error: BaseException | None = None

    def read(self, size: int = -1) -> bytes:
        try:
            return next(self.chunks, b"")
        except BaseException as error:
            self.error = error
            raise


def is_postgres(conn: Connection) -> bool:
    return conn.dialect.name == "postgresql"


def copy_ratings(
    conn: Connection,
    chunks: Iterator[bytes],
    csv_format: bool,
    table: str = "rating",
    columns: str = RATING_COLUMNS,
) -> None:
    """Stream raw rows into `table` with COPY, inside the connection's transaction."""
    copy_rows(conn, chunks, table, columns, "FORMAT csv" if csv_format else "FORMAT text")


def copy_rows(
    conn: Connection, chunks: Iterator[bytes], table: str, columns: str, options: str
) -> int:
    """COPY `table` (`columns`) FROM STDIN WITH (`options`) from byte chunks; rows copied."""
    cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
    stream = CopyStream(chunks)
    try:
        cursor.copy_expert(
            f"COPY {table} ({columns}) FROM STDIN WITH ({options})", stream, size=1 << 20
        )
        return int(cursor.rowcount)
    except Exception:
        if stream.error is not None:
            raise stream.error from None
        raise
    finally:
        cursor.close()


def copy_tags(conn: Connection, chunks: Iterator[bytes]) -> int:
    """Tags as CSV (see `services.ingest.tags.copy_text`) into `tag`; rows copied."""
    return copy_rows(conn, chunks, "tag", TAG_COLUMNS, "FORMAT csv, FORCE_NOT_NULL (tag)")


def insert_tags(conn: Connection, frame: pd.DataFrame) -> None:
    """Batched INSERT of a frame of tags (the SQLite path)."""
    rows = list(
        zip(
            frame["user_id"].tolist(),
            frame["movie_id"].tolist(),
            frame["tag"].tolist(),
            frame["tagged_at"].tolist(),
            strict=True,
        )
    )
    if rows:
        marks = ", ".join("%s" if is_postgres(conn) else "?" for _ in range(4))
        conn.exec_driver_sql(f"INSERT INTO tag ({TAG_COLUMNS}) VALUES ({marks})", rows)


def upsert_frame(conn: Connection, table: Table, frame: pd.DataFrame, key: str) -> None:
    """`upsert` of a frame; on Postgres through COPY into a staging table, then one merge.

    Nullable integer columns should be pandas' Int64, so absent values stay NULL.
    """
    if frame.empty:
        return
    if not is_postgres(conn):
        records = frame.astype(object).where(frame.notna(), None).to_dict("records")
        upsert(conn, table, records, key)
        return
    columns = list(frame.columns)
    stage = f"{table.name}_stage"
    conn.exec_driver_sql(
        f"CREATE TEMPORARY TABLE {stage} (LIKE {table.name} INCLUDING DEFAULTS) ON COMMIT DROP"
    )
    # Unquoted empty fields are NULL in CSV; text columns that cannot be NULL keep "".
    text = [c.name for c in table.columns if c.name in columns and not c.nullable]
    text = [name for name in text if frame[name].dtype == object]
    options = "FORMAT csv" + (f", FORCE_NOT_NULL ({', '.join(text)})" if text else "")
    data = frame.to_csv(header=False, index=False, lineterminator="\n").encode("utf-8")
    names = ", ".join(columns)
    copy_rows(conn, iter([data]), stage, names, options)
    updates = ", ".join(f"{c} = EXCLUDED.{c}" for c in columns if c != key)
    conn.exec_driver_sql(
        f"INSERT INTO {table.name} ({names}) SELECT {names} FROM {stage} "
        f"ON CONFLICT ({key}) DO UPDATE SET {updates}"
    )
    conn.exec_driver_sql(f"DROP TABLE {stage}")


def insert_ratings(
    conn: Connection,
    frame: pd.DataFrame,
    table: str = "rating",
    line_numbers: Iterable[int] | None = None,
) -> None:
    """Batched INSERT of a frame of ratings (the SQLite path, and lenient staging)."""
    columns = [
        frame["user_id"].tolist(),
        frame["movie_id"].tolist(),
        frame["rating"].tolist(),
        frame["rated_at"].tolist(),
    ]
    if line_numbers is not None:
        columns.append(list(line_numbers))
    marks = ", ".join("?" if not is_postgres(conn) else "%s" for _ in columns)
    names = RATING_COLUMNS + (", line" if line_numbers is not None else "")
    rows = list(zip(*columns, strict=True))
    if rows:
        conn.exec_driver_sql(f"INSERT INTO {table} ({names}) VALUES ({marks})", rows)


def upsert(conn: Connection, table: Table, rows: list[dict[str, Any]], key: str) -> None:
    """Insert rows, replacing the non-key columns of rows whose key already exists."""
    if not rows:
        return
    dialect = postgresql if is_postgres(conn) else sqlite
    statement = dialect.insert(table)
    updates = {c.name: statement.excluded[c.name] for c in table.columns if c.name != key}
    # RETURNING lets SQLAlchemy batch many rows per round trip (its "insertmanyvalues");
    # without it an ON CONFLICT DO UPDATE goes one row per round trip.
    statement = statement.on_conflict_do_update(index_elements=[key], set_=updates).returning(
        table.c[key]
    )
    for start in range(0, len(rows), 5000):
        conn.execute(statement, rows[start : start + 5000]).all()


def insert_rows(conn: Connection, table: Table, rows: list[dict[str, Any]]) -> None:
    for start in range(0, len(rows), 5000):
        if rows[start : start + 5000]:
            conn.execute(insert(table), rows[start : start + 5000])


def create_stage(conn: Connection) -> None:
    """A temporary staging table for lenient loads (dropped at commit)."""
    on_commit = " ON COMMIT DROP" if is_postgres(conn) else ""
    conn.exec_driver_sql(
        "CREATE TEMPORARY TABLE rating_stage (user_id INTEGER NOT NULL, movie_id INTEGER NOT "
        "NULL, rating REAL NOT NULL, rated_at BIGINT NOT NULL, line BIGINT NOT NULL)" + on_commit
    )


def merge_stage(conn: Connection, batch_id: int, file: str) -> tuple[int, int]:
    """Move staged rows into `rating`; rows already there become rejects. (loaded, rejected)"""
    conflicts = conn.exec_driver_sql(
        "INSERT INTO ingest_reject (batch_id, file, line, reason, raw) "
        f"SELECT {int(batch_id)}, ?, s.line, 'already in the database from an earlier batch', "
        "CAST(s.user_id AS TEXT) || ',' || CAST(s.movie_id AS TEXT) || ',' || "
        "CAST(s.rating AS TEXT) || ',' || CAST(s.rated_at AS TEXT) FROM rating_stage s "
        "WHERE EXISTS (SELECT 1 FROM rating r WHERE r.user_id = s.user_id AND "
        "r.movie_id = s.movie_id AND r.rated_at = s.rated_at)".replace(
            "?", "%s" if is_postgres(conn) else "?"
        ),
        (file,),
    ).rowcount
    loaded = conn.exec_driver_sql(
        # WHERE true: SQLite cannot otherwise tell ON CONFLICT from a join constraint.
        f"INSERT INTO rating ({RATING_COLUMNS}) SELECT {RATING_COLUMNS} FROM rating_stage "
        "WHERE true ON CONFLICT DO NOTHING"
    ).rowcount
    if not is_postgres(conn):
        conn.exec_driver_sql("DROP TABLE rating_stage")
    return loaded, conflicts


def require_migrated(conn: Connection) -> None:
    """Refuse to load into a database whose schema has not been migrated."""
    if not conn.dialect.has_table(conn, "rating"):
        raise IngestError(
            f"database {conn.engine.url.render_as_string(hide_password=True)} has no schema; "
            "run `recsys db upgrade` first"
        )
