"""Reading ratings out of the database, streaming, into numpy arrays.

On Postgres the rows come through `COPY ... TO STDOUT WITH (FORMAT binary)`: every row has
the same fixed width (int4, int4, float4, int8, all NOT NULL), so numpy parses each
chunk with one big-endian structured dtype and nothing goes through the ORM.
"""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
from sqlalchemy import Engine, text

COLUMNS = ("user_id", "movie_id", "rating", "rated_at")
_HEADER = 19  # PGCOPY signature (11) + flags (4) + header extension length (4)
_ROW = np.dtype([("fields", ">i2"), ("ul", ">i4"), ("user_id", ">i4"), ("ml", ">i4"),
                 ("movie_id", ">i4"), ("rl", ">i4"), ("rating", ">f4"), ("tl", ">i4"),
                 ("rated_at", ">i8")])
_RATINGS = "SELECT user_id, movie_id, rating, rated_at FROM rating"
# Feedback joins the interactions: a rating with its value, a click or watch as a positive
# interaction worth FEEDBACK_IMPLICIT_RATING stars; views say nothing about liking.
_FEEDBACK = {
    "postgresql": "SELECT user_id, movie_id, CAST(coalesce(CASE WHEN type = 'rating' THEN value "
                  "END, {implicit}) AS REAL), CAST(extract(epoch FROM occurred_at) AS BIGINT) "
                  "FROM feedback WHERE type IN ('rating', 'click', 'watch')",
    "sqlite": "SELECT user_id, movie_id, coalesce(CASE WHEN type = 'rating' THEN value END, "
              "{implicit}), CAST(strftime('%s', occurred_at) AS INTEGER) FROM feedback "
              "WHERE type IN ('rating', 'click', 'watch')",
}


def interactions_query(dialect: str, implicit_rating: float) -> str:
    """Ratings and the feedback that counts as an interaction, as one row set."""
    feedback = _FEEDBACK["postgresql" if dialect == "postgresql" else "sqlite"]
    return f"{_RATINGS} UNION ALL {feedback.format(implicit=float(implicit_rating))}"


class _BinaryCopySink:
    """Receives COPY's binary stream in arbitrary chunks; keeps whole rows as arrays."""

    def __init__(self, flush_bytes: int = 32 << 20) -> None:
        self.buffer = bytearray()
        self.header_seen = False
        self.flush_bytes = flush_bytes
        self.parts: dict[str, list[np.ndarray]] = {c: [] for c in COLUMNS}

    def write(self, data: bytes) -> int:
        self.buffer += data
        if len(self.buffer) >= self.flush_bytes:
            self._drain()
        return len(data)

    def _drain(self) -> None:
        start = 0
        if not self.header_seen:
            if len(self.buffer) < _HEADER:
                return
            if not bytes(self.buffer[:11]).startswith(b"PGCOPY\n\xff\r\n\x00"):
                raise ValueError("COPY binary stream has no PGCOPY signature")
            start, self.header_seen = _HEADER, True
        whole = (len(self.buffer) - start) // _ROW.itemsize
        if whole:
            rows = np.frombuffer(self.buffer, dtype=_ROW, count=whole, offset=start)
            if (rows["fields"] != 4).any():
                raise ValueError("COPY binary stream: unexpected field count")
            for column, dtype in zip(COLUMNS, ("<i4", "<i4", "<f4", "<i8"), strict=True):
                self.parts[column].append(rows[column].astype(dtype))
            del rows  # release the view before the buffer shrinks
        del self.buffer[: start + whole * _ROW.itemsize]

    def close(self) -> dict[str, np.ndarray]:
        self._drain()
        if bytes(self.buffer) not in (b"", b"\xff\xff"):  # the trailer is int16 -1
            raise ValueError(f"COPY binary stream ended with {len(self.buffer)} stray bytes")
        return {c: (np.concatenate(p) if p else np.empty(0, dtype=d))
                for (c, p), d in zip(self.parts.items(), ("<i4", "<i4", "<f4", "<i8"),
                                     strict=True)}


class _RawSink(io.RawIOBase):
    """The raw stream under an io.BufferedWriter, handing each block to the sink."""

    def __init__(self, sink: _BinaryCopySink) -> None:
        super().__init__()
        self.sink = sink

    def writable(self) -> bool:
        return True

    def write(self, data: bytes) -> int:  # type: ignore[override]
        return self.sink.write(data)


def load_ratings(engine: Engine, implicit_rating: float = 4.0) -> pd.DataFrame:
    """Every rating, and every engaged feedback event, as user_id, movie_id, rating, rated_at."""
    query = interactions_query(engine.dialect.name, implicit_rating)
    if engine.dialect.name == "postgresql":
        sink = _BinaryCopySink()
        # psycopg2 writes COPY's output one row per call: a C buffer in front of the sink
        # passes it on in 32 MB blocks, instead of one Python call per row (at 2M rows,
        # most of the load's time).
        buffered = io.BufferedWriter(_RawSink(sink), buffer_size=sink.flush_bytes)
        raw = engine.raw_connection()
        try:
            with raw.cursor() as cursor:
                cursor.copy_expert(f"COPY ({query}) TO STDOUT WITH (FORMAT binary)", buffered,
                                   size=1 << 20)
            raw.commit()
            buffered.flush()
        finally:
            raw.close()
        return pd.DataFrame(sink.close(), copy=False)
    with engine.connect() as conn:
        frame = pd.read_sql_query(text(query), conn)
    frame.columns = list(COLUMNS)
    return frame.astype({"user_id": "int32", "movie_id": "int32", "rating": "float32",
                         "rated_at": "int64"})


def load_movie_genres(engine: Engine, movie_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(genre names, items x genres 0/1 matrix) for the given movie ids, in their order."""
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT id, genres FROM movie")).all()
    genres_of = {movie_id: [g for g in genres.split("|") if g] for movie_id, genres in rows}
    names = sorted({g for gs in genres_of.values() for g in gs})
    column = {name: i for i, name in enumerate(names)}
    matrix = np.zeros((len(movie_ids), len(names)), dtype=np.uint8)
    for row, movie_id in enumerate(movie_ids.tolist()):
        for genre in genres_of.get(movie_id, []):
            matrix[row, column[genre]] = 1
    return np.array(names, dtype=np.str_), matrix
