"""Ingest a MovieLens source: detect, validate, load in one transaction, record the batch."""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import psycopg2.errors
import sqlalchemy.exc
from sqlalchemy import Connection, Engine, func, select, update

from services.ingest import loader
from services.ingest.errors import ErrorReport, IngestError, RejectedInput, RowError
from services.ingest.layouts import Layout, detect_layout
from services.ingest.ratings import (
    RatingBlock,
    RatingsValidator,
    duplicate_rows,
    raw_blocks,
    row_keys,
)
from services.ingest.readers import MovieRow, read_links, read_movies, read_users
from services.ingest.sources import SourceFiles, open_source
from services.ingest.tags import TagsValidator, copy_text
from shared.db import IngestBatch, IngestReject, Movie, UserProfile, get_engine, session_scope
from shared.events import get_event_bus
from shared.settings import get_settings

log = logging.getLogger(__name__)
KEEP_ALL = 1 << 62  # lenient runs store every reject, so the report keeps them all
Progress = Callable[[int], None]


@dataclass
class IngestResult:
    status: str  # "loaded" or "unchanged"
    batch_id: int
    dataset: str
    source: str
    sha256: str
    ratings: int
    movies: int
    users: int
    tags: int
    rejected: int
    seconds: float
    message: str
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def content_sha256(files: SourceFiles, layout: Layout) -> str:
    """Identity of a batch: its data files' names and bytes, whatever the container."""
    digest = hashlib.sha256(layout.dataset.encode())
    for name in layout.data_files():
        digest.update(b"\0" + name.rsplit("/", 1)[-1].encode() + b"\0")
        with files.open(name) as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def _existing(engine: Engine, sha256: str) -> IngestBatch | None:
    with session_scope(engine) as session:
        return session.scalars(select(IngestBatch).where(IngestBatch.sha256 == sha256)).first()


def _unchanged(batch: IngestBatch, seconds: float) -> IngestResult:
    return IngestResult(
        "unchanged",
        batch.id,
        batch.dataset,
        batch.source,
        batch.sha256,
        batch.ratings,
        batch.movies,
        batch.users,
        batch.tags,
        batch.rejected,
        round(seconds, 3),
        f"already ingested as batch {batch.id} on {batch.created_at:%Y-%m-%d %H:%M}; "
        "nothing changed",
    )


class _RatingsRun:
    """State of one pass over the ratings file."""

    def __init__(
        self,
        files: SourceFiles,
        layout: Layout,
        known: np.ndarray,
        progress: Progress | None,
        lenient: bool = False,
    ) -> None:
        self.files, self.layout, self.progress = files, layout, progress
        self.validator = RatingsValidator(layout.format, layout.ratings, known)
        self.report = ErrorReport(keep=KEEP_ALL if lenient else 20)
        self.user_ids: list[np.ndarray] = []
        self.valid_rows = 0

    def blocks(self) -> Iterator[RatingBlock]:
        with self.files.open(self.layout.ratings) as stream:
            for first_line, raw in raw_blocks(
                stream, self.layout.format, self.layout.ratings, self.progress
            ):
                block = self.validator.block(first_line, raw)
                for error, kind in block.errors:
                    self.report.add(error, kind)
                yield block

    def count(self, block: RatingBlock, drop: np.ndarray | None = None) -> None:
        keep = block.valid.copy()
        if drop is not None and len(drop):
            keep[drop] = False
        self.valid_rows += int(keep.sum())
        self.user_ids.append(np.unique(block.frame["user_id"].to_numpy()[keep]))

    @property
    def users(self) -> int:
        return len(np.unique(np.concatenate(self.user_ids))) if self.user_ids else 0


def _load_strict(conn: Connection, run: _RatingsRun, description: str) -> None:
    """Every row must be valid; rows go to the database as they are validated."""
    csv_format = run.layout.format.family == "csv"

    def chunks() -> Iterator[bytes]:
        for block in run.blocks():
            run.count(block)
            if not run.report.total:
                yield block.raw
        if run.report.total:
            raise RejectedInput(description, run.report)

    if loader.is_postgres(conn):
        loader.copy_ratings(conn, chunks(), csv_format)
        return
    for block in run.blocks():
        run.count(block)
        if not run.report.total:
            valid = block.frame
            loader.insert_ratings(conn, valid)
    if run.report.total:
        raise RejectedInput(description, run.report)


def _duplicates(
    run_factory: Callable[[], _RatingsRun],
) -> tuple[_RatingsRun, list[tuple[int, int]]]:
    run = run_factory()
    keys, lines = [], []
    for block in run.blocks():
        pairs, where = row_keys(block)
        keys.append(pairs)
        lines.append(where)
    return run, duplicate_rows(keys, lines)


