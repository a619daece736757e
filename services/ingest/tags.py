"""Streaming tags: read a tags file in blocks of lines, validate each block as a whole.

Like ratings, a block is parsed by pandas' C parser and checked with numpy (set
membership of the movie ids against the sorted catalogue), so the cost follows the
number of tags; a block that will not parse cleanly is read line by line so each bad
line gets its own reason.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd

from services.ingest.errors import RowError
from services.ingest.layouts import Layout
from services.ingest.ratings import MAX_ID, line_blocks
from services.ingest.readers import parse_int
from services.ingest.sources import SourceFiles

TAG_COLUMNS = ["user_id", "movie_id", "tag", "tagged_at"]
BAD_TAG = "expected userId, movieId, tag, timestamp"
_DTYPES = {
    "user_id": "int64",
    "movie_id": "int64",
    "tag": "object",
    "tagged_at": "int64",
    "extra": "object",
}


@dataclass
class TagBlock:
    """The valid rows of one block, their line numbers, and the errors of the others."""

    first_line: int
    frame: pd.DataFrame  # TAG_COLUMNS, valid rows only
    lines: np.ndarray  # line number of each row of `frame`
    errors: list[tuple[RowError, str]]  # (error, kind)


def _line_count(raw: bytes) -> int:
    return raw.count(b"\n") + (0 if raw.endswith(b"\n") else 1)


class TagsValidator:
    """Checks the tags file of a layout against the known movie ids, block by block."""

    def __init__(self, layout: Layout, known_movies: np.ndarray) -> None:
        if not layout.tags:
            raise ValueError(f"{layout.dataset} has no tags file")
        self.file = layout.tags
        self.csv = layout.format.family == "csv"
        self.encoding = layout.format.encoding
        self.known_movies = np.sort(known_movies.astype(np.int64))

    def blocks(self, files: SourceFiles) -> Iterator[TagBlock]:
        """Every block of the file, validated; the CSV header line is skipped if present."""
        with files.open(self.file) as stream:
            first_line = 1
            if self.csv:
                header = stream.readline()
                if header and header.split(b",", 1)[0].strip() != b"userId":
                    yield self.block(1, header)  # no header: the first line is a tag
                first_line = 2
            for start, raw in line_blocks(stream, first_line):
                yield self.block(start, raw)

    def block(self, first_line: int, raw: bytes) -> TagBlock:
        frame = self._fast_parse(raw)
        if frame is not None:
            lines = np.arange(first_line, first_line + len(frame), dtype=np.int64)
            errors: list[tuple[RowError, str]] = []
        else:
            frame, lines, errors = self._slow_parse(first_line, raw)
        keep = self._check_values(frame, lines, errors, raw, first_line)
        if not keep.all():
            frame, lines = frame[keep], lines[keep]
        if errors:
            errors.sort(key=lambda item: item[0].line)
        return TagBlock(first_line, frame.reset_index(drop=True), lines, errors)

    def _fast_parse(self, raw: bytes) -> pd.DataFrame | None:
        """The whole block at C speed; None when any line needs a closer look."""
        try:
            raw.decode(self.encoding)
        except UnicodeDecodeError:
            return None
        data = raw if self.csv else raw.replace(b"::", b"\t")
        try:
            frame = pd.read_csv(
                io.BytesIO(data),
                sep="," if self.csv else "\t",
                header=None,
                names=[*TAG_COLUMNS, "extra"],
                dtype=_DTYPES,
                encoding=self.encoding,
                keep_default_na=False,  # a tag "NA" or "null" is a tag, not a missing value
                na_values=[],
                skip_blank_lines=False,
                quoting=csv.QUOTE_MINIMAL if self.csv else csv.QUOTE_NONE,
                engine="c",
            )
        except (ValueError, pd.errors.ParserError):
            return None
        # A quoted newline would shift line numbers; a fifth field is a malformed line.
        if len(frame) != _line_count(raw) or frame["extra"].ne("").any():
            return None
        return frame[TAG_COLUMNS]

    def _slow_parse(
        self, first_line: int, raw: bytes
    ) -> tuple[pd.DataFrame, np.ndarray, list[tuple[RowError, str]]]:
        """Line by line, as the text readers do: blank lines skipped, each bad line named."""
        errors: list[tuple[RowError, str]] = []
        texts: list[tuple[int, str]] = []
        for offset, line in enumerate(raw.splitlines()):
            number = first_line + offset
            try:
                text = line.decode(self.encoding)
            except UnicodeDecodeError as error:
                errors.append(
                    (
                        RowError(
                            self.file,
                            number,
                            f"not valid {self.encoding} text: byte 0x{line[error.start]:02x}"
                            f" at column {error.start + 1}",
                            line.decode("latin-1"),
                        ),
                        "bad encoding",
                    )
                )
                continue
            if text.strip():
                texts.append((number, text))
        if self.csv:
            reader = csv.reader(io.StringIO("\n".join(text for _, text in texts)))
            records = [(n, fields) for (n, _), fields in zip(texts, reader, strict=False)]
        else:
            records = [(n, text.split("::")) for n, text in texts]
        rows: list[tuple[int, int, str, int]] = []
        numbers: list[int] = []
        for number, fields in records:
            parsed = (
                [parse_int(fields[0]), parse_int(fields[1]), parse_int(fields[-1])]
                if fields
                else [None]
            )
            if len(fields) != 4 or None in parsed:
                errors.append((RowError(self.file, number, BAD_TAG, "|".join(fields)), "bad tag"))
                continue
            user, movie, stamp = parsed
            rows.append((user, movie, fields[2], stamp))  # type: ignore[arg-type]
            numbers.append(number)
        frame = pd.DataFrame(rows, columns=TAG_COLUMNS)
        frame = frame.astype({"user_id": "int64", "movie_id": "int64", "tagged_at": "int64"})
        return frame, np.array(numbers, dtype=np.int64), errors

    def _check_values(
        self,
        frame: pd.DataFrame,
        lines: np.ndarray,
        errors: list[tuple[RowError, str]],
        raw: bytes,
        first_line: int,
    ) -> np.ndarray:
        """Mark rows with bad values as errors; returns which rows of `frame` stay."""
        users = frame["user_id"].to_numpy()
        movies = frame["movie_id"].to_numpy()
        stamps = frame["tagged_at"].to_numpy()
        keep = np.ones(len(frame), dtype=bool)
        tags = frame["tag"]
        no_nul = (
            ~tags.str.contains("\x00", regex=False).to_numpy(dtype=bool) if b"\x00" in raw else keep
        )
        checks = [
            ((users < 0) | (movies < 0) | (stamps < 0), "bad tag", lambda i: BAD_TAG),
            (
                (users > MAX_ID) | (movies > MAX_ID),
                "bad tag",
                lambda i: f"user id {users[i]} or movie id {movies[i]} is out of range",
            ),
            (~no_nul, "bad tag", lambda i: "tag holds a NUL byte"),
            (
                ~np.isin(movies, self.known_movies, assume_unique=False),
                "unknown movie",
                lambda i: f"tag of unknown movie {movies[i]}",
            ),
        ]
        raw_lines: list[bytes] | None = None
        for mask, kind, describe in checks:
            failed = np.flatnonzero(mask & keep)
            if not len(failed):
                continue
            raw_lines = raw_lines if raw_lines is not None else raw.splitlines()
            for i in failed:
                line = int(lines[i])
                text = raw_lines[line - first_line].decode(self.encoding, "replace")
                errors.append((RowError(self.file, line, describe(i), text), kind))
            keep[failed] = False
        return keep


def copy_text(frame: pd.DataFrame) -> bytes:
    """A frame of tags as CSV for `COPY ... WITH (FORMAT csv, FORCE_NOT_NULL (tag))`."""
    return frame.to_csv(header=False, index=False, lineterminator="\n").encode("utf-8")
