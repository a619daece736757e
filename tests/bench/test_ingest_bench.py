"""The ingest benchmark: its data generator (unit) and one small real run (smoke)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import psycopg2
import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # `bench` is a folder of scripts, not an installed package
    sys.path.insert(0, str(ROOT))

from bench.common import libpq_dsn  # noqa: E402
from bench.datagen import (  # noqa: E402
    FIRST_TAG_TIMESTAMP,
    FIRST_TIMESTAMP,
    LAST_TIMESTAMP,
    MIN_USER_RATINGS,
    ML25M_RATINGS,
    ML25M_TAGS,
    Shape,
    _sample_light,
    ensure_dataset,
    format_ratings,
    generate,
)
from bench.ingest import DEFAULT_ADMIN_URL  # noqa: E402

ADMIN_URL = os.environ.get("BENCH_DATABASE_URL", DEFAULT_ADMIN_URL)
JSON_KEYS = {"rows", "ingest_rows_per_s", "copy_rows_per_s", "ratio", "peak_rss_mb"}
FILE_KEYS = {"tags", "links", "ingest_s", "copy_s", "copy_s_ratings", "copy_s_movies",
             "copy_s_tags", "copy_s_links", "ingest_s_tags", "ingest_s_ratings"}


def _postgres_reachable() -> bool:
    from sqlalchemy.engine import make_url

    try:
        psycopg2.connect(libpq_dsn(make_url(ADMIN_URL)), connect_timeout=5).close()
    except psycopg2.OperationalError:
        return False
    return True


@pytest.mark.parametrize("ratings", [20, 5_000, 60_000])
def test_generated_data_is_ml25m_shaped(tmp_path: Path, ratings: int) -> None:
    shape = Shape.scaled(ratings, seed=7)
    dataset = generate(shape, tmp_path / "ds")

    with dataset.ratings_csv.open("rb") as handle:
        assert handle.readline() == b"userId,movieId,rating,timestamp\n"
    frame = pd.read_csv(dataset.ratings_csv)
    assert len(frame) == ratings
    assert not frame.duplicated(["userId", "movieId"]).any()
    halves = frame["rating"].to_numpy() * 2
    assert np.array_equal(halves, np.round(halves))
    assert halves.min() >= 1 and halves.max() <= 10
    per_user = frame.groupby("userId").size()
    assert len(per_user) == shape.users
    assert per_user.min() >= MIN_USER_RATINGS
    assert frame["timestamp"].between(FIRST_TIMESTAMP, LAST_TIMESTAMP).all()
    same_user = frame["userId"].eq(frame["userId"].shift())
    assert (frame["timestamp"].diff()[same_user] > 0).all()  # increasing per user

    assert dataset.movies_csv.read_text().startswith('movieId,title,genres\n')
    first_movie = dataset.movies_csv.read_text().splitlines()[1]
    assert first_movie.split(",")[1].startswith('"Movie ')
    movies = pd.read_csv(dataset.movies_csv)
    assert len(movies) == shape.movies and movies["movieId"].is_unique
    assert set(frame["movieId"]) <= set(movies["movieId"])
    assert movies["title"].str.fullmatch(r"Movie \d+ \(\d{4}\)").all()

    tags = pd.read_csv(dataset.tags_csv, keep_default_na=False)
    assert list(tags.columns) == ["userId", "movieId", "tag", "timestamp"]
    assert len(tags) == shape.tags == round(ML25M_TAGS * ratings / ML25M_RATINGS)
    assert set(tags["movieId"]) <= set(movies["movieId"])
    assert tags["userId"].between(1, shape.users).all()
    assert tags["timestamp"].between(FIRST_TAG_TIMESTAMP, LAST_TIMESTAMP).all()
    assert tags["userId"].is_monotonic_increasing  # sorted by user, as GroupLens ships it
    if len(tags) > 100:  # texts that need CSV quoting survive a CSV reader
        assert tags["tag"].str.contains(",").any() and tags["tag"].str.contains('"').any()
    links = pd.read_csv(dataset.links_csv, dtype=str, keep_default_na=False)
    assert list(links.columns) == ["movieId", "imdbId", "tmdbId"]
    assert links["movieId"].astype(int).tolist() == movies["movieId"].tolist()
    assert links["imdbId"].str.fullmatch(r"\d{7}").all() and links["imdbId"].is_unique
    assert links["tmdbId"].str.fullmatch(r"\d*").all()


def test_generator_is_seeded(tmp_path: Path) -> None:
    first = generate(Shape.scaled(5_000, seed=3), tmp_path / "a")
    again = generate(Shape.scaled(5_000, seed=3), tmp_path / "b")
    other = generate(Shape.scaled(5_000, seed=4), tmp_path / "c")
    assert first.ratings_csv.read_bytes() == again.ratings_csv.read_bytes()
    assert first.movies_csv.read_bytes() == again.movies_csv.read_bytes()
    assert first.tags_csv.read_bytes() == again.tags_csv.read_bytes()
    assert first.links_csv.read_bytes() == again.links_csv.read_bytes()
    assert first.tags_csv.read_bytes() != other.tags_csv.read_bytes()
    assert first.ratings_csv.read_bytes() != other.ratings_csv.read_bytes()


def test_generated_files_are_cached(tmp_path: Path) -> None:
    dataset, reused = ensure_dataset(2_000, seed=1, workdir=tmp_path)
    assert not reused
    again, reused = ensure_dataset(2_000, seed=1, workdir=tmp_path)
    assert reused and again.root == dataset.root
    assert [p.name for p in tmp_path.iterdir()] == [dataset.root.name]  # no partial dirs


def test_light_sampling_never_repeats_a_movie_per_user() -> None:
    # A steep popularity and users taking up to half the catalogue force many redraws.
    weights = (np.arange(1_000) + 1.0) ** -2.0
    cdf = np.cumsum(weights / weights.sum())
    counts = np.array([500, 20, 300, 21, 450])
    items = _sample_light(np.random.default_rng(5), cdf, counts)
    assert len(items) == counts.sum() and items.min() >= 0 and items.max() < 1_000
    for user_items in np.split(items, np.cumsum(counts)[:-1]):
        assert len(np.unique(user_items)) == len(user_items)


def test_format_ratings_matches_plain_formatting() -> None:
    rng = np.random.default_rng(0)
    users = rng.integers(1, 200_000, 500)
    movies = rng.integers(1, 210_000, 500)
    halves = rng.integers(1, 11, 500)
    stamps = rng.integers(FIRST_TIMESTAMP, LAST_TIMESTAMP, 500)
    expected = "".join(f"{u},{m},{h / 2:.1f},{t}\n"
                       for u, m, h, t in zip(users, movies, halves, stamps, strict=True))
    assert format_ratings(users, movies, halves, stamps).decode() == expected


def test_too_few_ratings_are_refused() -> None:
    with pytest.raises(ValueError):
        Shape.scaled(MIN_USER_RATINGS - 1)


@pytest.mark.skipif(not _postgres_reachable(), reason=f"no Postgres at {ADMIN_URL}")
def test_benchmark_smoke_run(tmp_path: Path) -> None:
    completed = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "ingest.py"), "--ratings", "5000",
         "--workdir", str(tmp_path), "--database-url", ADMIN_URL],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    lines = completed.stdout.strip().splitlines()
    assert len(lines) > 1  # human-readable lines come first
    figures = json.loads(lines[-1])
    assert JSON_KEYS | FILE_KEYS <= set(figures)
    assert figures["rows"] == 5000
    assert figures["tags"] == Shape.scaled(5000).tags > 0
    assert figures["links"] == Shape.scaled(5000).movies
    copies = sum(figures[f"copy_s_{name}"] for name in ("ratings", "movies", "tags", "links"))
    assert copies <= figures["copy_s"]
    # The seconds are printed to the millisecond: at this size that rounding alone moves
    # the quotient by up to 0.5 ms over copy_s.
    assert figures["ratio"] == pytest.approx(figures["ingest_s"] / figures["copy_s"],
                                             rel=0.01 + 0.0005 / figures["copy_s"])
    assert figures["ratio"] > 0
    assert figures["peak_rss_mb"] > 0
    assert figures["ingest_rows_per_s"] > 0 and figures["copy_rows_per_s"] > 0