def _load_lenient(
    conn: Connection, run_factory: Callable[[], _RatingsRun], batch_id: int
) -> tuple[_RatingsRun, int]:
    """Good rows load; bad rows and repeats become `ingest_reject` rows. Returns rejects."""
    _, repeats = _duplicates(run_factory)
    repeat_of = dict(repeats)
    run = run_factory()
    loader.create_stage(conn)
    rejects: list[dict[str, Any]] = []
    repeated = np.fromiter(repeat_of, dtype=np.int64, count=len(repeat_of))
    for block in run.blocks():
        lines = np.arange(block.first_line, block.first_line + block.lines)
        drop = np.flatnonzero(np.isin(lines, repeated))
        raw_lines = block.raw.splitlines() if len(drop) else []
        for index in drop:
            line = int(lines[index])
            run.report.add(
                RowError(
                    block.file,
                    line,
                    f"duplicate (user, movie, timestamp) of line {repeat_of[line]}",
                    raw_lines[index].decode("utf-8", "replace"),
                ),
                "duplicate row",
            )
        run.count(block, drop)
        keep = block.valid.copy()
        if len(drop):
            keep[drop] = False
        loader.insert_ratings(
            conn,
            block.frame[keep],
            table="rating_stage",
            line_numbers=(np.flatnonzero(keep) + block.first_line).tolist(),
        )
        rejects.extend(
            {"batch_id": batch_id, "file": e.file, "line": e.line, "reason": e.reason, "raw": e.raw}
            for e, _ in block.errors
        )
    rejects.extend(
        {"batch_id": batch_id, "file": e.file, "line": e.line, "reason": e.reason, "raw": e.raw}
        for e in run.report.first
        if e.reason.startswith("duplicate")
    )
    loader.insert_rows(conn, IngestReject.__table__, rejects)
    loaded, conflicts = loader.merge_stage(conn, batch_id, run.layout.ratings)
    run.valid_rows = loaded
    return run, len(rejects) + conflicts


def _explain_duplicates(
    run_factory: Callable[[], _RatingsRun], description: str, error: Exception
) -> IngestError:
    """After the database refused a repeated key: name the repeated lines, or the clash."""
    run, repeats = _duplicates(run_factory)
    if repeats:
        report = ErrorReport()
        for line, first in repeats:
            report.add(
                RowError(
                    run.layout.ratings, line, f"duplicate (user, movie, timestamp) of line {first}"
                ),
                "duplicate row",
            )
        return RejectedInput(description, report)
    detail = getattr(getattr(error, "diag", None), "message_detail", None) or str(error)
    return IngestError(
        f"{description}: ratings already in the database from an earlier batch ({detail}); "
        "the database is unchanged. Use --lenient to load only the new rows."
    )


def _reject_rows(batch_id: int, errors: Iterable[RowError]) -> list[dict[str, Any]]:
    return [
        {"batch_id": batch_id, "file": e.file, "line": e.line, "reason": e.reason, "raw": e.raw}
        for e in errors
    ]


def _movie_frame(movies: dict[int, MovieRow], links: pd.DataFrame) -> pd.DataFrame:
    """The movie table's rows: the movies file, with IMDb and TMDB ids where links has them."""
    frame = pd.DataFrame(
        {
            "id": pd.array([m.id for m in movies.values()], dtype="Int64"),
            "title": pd.Series([m.title for m in movies.values()], dtype=object),
            "year": pd.array([m.year for m in movies.values()], dtype="Int64"),
            "genres": pd.Series([m.genres for m in movies.values()], dtype=object),
        }
    )
    return frame.merge(links, on="id", how="left").astype({"imdb_id": "Int64", "tmdb_id": "Int64"})


def _load_tags(
    conn: Connection,
    files: SourceFiles,
    layout: Layout,
    known: np.ndarray,
    lenient: bool,
    batch_id: int,
) -> tuple[int, int]:
    """Tags validated block by block and loaded as they go. Returns (loaded, rejected).

    Strict: the first bad tag stops the loading, the rest is still read for the report,
    then RejectedInput rolls the transaction back. Lenient: bad tags become rejects.
    """
    if not layout.tags:
        return 0, 0
    validator = TagsValidator(layout, known)
    report = ErrorReport(keep=KEEP_ALL if lenient else 20)
    rejects: list[dict[str, Any]] = []
    loaded = 0

    def frames() -> Iterator[pd.DataFrame]:
        nonlocal loaded
        for block in validator.blocks(files):
            for error, kind in block.errors:
                report.add(error, kind)
            if lenient:
                rejects.extend(_reject_rows(batch_id, (e for e, _ in block.errors)))
            if (lenient or not report.total) and len(block.frame):
                loaded += len(block.frame)
                yield block.frame

    if loader.is_postgres(conn):
        loader.copy_tags(conn, (copy_text(frame) for frame in frames()))
    else:
        for frame in frames():
            loader.insert_tags(conn, frame)
    if report.total and not lenient:
        raise RejectedInput(files.description, report)
    loader.insert_rows(conn, IngestReject.__table__, rejects)
    return loaded, len(rejects)


