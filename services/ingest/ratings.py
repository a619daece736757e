"""Streaming ratings: read a ratings file in blocks of lines, validate each block.

A block is parsed by pandas' C parser (fast path); a block that will not parse cleanly
is parsed line by line (slow path) so every bad line gets its own reason. Memory stays
bounded by the block size whatever the file size.
"""

from __future__ import annotations

import csv
import io
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO

import numpy as np
import pandas as pd

from services.ingest.errors import IngestError, RowError
from services.ingest.layouts import Format

BLOCK_BYTES = 16 << 20
CSV_HEADER = ["userid", "movieid", "rating", "timestamp"]
COLUMNS = ["user_id", "movie_id", "rating", "rated_at"]
MAX_ID = 2**31 - 1
_INT = re.compile(r"^\s*\+?\d+\s*$")


@dataclass
class RatingBlock:
    """Rows of one block: parsed values, which rows are valid, and their raw bytes."""

    file: str
    first_line: int
    raw: bytes  # separator-normalised rows, as COPY reads them
    frame: pd.DataFrame  # COLUMNS; undefined values on invalid rows
    valid: np.ndarray  # bool per row
    errors: list[tuple[RowError, str]]  # (error, kind)

    @property
    def lines(self) -> int:
        return len(self.valid)

    def valid_raw(self, also_drop: np.ndarray | None = None) -> bytes:
        """Raw bytes of the valid rows only (rows in `also_drop`, by index, removed too)."""
        keep = self.valid.copy()
        if also_drop is not None and len(also_drop):
            keep[also_drop] = False
        if keep.all():
            return self.raw
        lines = self.raw.splitlines(keepends=True)
        return b"".join(line for line, ok in zip(lines, keep, strict=True) if ok)


def _separator(fmt: Format) -> str:
    return "," if fmt.family == "csv" else "\t"


def raw_blocks(
    stream: IO[bytes], fmt: Format, file: str, on_bytes: Callable[[int], None] | None = None
) -> Iterator[tuple[int, bytes]]:
    """(first line number, raw bytes) per block; checks the CSV header."""
    first_line = 1
    if fmt.family == "csv":
        header = stream.readline()
        names = header.decode("utf-8", "replace").strip().lower().split(",")
        if names != CSV_HEADER:
            raise IngestError(
                f"{file}:1: expected header userId,movieId,rating,timestamp, found "
                f"{header.decode('utf-8', 'replace').strip()!r}"
            )
        first_line = 2
        if on_bytes:
            on_bytes(len(header))
    for start, raw in line_blocks(stream, first_line, on_bytes):
        if fmt.family == "dat":
            raw = raw.replace(b"::", b"\t")
        yield start, raw


def line_blocks(
    stream: IO[bytes], first_line: int = 1, on_bytes: Callable[[int], None] | None = None
) -> Iterator[tuple[int, bytes]]:
    """(first line number, raw bytes) per block of whole lines of about BLOCK_BYTES."""
    # Fixed-size reads cut at the last newline: much cheaper than readlines() + join.
    carry = b""
    while True:
        chunk = stream.read(BLOCK_BYTES)
        data = carry + chunk
        if not data:
            return
        cut = data.rfind(b"\n") + 1 if chunk else len(data)
        if cut == 0:  # one line longer than a block: keep reading
            carry = data
            continue
        raw, carry = data[:cut], data[cut:]
        if on_bytes:
            on_bytes(len(raw))
        yield first_line, raw
        first_line += raw.count(b"\n") + (0 if raw.endswith(b"\n") else 1)


def _fast_parse(raw: bytes, sep: str) -> pd.DataFrame | None:
    """pandas C parser with strict integer columns; None when anything is off."""
    try:
        frame = pd.read_csv(
            io.BytesIO(raw),
            sep=sep,
            header=None,
            names=[*COLUMNS, "extra"],
            dtype={
                "user_id": "int64",
                "movie_id": "int64",
                "rating": "float64",
                "rated_at": "int64",
                "extra": "object",
            },
            skip_blank_lines=False,
            quoting=csv.QUOTE_NONE,
            engine="c",
        )
    except (ValueError, pd.errors.ParserError):
        return None
    if frame["extra"].notna().any() or frame["rating"].isna().any():
        return None
    return frame[COLUMNS]


