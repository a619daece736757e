"""Benchmark `recsys ingest` against bare Postgres COPYs of the same files.

In one run, against one Postgres server: generate (or reuse) a MovieLens-25M-shaped
data set (ratings.csv, movies.csv, tags.csv, links.csv), create a scratch database,
migrate it with `recsys db upgrade`, then time (a) `recsys ingest --source DIR --json`
as a subprocess (wall clock, and its peak RSS from wait4) and (b) in one transaction
through psycopg2, `COPY ... FROM STDIN WITH (FORMAT csv, HEADER true)` of every file:
ratings into `rating`, movies into `movie`, tags into `tag` (the same, emptied tables)
and links into `link_copy`, a table of their three BIGINT columns (ingest stores them
on `movie`). The files are read once first so both start from a warm page cache; with
--repeat > 1 the order alternates and the best time of each counts. Human-readable
lines first; the last stdout line is one JSON object: rows (ratings),
ingest_rows_per_s, copy_rows_per_s (ratings over the whole time of each), ratio
(ingest time / the COPYs' time) and peak_rss_mb, then tags, links, ingest_s, copy_s,
copy_s_<file> per file and ingest_s_<stage> (ingest's own timings of movies, tags,
ratings).

    python bench/ingest.py --ratings 2000000
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psycopg2
from sqlalchemy.engine import URL

from bench.common import libpq_dsn, scratch_database, verdict
from bench.datagen import DEFAULT_WORKDIR, ML25M_RATINGS, Dataset, ensure_dataset

DEFAULT_ADMIN_URL = "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"
COPY_SQL = ("COPY rating (user_id, movie_id, rating, rated_at) FROM STDIN "
            "WITH (FORMAT csv, HEADER true)")
COPY_FILES = {  # file -> the bare COPY of it
    "ratings": COPY_SQL,
    "movies": "COPY movie (id, title, genres) FROM STDIN WITH (FORMAT csv, HEADER true)",
    "tags": ("COPY tag (user_id, movie_id, tag, tagged_at) FROM STDIN "
             "WITH (FORMAT csv, HEADER true)"),
    "links": ("COPY link_copy (movie_id, imdb_id, tmdb_id) FROM STDIN "
              "WITH (FORMAT csv, HEADER true)"),
}
LINK_TABLE = "CREATE TABLE link_copy (movie_id INTEGER, imdb_id BIGINT, tmdb_id BIGINT)"
DATA_TABLES = "rating, tag, ingest_reject, ingest_batch, movie, user_profile, link_copy"
TARGET_RATIO = 1.5
TARGET_RSS_MB = 1500.0
READ_BYTES = 8 << 20


@dataclass
class IngestRun:
    """One timed `recsys ingest` subprocess."""

    seconds: float  # wall clock of the subprocess, start-up included
    peak_rss_mb: float
    result: dict[str, Any]  # its --json output


@dataclass
class CopyRun:
    """One timed set of bare COPYs, one per file, committed together."""

    seconds: float
    rows: int  # ratings
    by_file: dict[str, float]  # seconds of each file's COPY


def recsys_command() -> list[str]:
    """The `recsys` console script of this interpreter's environment."""
    script = Path(sys.executable).with_name("recsys")
    return [str(script)] if script.exists() else [sys.executable, "-m", "recsys.cli"]


def child_env(database: URL, workdir: Path) -> dict[str, str]:
    """Environment of the `recsys` subprocesses: the scratch db, embedded everything else."""
    env = dict(os.environ)
    env.update(DATABASE_URL=database.render_as_string(hide_password=False),
               DATA_PATH=str(workdir),
               # No broker: ingest must run in the measured process, not on a worker.
               BROKER_URL="", REDIS_URL="")
    return env


