"""Readers for the small text files of each layout: movies, users, tags, links.

Each returns rows plus the errors found, naming file and line. Ratings are large and
streamed by `services.ingest.ratings`.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field

from services.ingest.errors import ErrorReport, RowError
from services.ingest.layouts import Layout, year_from_title
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


@dataclass
class TextTables:
    """What the small files hold once parsed."""

    movies: dict[int, MovieRow] = field(default_factory=dict)
    users: list[tuple[int, int | None, str | None, str | None, str | None]] = field(
        default_factory=list
    )
    tags: list[tuple[int, int, str, int]] = field(default_factory=list)


def _int(text: str) -> int | None:
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
        movie_id = _int(fields[0])
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


def read_links(
    files: SourceFiles, layout: Layout, movies: dict[int, MovieRow], report: ErrorReport
) -> None:
    """Attach IMDb and TMDB ids from links.csv to the movies."""
    if not layout.links:
        return
    records = _csv_records(decoded_lines(files, layout.links, "utf-8", report))
    for number, fields in records[1:] if records and records[0][1][:1] == ["movieId"] else records:
        if len(fields) != 3 or _int(fields[0]) is None:
            report.add(
                RowError(layout.links, number, "expected movieId,imdbId,tmdbId", ",".join(fields)),
                "bad link",
            )
            continue
        movie = movies.get(int(fields[0]))
        if movie is not None:
            movie.imdb_id, movie.tmdb_id = _int(fields[1]), _int(fields[2])


def read_users(files: SourceFiles, layout: Layout, report: ErrorReport) -> list[tuple]:
    """Demographics where the release has them (ml-100k u.user, ml-1m users.dat)."""
    if not layout.users:
        return []
    family, name = layout.format.family, layout.users
    lines = decoded_lines(files, name, layout.format.encoding, report)
    users = []
    for number, fields in _split(lines, "|" if family == "100k" else "::"):
        if len(fields) != 5 or _int(fields[0]) is None:
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
                _int(age),
                gender.strip() or None,
                occupation.strip() or None,
                zip_code.strip() or None,
            )
        )
    return users


def read_tags(files: SourceFiles, layout: Layout, report: ErrorReport) -> list[tuple]:
    """Free-text tags (ml-10m tags.dat, tags.csv of the CSV releases)."""
    if not layout.tags:
        return []
    name = layout.tags
    lines = decoded_lines(files, name, layout.format.encoding, report)
    if layout.format.family == "csv":
        records = _csv_records(lines)
        if records and records[0][1][:1] == ["userId"]:
            records = records[1:]
    else:
        records = _split(lines, "::")
    tags = []
    for number, fields in records:
        parsed = (
            [_int(fields[0]), _int(fields[1]), None, _int(fields[-1])]
            if len(fields) >= 4
            else [None]
        )
        if len(fields) != 4 or None in (parsed[0], parsed[1], parsed[3]):
            report.add(
                RowError(
                    name, number, "expected userId, movieId, tag, timestamp", "|".join(fields)
                ),
                "bad tag",
            )
            continue
        tags.append((parsed[0], parsed[1], fields[2], parsed[3]))
    return tags
