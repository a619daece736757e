"""The GroupLens MovieLens layouts, and detection of which one a source holds."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePosixPath

from services.ingest.errors import IngestError


@dataclass(frozen=True)
class Format:
    """How one family of releases writes its files."""

    family: str  # "100k", "dat" or "csv"
    ratings_file: str
    movies_file: str
    users_file: str | None
    tags_file: str | None
    links_file: str | None
    half_stars: bool
    encoding: str  # of the text files (movies, tags)


ML_100K = Format("100k", "u.data", "u.item", "u.user", None, None, False, "latin-1")
ML_1M = Format("dat", "ratings.dat", "movies.dat", "users.dat", None, None, False, "latin-1")
ML_10M = Format("dat", "ratings.dat", "movies.dat", None, "tags.dat", None, True, "utf-8")
ML_CSV = Format("csv", "ratings.csv", "movies.csv", None, "tags.csv", "links.csv", True, "utf-8")

DATASETS: dict[str, Format] = {
    "ml-100k": ML_100K,
    "ml-1m": ML_1M,
    "ml-10m": ML_10M,
    "ml-20m": ML_CSV,
    "ml-25m": ML_CSV,
    "ml-32m": ML_CSV,
    "ml-latest": ML_CSV,
    "ml-latest-small": ML_CSV,
}


@dataclass(frozen=True)
class Layout:
    """A detected data set: its name, format, and the member names of its files."""

    dataset: str
    format: Format
    ratings: str
    movies: str
    users: str | None
    tags: str | None
    links: str | None
    genres: str | None

    def data_files(self) -> list[str]:
        """Every file whose content defines the batch, in a fixed order."""
        files = [self.ratings, self.movies, self.users, self.tags, self.links, self.genres]
        return [f for f in files if f]


def _by_basename(names: list[str]) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for name in names:
        found.setdefault(PurePosixPath(name).name, []).append(name)
    return found


def _guess_csv_dataset(names: list[str], description: str) -> str:
    text = " ".join([description, *names]).lower()
    for candidate in ("ml-latest-small", "ml-20m", "ml-25m", "ml-32m"):
        if candidate in text:
            return candidate
    return "ml-latest"


def detect_layout(names: list[str], description: str, dataset: str | None = None) -> Layout:
    """Find the layout among the file names; `dataset` overrides detection."""
    found = _by_basename(names)
    if dataset is not None:
        dataset = dataset.lower()
        if dataset not in DATASETS:
            raise IngestError(
                f"--dataset {dataset!r} is not a MovieLens data set; expected one of "
                + ", ".join(DATASETS)
            )
        fmt = DATASETS[dataset]
    elif "u.data" in found and "u.item" in found:
        dataset, fmt = "ml-100k", ML_100K
    elif "ratings.dat" in found and "movies.dat" in found:
        dataset, fmt = ("ml-1m", ML_1M) if "users.dat" in found else ("ml-10m", ML_10M)
    elif "ratings.csv" in found and "movies.csv" in found:
        dataset, fmt = _guess_csv_dataset(names, description), ML_CSV
    else:
        shown = ", ".join(names[:12]) + (" ..." if len(names) > 12 else "") or "nothing"
        raise IngestError(
            f"{description}: no MovieLens layout found (expected u.data + u.item, "
            f"ratings.dat + movies.dat, or ratings.csv + movies.csv); found {shown}"
        )

    def pick(basename: str | None, required: bool) -> str | None:
        if basename is None:
            return None
        candidates = sorted(found.get(basename, []), key=lambda n: (n.count("/"), n))
        if not candidates:
            if required:
                raise IngestError(f"{description}: missing file {basename} for {dataset}")
            return None
        return candidates[0]

    return Layout(
        dataset=dataset,
        format=fmt,
        ratings=pick(fmt.ratings_file, True) or "",
        movies=pick(fmt.movies_file, True) or "",
        users=pick(fmt.users_file, False),
        tags=pick(fmt.tags_file, False),
        links=pick(fmt.links_file, False),
        genres=pick("u.genre", False) if fmt.family == "100k" else None,
    )


YEAR_IN_TITLE = re.compile(r"\((\d{4})(?:[-–]\d{0,4})?\)\s*$")


def year_from_title(title: str) -> int | None:
    """MovieLens titles end with the year in parentheses: 'Toy Story (1995)'."""
    match = YEAR_IN_TITLE.search(title)
    return int(match.group(1)) if match else None