def _slow_parse(
    raw: bytes, sep: str, file: str, first_line: int, fmt: Format
) -> tuple[pd.DataFrame, np.ndarray, list[tuple[RowError, str]]]:
    """Line by line, so each malformed line is named with its reason."""
    lines = raw.splitlines()
    values = np.zeros((len(lines), 4), dtype=np.float64)
    valid = np.ones(len(lines), dtype=bool)
    errors: list[tuple[RowError, str]] = []
    for index, line in enumerate(lines):
        text = line.decode("utf-8", "replace")
        fields = text.split(sep)

        def bad(reason: str, kind: str, i: int = index, t: str = text) -> None:
            valid[i] = False
            errors.append((RowError(file, first_line + i, reason, t), kind))

        if not text.strip():
            bad("empty line", "wrong column count")
            continue
        if len(fields) != 4:
            bad(
                f"expected 4 columns (user, movie, rating, timestamp), found {len(fields)}",
                "wrong column count",
            )
            continue
        user, movie, rating, stamp = (f.strip() for f in fields)
        if not _INT.match(user):
            bad(f"user id {user!r} is not an integer", "non-numeric value")
        elif not _INT.match(movie):
            bad(f"movie id {movie!r} is not an integer", "non-numeric value")
        elif not _INT.match(stamp):
            bad(f"timestamp {stamp!r} is not an integer (unix seconds)", "bad timestamp")
        else:
            try:
                score = float(rating)
            except ValueError:
                bad(f"rating {rating!r} is not a number", "non-numeric value")
                continue
            if score != score:
                bad(f"rating {rating!r} is not a number", "non-numeric value")
                continue
            values[index] = (int(user), int(movie), score, int(stamp))
    frame = pd.DataFrame(
        {
            "user_id": values[:, 0].astype(np.int64),
            "movie_id": values[:, 1].astype(np.int64),
            "rating": values[:, 2],
            "rated_at": values[:, 3].astype(np.int64),
        }
    )
    return frame, valid, errors


class RatingsValidator:
    """Checks ranges, scale, timestamps and movie references, block by block."""

    def __init__(self, fmt: Format, file: str, known_movies: np.ndarray) -> None:
        self.fmt, self.file = fmt, file
        self.known_movies = np.sort(known_movies.astype(np.int64))
        self.latest = int(time.time()) + 86_400  # a day of clock skew

    def block(self, first_line: int, raw: bytes) -> RatingBlock:
        sep = _separator(self.fmt)
        frame = _fast_parse(raw, sep)
        if frame is not None:
            valid = np.ones(len(frame), dtype=bool)
            errors: list[tuple[RowError, str]] = []
        else:
            frame, valid, errors = _slow_parse(raw, sep, self.file, first_line, self.fmt)
        self._check_values(frame, valid, errors, first_line, raw)
        return RatingBlock(self.file, first_line, raw, frame, valid, errors)

    def _check_values(
        self,
        frame: pd.DataFrame,
        valid: np.ndarray,
        errors: list[tuple[RowError, str]],
        first_line: int,
        raw: bytes,
    ) -> None:
        users = frame["user_id"].to_numpy()
        movies = frame["movie_id"].to_numpy()
        ratings = frame["rating"].to_numpy()
        stamps = frame["rated_at"].to_numpy()
        if self.fmt.half_stars:
            bad_rating = (ratings < 0.5) | (ratings > 5.0) | (ratings * 2 != np.round(ratings * 2))
            scale = "a half star from 0.5 to 5.0"
        else:
            bad_rating = (ratings < 1) | (ratings > 5) | (ratings != np.round(ratings))
            scale = "a whole number from 1 to 5"
        checks = [
            (
                (users <= 0) | (users > MAX_ID),
                "bad user id",
                lambda i: f"user id {users[i]} is out of range",
            ),
            (
                (movies <= 0) | (movies > MAX_ID),
                "bad movie id",
                lambda i: f"movie id {movies[i]} is out of range",
            ),
            (bad_rating, "rating out of range", lambda i: f"rating {ratings[i]:g} is not {scale}"),
            (
                (stamps < 0) | (stamps > self.latest),
                "bad timestamp",
                lambda i: f"timestamp {stamps[i]} is not a unix time up to now",
            ),
            (
                ~np.isin(movies, self.known_movies),
                "unknown movie",
                lambda i: f"movie {movies[i]} is not in the movies file or the database",
            ),
        ]
        lines: list[bytes] | None = None
        for mask, kind, describe in checks:
            failed = np.flatnonzero(mask & valid)
            if not len(failed):
                continue
            lines = lines if lines is not None else raw.splitlines()
            for i in failed:
                errors.append(
                    (
                        RowError(
                            self.file,
                            first_line + int(i),
                            describe(i),
                            lines[i].decode("utf-8", "replace"),
                        ),
                        kind,
                    )
                )
            valid[failed] = False


def duplicate_rows(keys: list[np.ndarray], lines: list[np.ndarray]) -> list[tuple[int, int]]:
    """(line, line of its first occurrence) for repeated (user, movie, timestamp) rows.

    `keys` holds per block an (n, 2) int64 array of (user << 32 | movie, timestamp).
    """
    if not keys:
        return []
    pairs = np.concatenate(keys)
    where = np.concatenate(lines)
    order = np.lexsort((where, pairs[:, 1], pairs[:, 0]))
    ordered = pairs[order]
    same = np.all(ordered[1:] == ordered[:-1], axis=1)
    repeats = np.flatnonzero(same) + 1
    result = []
    for position in repeats:
        start = position
        while start > 0 and same[start - 1]:
            start -= 1
        result.append((int(where[order[position]]), int(where[order[start]])))
    return sorted(result)


def row_keys(block: RatingBlock) -> tuple[np.ndarray, np.ndarray]:
    """Exact (user << 32 | movie, timestamp) keys and line numbers of a block's valid rows."""
    index = np.flatnonzero(block.valid)
    frame = block.frame
    users = frame["user_id"].to_numpy()[index]
    movies = frame["movie_id"].to_numpy()[index]
    pairs = np.column_stack(((users << 32) | movies, frame["rated_at"].to_numpy()[index]))
    return pairs, index.astype(np.int64) + block.first_line
