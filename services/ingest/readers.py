"""Readers for the small text files of each layout: movies, users, links.

Each returns rows plus the errors found, naming file and line. Ratings and tags are
large and streamed by `services.ingest.ratings` and `services.ingest.tags`.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass

import numpy as np
import pandas as pd

from services.ingest.errors import ErrorReport, RowError
from services.ingest.layouts import Layout, year_from_title
from services.ingest.ratings import line_blocks
from services.ingest.sources import SourceFiles

ML_100K_GENRES = [
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
]
NO_GENRES = "(no genres listed)"


@dataclass
class MovieRow:
    id: int
    title: str
    year: int | None
    genres: str
    imdb_id: int | None = None
    tmdb_id: int | None = None


def parse_int(text: str) -> int | None:
    """A non-negative integer, or None when the text is not one."""
    text = text.strip()
    if text.lstrip("+").isdigit():
        return int(text)
    return None


def decoded_lines(
    files: SourceFiles, name: str, encoding: str, report: ErrorReport
) -> list[tuple[int, str]]:
    """(line number, text) for every non-empty line; undecodable lines become errors."""
    with files.open(name) as handle:
        data = handle.read()
    rows = []
    for number, raw in enumerate(data.splitlines(), start=1):
        try:
            text = raw.decode(encoding)
        except UnicodeDecodeError as error:
            report.add(
                RowError(
                    name,
                    number,
                    f"not valid {encoding} text: byte 0x{raw[error.start]:02x}"
                    f" at column {error.start + 1}",
                    raw.decode("latin-1"),
                ),
                "bad encoding",
            )
            continue
        if text.strip():
            rows.append((number, text))
    return rows


def _csv_records(lines: list[tuple[int, str]]) -> list[tuple[int, list[str]]]:
    """Parse CSV lines (quoted fields, no embedded newlines in MovieLens files)."""
    reader = csv.reader(io.StringIO("\n".join(text for _, text in lines)))
    return [(number, fields) for (number, _), fields in zip(lines, reader, strict=False)]


def _split(lines: list[tuple[int, str]], sep: str) -> list[tuple[int, list[str]]]:
    return [(number, text.split(sep)) for number, text in lines]


def read_movies(files: SourceFiles, layout: Layout, report: ErrorReport) -> dict[int, MovieRow]:
    """Movies with title, year and '|'-joined genres, keyed by id."""
    fmt, name = layout.format, layout.movies
    lines = decoded_lines(files, name, fmt.encoding, report)
    movies: dict[int, MovieRow] = {}
    if fmt.family == "100k":
        genres = ML_100K_GENRES
        if layout.genres:
            parsed = [
                t.split("|")[0] for _, t in decoded_lines(files, layout.genres, "latin-1", report)
            ]
            genres = parsed or genres
        records, expected = _split(lines, "|"), 5 + len(genres)
    elif fmt.family == "dat":
        records, expected = _split(lines, "::"), 3
    else:
        records, expected = _csv_records(lines), 3
        if records and records[0][1][:1] == ["movieId"]:
            records = records[1:]
    for number, fields in records:
        raw = "|".join(fields)
        if len(fields) != expected:
            report.add(
                RowError(name, number, f"expected {expected} columns, found {len(fields)}", raw),
                "wrong column count",
            )
            continue
        movie_id = parse_int(fields[0])
        if movie_id is None or movie_id <= 0:
            report.add(
                RowError(name, number, f"movie id {fields[0]!r} is not a positive integer", raw),
                "bad movie id",
            )
            continue
        if movie_id in movies:
            report.add(
                RowError(name, number, f"movie id {movie_id} appears twice", raw), "duplicate movie"
            )
            continue
        title = fields[1].strip()
        if fmt.family == "100k":
            flags = fields[5:]
            if any(f not in ("0", "1") for f in flags):
                report.add(
                    RowError(name, number, "genre flags must be 0 or 1", raw), "bad genre flags"
                )
                continue
            names = [g for g, f in zip(genres, flags, strict=True) if f == "1"]
            year = year_from_title(title)
            if year is None and fields[2][-4:].isdigit():
                year = int(fields[2][-4:])  # release date, e.g. 01-Jan-1995
        else:
            names = [] if fields[2].strip() == NO_GENRES else fields[2].strip().split("|")
            year = year_from_title(title)
        movies[movie_id] = MovieRow(movie_id, title, year, "|".join(n for n in names if n))
    return movies


LINK_COLUMNS = ["id", "imdb_id", "tmdb_id"]
BAD_LINK = "expected movieId,imdbId,tmdbId"
_DIGITS = r"\s*\+?\d+\s*"
_MAX_DIGITS = 18  # fits int64 (the BIGINT columns)


def _parse_link_block(file: str, first_line: int, raw: bytes, report: ErrorReport) -> pd.DataFrame:
    """movieId, imdbId, tmdbId as text per line of a block (pandas; line by line if needed)."""
    lines = raw.count(b"\n") + (0 if raw.endswith(b"\n") else 1)
    try:
        raw.decode("utf-8")
        frame = pd.read_csv(
            io.BytesIO(raw),
            header=None,
            names=["movie", "imdb", "tmdb", "extra"],
            dtype=str,
            keep_default_na=False,
            na_values=[],
            skip_blank_lines=False,
            engine="c",
        )
        # pandas pads a short line with "": only a quote-free block of exactly two commas
        # per line is known to have three fields on every line.
        if b'"' not in raw and raw.count(b",") == 2 * lines and len(frame) == lines:
            frame["line"] = np.arange(first_line, first_line + lines, dtype=np.int64)
            return frame
    except (UnicodeDecodeError, ValueError, pd.errors.ParserError):
        pass
    records: list[tuple[int, str, str, str]] = []
    numbered = [(first_line + i, line) for i, line in enumerate(raw.splitlines())]
    good: list[tuple[int, str]] = []
    for number, line in numbered:
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as error:
            report.add(
                RowError(
                    file,
                    number,
                    f"not valid utf-8 text: byte 0x{line[error.start]:02x}"
                    f" at column {error.start + 1}",
                    line.decode("latin-1"),
                ),
                "bad encoding",
            )
            continue
        if text.strip():
            good.append((number, text))
    for number, fields in _csv_records(good):
        if len(fields) != 3:
            report.add(RowError(file, number, BAD_LINK, ",".join(fields)), "bad link")
            continue
        records.append((number, *fields))  # type: ignore[arg-type]
    frame = pd.DataFrame(records, columns=["line", "movie", "imdb", "tmdb"], dtype=str)
    frame["line"] = frame["line"].astype(np.int64)
    return frame


def _id_column(text: pd.Series) -> tuple[pd.Series, np.ndarray, np.ndarray]:
    """(Int64 values, is a number, is too long for int64) of a column of id texts."""
    digits = text.str.strip().str.lstrip("+")
    numeric = text.str.fullmatch(_DIGITS).to_numpy(dtype=bool)
    too_long = numeric & (digits.str.len().to_numpy() > _MAX_DIGITS)
    usable = numeric & ~too_long
    values = pd.array(np.zeros(len(text), dtype=np.int64), dtype="Int64")
    if usable.any():
        values[usable] = digits[usable].astype(np.int64).to_numpy()
    values[~usable] = pd.NA
    return pd.Series(values, index=text.index), numeric, too_long


def read_links(files: SourceFiles, layout: Layout, report: ErrorReport) -> pd.DataFrame:
    """IMDb and TMDB ids per movie id from links.csv (LINK_COLUMNS; Int64, NA if absent).

    Read in blocks and checked column-wise, so the cost follows the number of links. A
    movie listed twice keeps its last line; an id that is not a number reads as absent.
    """
    empty = pd.DataFrame({c: pd.array([], dtype="Int64") for c in LINK_COLUMNS})
    if not layout.links:
        return empty
    name, parts = layout.links, []
    with files.open(name) as stream:
        header = stream.readline()
        first_line = 2
        if header and header.split(b",", 1)[0].strip() != b"movieId":
            first_line = 1
            stream = io.BytesIO(header + stream.read())  # no header: the first line is a link
        for start, raw in line_blocks(stream, first_line):
            frame = _parse_link_block(name, start, raw, report)
            movie, numeric, _ = _id_column(frame["movie"])
            for index in np.flatnonzero(~numeric):
                row = frame.iloc[index]
                report.add(
                    RowError(
                        name, int(row["line"]), BAD_LINK, f"{row.movie},{row.imdb},{row.tmdb}"
                    ),
                    "bad link",
                )
            imdb, _, imdb_long = _id_column(frame["imdb"])
            tmdb, _, tmdb_long = _id_column(frame["tmdb"])
            for index in np.flatnonzero(numeric & (imdb_long | tmdb_long)):
                row = frame.iloc[index]
                report.add(
                    RowError(
                        name,
                        int(row["line"]),
                        f"imdbId {row.imdb.strip()!r} or tmdbId {row.tmdb.strip()!r} is out of "
                        "range",
                        f"{row.movie},{row.imdb},{row.tmdb}",
                    ),
                    "bad link",
                )
            keep = numeric & ~imdb_long & ~tmdb_long & movie.notna().to_numpy(dtype=bool)
            parts.append(
                pd.DataFrame({"id": movie[keep], "imdb_id": imdb[keep], "tmdb_id": tmdb[keep]})
            )
    if not parts:
        return empty
    links = pd.concat(parts, ignore_index=True)
    return links.drop_duplicates("id", keep="last").reset_index(drop=True)


def read_users(files: SourceFiles, layout: Layout, report: ErrorReport) -> list[tuple]:
    """Demographics where the release has them (ml-100k u.user, ml-1m users.dat)."""
    if not layout.users:
        return []
    family, name = layout.format.family, layout.users
    lines = decoded_lines(files, name, layout.format.encoding, report)
    users = []
    for number, fields in _split(lines, "|" if family == "100k" else "::"):
        if len(fields) != 5 or parse_int(fields[0]) is None:
            report.add(
                RowError(
                    name,
                    number,
                    f"expected 5 columns with a numeric user id, found {len(fields)}",
                    "|".join(fields),
                ),
                "bad user",
            )
            continue
        if family == "100k":
            user_id, age, gender, occupation, zip_code = fields
        else:
            user_id, gender, age, occupation, zip_code = fields
        users.append(
            (
                int(user_id),
                parse_int(age),
                gender.strip() or None,
                occupation.strip() or None,
                zip_code.strip() or None,
            )
        )
    return users