def run_child(args: list[str], env: dict[str, str]
              ) -> tuple[int, str, str, float, resource.struct_rusage]:
    """Run a command; (exit code, stdout, stderr, wall seconds, its own rusage)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        clock = time.perf_counter()
        process = subprocess.Popen(args, stdout=out, stderr=err, env=env)
        # wait4 gives this child's own peak RSS (RUSAGE_CHILDREN would be the max of all).
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - clock
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return (process.returncode, out.read().decode("utf-8", "replace"),
                err.read().decode("utf-8", "replace"), seconds, usage)


def migrate(database: URL, workdir: Path) -> None:
    """`recsys db upgrade` on the scratch database, as an operator would."""
    code, out, err, _, _ = run_child([*recsys_command(), "db", "upgrade"],
                                     child_env(database, workdir))
    if code:
        raise SystemExit(f"recsys db upgrade failed ({code}):\n{out}{err}")
    conn = psycopg2.connect(libpq_dsn(database))
    try:
        with conn.cursor() as cursor:
            cursor.execute(LINK_TABLE)
        conn.commit()
    finally:
        conn.close()


def reset(database: URL) -> None:
    """Empty every table ingest writes, then checkpoint, so each run starts alike."""
    conn = psycopg2.connect(libpq_dsn(database))
    conn.autocommit = True
    try:
        with conn.cursor() as cursor:
            cursor.execute(f"TRUNCATE {DATA_TABLES} RESTART IDENTITY")
            try:  # flush the previous run's dirty pages outside the timed window
                cursor.execute("CHECKPOINT")
            except psycopg2.Error:
                pass  # not superuser: runs are still comparable, just noisier
    finally:
        conn.close()


def warm(dataset: Dataset) -> float:
    """Flush and read the data files once, so both contenders find them in the page cache.

    The fsync matters right after generation: otherwise the first timed run competes
    with the kernel writing the fresh file back to disk (seen: ingest 77 s against 55 s).
    """
    clock = time.perf_counter()
    for path in dataset.files:
        with path.open("rb") as handle:
            os.fsync(handle.fileno())
            while handle.read(READ_BYTES):
                pass
    return time.perf_counter() - clock


def time_ingest(dataset: Dataset, database: URL, workdir: Path) -> IngestRun:
    """`recsys ingest --source DIR --json` as a subprocess: wall time and peak RSS."""
    args = [*recsys_command(), "ingest", "--source", str(dataset.root), "--dataset", "ml-25m",
            "--json"]
    code, out, err, seconds, usage = run_child(args, child_env(database, workdir))
    if code:
        raise SystemExit(f"recsys ingest failed ({code}):\n{out}{err}")
    lines = out.strip().splitlines()
    result = json.loads(lines[-1])
    shape = dataset.shape
    if (result.get("status") != "loaded" or result.get("ratings") != shape.ratings
            or result.get("tags") != shape.tags or result.get("movies") != shape.movies):
        raise SystemExit(f"recsys ingest loaded {result.get('ratings')} of {shape.ratings} "
                         f"ratings, {result.get('tags')} of {shape.tags} tags, "
                         f"{result.get('movies')} of {shape.movies} movies: "
                         f"{result.get('message')}")
    return IngestRun(seconds, usage.ru_maxrss / 1024, result)  # Linux: ru_maxrss in KiB


def time_copy(dataset: Dataset, database: URL) -> CopyRun:
    """The floor: psycopg2 copy_expert of every file into its table, committed."""
    paths = {"ratings": dataset.ratings_csv, "movies": dataset.movies_csv,
             "tags": dataset.tags_csv, "links": dataset.links_csv}
    expected = {"ratings": dataset.shape.ratings, "movies": dataset.shape.movies,
                "tags": dataset.shape.tags, "links": dataset.shape.movies}
    by_file: dict[str, float] = {}
    rows: dict[str, int] = {}
    conn = psycopg2.connect(libpq_dsn(database))
    try:
        with conn.cursor() as cursor:
            clock = time.perf_counter()
            for name, sql in COPY_FILES.items():
                start = time.perf_counter()
                with paths[name].open("rb") as handle:
                    cursor.copy_expert(sql, handle, size=1 << 20)
                rows[name] = cursor.rowcount
                by_file[name] = time.perf_counter() - start
            start = time.perf_counter()
            conn.commit()
            by_file["commit"] = time.perf_counter() - start
            seconds = time.perf_counter() - clock
    finally:
        conn.close()
    if rows != expected:
        raise SystemExit(f"COPY loaded {rows} rows, expected {expected}")
    return CopyRun(seconds, rows["ratings"], by_file)



def summarise(dataset: Dataset, ingests: list[IngestRun], copies: list[CopyRun]
              ) -> dict[str, Any]:
    """Print the human-readable summary; return the JSON figures (best time of each)."""
    rows = dataset.shape.ratings
    best = min(ingests, key=lambda run: run.seconds)
    fastest = min(copies, key=lambda run: run.seconds)
    ingest_s, copy_s = best.seconds, fastest.seconds
    ratio = ingest_s / copy_s
    rss = max(run.peak_rss_mb for run in ingests)
    in_process = float(best.result.get("seconds") or 0.0)
    print(f"recsys ingest: {rows / ingest_s:,.0f} ratings/s ({ingest_s:.2f} s wall, best of "
          f"{len(ingests)}; {in_process:.2f} s inside ingest_source)")
    files = ", ".join(f"{name} {seconds:.2f} s" for name, seconds in fastest.by_file.items())
    print(f"bare COPYs:    {rows / copy_s:,.0f} ratings/s ({copy_s:.2f} s, best of "
          f"{len(copies)}: {files})")
    print(f"ratio ingest/COPY: {ratio:.3f} (target <= {TARGET_RATIO}: "
          f"{verdict(ratio <= TARGET_RATIO)}; in-process only: {in_process / copy_s:.3f})")
    scope = "" if rows >= ML25M_RATINGS else f"; the target is for {ML25M_RATINGS:,} rows"
    print(f"ingest peak RSS: {rss:.1f} MB (target < {TARGET_RSS_MB:.0f} MB: "
          f"{verdict(rss < TARGET_RSS_MB)}{scope})")
    figures: dict[str, Any] = {
        "rows": rows, "ingest_rows_per_s": round(rows / ingest_s, 1),
        "copy_rows_per_s": round(rows / copy_s, 1), "ratio": round(ratio, 4),
        "peak_rss_mb": round(rss, 1), "tags": dataset.shape.tags,
        "links": dataset.shape.movies, "ingest_s": round(ingest_s, 3),
        "copy_s": round(copy_s, 3)}
    figures.update({f"copy_s_{name}": round(seconds, 3)
                    for name, seconds in fastest.by_file.items()})
    timings = best.result.get("timings", {})
    figures.update({f"ingest_s_{stage}": timings[stage]
                    for stage in ("checksum", "text_files", "movies", "tags", "ratings")
                    if stage in timings})
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratings", type=int, default=ML25M_RATINGS,
                        help="ratings to generate (users and movies scale with it)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR,
                        help="cache of generated data sets; DATA_PATH of the ingest")
    parser.add_argument("--database-url", default=DEFAULT_ADMIN_URL,
                        help="admin URL; a scratch database is created beside it")
    parser.add_argument("--repeat", type=int, default=1,
                        help="timed runs of each contender, alternating which goes first")
    args = parser.parse_args(argv)
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)

    clock = time.perf_counter()
    dataset, reused = ensure_dataset(args.ratings, args.seed, workdir)
    shape = dataset.shape
    size_mb = dataset.ratings_csv.stat().st_size / 1e6
    tags_mb = dataset.tags_csv.stat().st_size / 1e6
    print(f"data set {dataset.root}: {shape.ratings:,} ratings, {shape.users:,} users, "
          f"{shape.movies:,} movies, {shape.tags:,} tags, ratings.csv {size_mb:,.1f} MB, "
          f"tags.csv {tags_mb:,.1f} MB "
          f"({'reused' if reused else 'generated'} in {time.perf_counter() - clock:.1f} s)")
    print(f"fsync + warm read of the data files: {warm(dataset):.2f} s")

    ingests: list[IngestRun] = []
    copies: list[CopyRun] = []
    with scratch_database(args.database_url) as database:
        print(f"scratch database {database.database} on {database.host}:{database.port}")
        migrate(database, workdir)
        for run in range(1, max(1, args.repeat) + 1):
            ingest_first = run % 2 == 1  # alternate, so neither always inherits the other's WAL
            for contender in ("ingest", "copy") if ingest_first else ("copy", "ingest"):
                reset(database)
                if contender == "ingest":
                    ingests.append(time_ingest(dataset, database, workdir))
                    last = ingests[-1]
                    timings = ", ".join(f"{k} {v}" for k, v in last.result["timings"].items())
                    print(f"run {run}: recsys ingest {last.seconds:.2f} s wall, peak RSS "
                          f"{last.peak_rss_mb:.1f} MB (ingest timings s: {timings})")
                else:
                    copies.append(time_copy(dataset, database))
                    print(f"run {run}: bare COPYs {copies[-1].seconds:.2f} s")
    figures = summarise(dataset, ingests, copies)
    sys.stdout.write(json.dumps(figures) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