def ingest_source(
    source: str,
    dataset: str | None = None,
    lenient: bool = False,
    progress: Progress | None = None,
    engine: Engine | None = None,
    on_layout: Callable[[Layout, int], None] | None = None,
) -> IngestResult:
    """Ingest a MovieLens directory, zip or URL; idempotent on the data's content."""
    started, clock = dt.datetime.now(dt.UTC), time.perf_counter()
    settings = get_settings()
    engine = engine or get_engine()
    timings: dict[str, float] = {}
    with open_source(source, settings.data_path / "downloads") as files:
        layout = detect_layout(files.names(), files.description, dataset)
        if on_layout:
            on_layout(layout, files.size(layout.ratings))
        sha256 = content_sha256(files, layout)
        timings["checksum"] = round(time.perf_counter() - clock, 3)
        if (batch := _existing(engine, sha256)) is not None:
            return _unchanged(batch, time.perf_counter() - clock)
        text_report = ErrorReport(keep=KEEP_ALL if lenient else 20)
        movies = read_movies(files, layout, text_report)
        links = read_links(files, layout, text_report)
        users = read_users(files, layout, text_report)
        if text_report.total and not lenient:
            raise RejectedInput(files.description, text_report)
        with engine.connect() as conn:
            loader.require_migrated(conn)
            known_in_db = np.array(conn.execute(select(Movie.id)).scalars().all(), dtype=np.int64)
        known = np.union1d(known_in_db, np.fromiter(movies, dtype=np.int64, count=len(movies)))
        movie_frame = _movie_frame(movies, links)
        timings["text_files"] = round(time.perf_counter() - clock - timings["checksum"], 3)

        def new_run() -> _RatingsRun:
            return _RatingsRun(files, layout, known, progress, lenient)

        mark = time.perf_counter()
        try:
            with engine.begin() as conn:
                batch_id = conn.execute(
                    IngestBatch.__table__.insert()
                    .values(
                        source=source,
                        dataset=layout.dataset,
                        sha256=sha256,
                        status="loading",
                        lenient=lenient,
                        ratings=0,
                        movies=0,
                        users=0,
                        tags=0,
                        rejected=0,
                        timings={},
                        started_at=started,
                    )
                    .returning(IngestBatch.id)
                ).scalar_one()
                loader.upsert_frame(conn, Movie.__table__, movie_frame, "id")
                loader.upsert(
                    conn,
                    UserProfile.__table__,
                    [
                        dict(zip(("id", "age", "gender", "occupation", "zip_code"), u, strict=True))
                        for u in users
                    ],
                    "id",
                )
                if lenient:
                    loader.insert_rows(
                        conn, IngestReject.__table__, _reject_rows(batch_id, text_report.first)
                    )
                timings["movies"] = round(time.perf_counter() - mark, 3)
                mark = time.perf_counter()
                # Tags before ratings: a rejected tags file fails before the long part.
                tags, tag_rejects = _load_tags(conn, files, layout, known, lenient, batch_id)
                timings["tags"] = round(time.perf_counter() - mark, 3)
                mark = time.perf_counter()
                if lenient:
                    run, rejected = _load_lenient(conn, new_run, batch_id)
                    rejected += text_report.total + tag_rejects
                else:
                    run = new_run()
                    _load_strict(conn, run, files.description)
                    rejected = 0
                timings["ratings"] = round(time.perf_counter() - mark, 3)
                seconds = time.perf_counter() - clock
                timings["total"] = round(seconds, 3)
                counts = {
                    "ratings": run.valid_rows,
                    "movies": len(movies),
                    "users": run.users,
                    "tags": tags,
                    "rejected": rejected,
                }
                conn.execute(
                    update(IngestBatch)
                    .where(IngestBatch.id == batch_id)
                    .values(status="loaded", timings=timings, finished_at=func.now(), **counts)
                )
        except (psycopg2.errors.UniqueViolation, sqlalchemy.exc.IntegrityError) as error:
            if (batch := _existing(engine, sha256)) is not None:  # a concurrent twin won
                return _unchanged(batch, time.perf_counter() - clock)
            raise _explain_duplicates(new_run, files.description, error) from None
    result = IngestResult(
        "loaded",
        batch_id,
        layout.dataset,
        source,
        sha256,
        seconds=round(seconds, 3),
        message=f"loaded {counts['ratings']} ratings of {counts['users']} users on "
        f"{counts['movies']} movies as batch {batch_id}"
        + (f"; {rejected} rows rejected" if rejected else ""),
        timings=timings,
        **counts,
    )
    get_event_bus().publish("ratings.ingested", result.to_dict())
    return result
