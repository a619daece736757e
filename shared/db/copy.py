"""Rows of four fixed-width columns read out of the database into numpy arrays.

On Postgres the rows come through `COPY (query) TO STDOUT WITH (FORMAT binary)`: every row
has the same width (int4, int4, float4, int8, all NOT NULL), so numpy parses each chunk
with one big-endian structured dtype and nothing goes through the ORM. Elsewhere (SQLite,
embedded) pandas reads the query. The snapshot's rating load and the batch lists' history
reads go through here.
"""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
from sqlalchemy import Engine, text

# A row's four columns take these names and dtypes, whatever the query calls them.
COLUMNS = ("user_id", "movie_id", "value", "order")
DTYPES = ("<i4", "<i4", "<f4", "<i8")
# PGCOPY signature (11) + flags (4) + header extension length (4)
HEADER_BYTES = b"PGCOPY\n\xff\r\n\x00" + bytes(8)
_HEADER = len(HEADER_BYTES)
ROW = np.dtype([("fields", ">i2"), ("ul", ">i4"), ("user_id", ">i4"), ("ml", ">i4"),
                 ("movie_id", ">i4"), ("vl", ">i4"), ("value", ">f4"), ("ol", ">i4"),
                 ("order", ">i8")])


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
        whole = (len(self.buffer) - start) // ROW.itemsize
        if whole:
            rows = np.frombuffer(self.buffer, dtype=ROW, count=whole, offset=start)
            if (rows["fields"] != 4).any():
                raise ValueError("COPY binary stream: unexpected field count")
            if ((rows["ul"] != 4) | (rows["ml"] != 4) | (rows["vl"] != 4)
                    | (rows["ol"] != 8)).any():
                raise ValueError("COPY binary stream: a NULL or a column of another width")
            for column, dtype in zip(COLUMNS, DTYPES, strict=True):
                self.parts[column].append(rows[column].astype(dtype))
            del rows  # release the view before the buffer shrinks
        del self.buffer[: start + whole * ROW.itemsize]

    def close(self) -> dict[str, np.ndarray]:
        self._drain()
        if bytes(self.buffer) not in (b"", b"\xff\xff"):  # the trailer is int16 -1
            raise ValueError(f"COPY binary stream ended with {len(self.buffer)} stray bytes")
        return {c: (np.concatenate(p) if p else np.empty(0, dtype=d))
                for (c, p), d in zip(self.parts.items(), DTYPES, strict=True)}


class _RawSink(io.RawIOBase):
    """The raw stream under an io.BufferedWriter, handing each block to the sink."""

    def __init__(self, sink: _BinaryCopySink) -> None:
        super().__init__()
        self.sink = sink

    def writable(self) -> bool:
        return True

    def write(self, data: bytes) -> int:  # type: ignore[override]
        return self.sink.write(data)


def read_columns(engine: Engine, query: str) -> dict[str, np.ndarray]:
    """`query`'s rows as arrays named COLUMNS: int32, int32, float32, int64, in the
    query's order. On Postgres its columns must be int4, int4, float4, int8, never NULL;
    elsewhere a NULL third column reads as NaN. `query` takes no parameters: it is run
    by COPY, so what it selects on is written into it (numbers only)."""
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
        return sink.close()
    with engine.connect() as conn:
        frame = pd.read_sql_query(text(query), conn)
    # A NULL in an all-integer column of SQLite comes back as None: float64 makes it NaN.
    return {column: frame.iloc[:, i].astype("float64" if column == "value" else dtype)
            .to_numpy().astype(dtype)
            for i, (column, dtype) in enumerate(zip(COLUMNS, DTYPES, strict=True))}
