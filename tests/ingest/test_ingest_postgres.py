"""Ingest into the real Postgres: every layout, idempotency, and each kind of bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import text

from services.ingest.errors import IngestError
from services.ingest.ingest import ingest_source
from shared.db.session import engine_for
from tests.conftest import FIXTURES
from tests.ingest.helpers import copy_dataset, db_state, zip_dataset


@pytest.fixture
def pg(pg_url: str, use_settings) -> str:  # type: ignore[no-untyped-def]
    use_settings(DATABASE_URL=pg_url)
    return pg_url


def rows(url: str, sql: str) -> list[tuple]:
    with engine_for(url).connect() as conn:
        return [tuple(r) for r in conn.execute(text(sql))]


def test_ml100k_exact_counts_latin1_titles_and_genres(pg: str, ml100k: Path) -> None:
    result = ingest_source(str(ml100k))
    assert (result.ratings, result.users, result.movies, result.rejected) == (100_000, 943, 1682, 0)
    assert rows(
        pg, "SELECT count(*), count(DISTINCT user_id), count(DISTINCT movie_id) FROM rating"
    ) == [(100_000, 943, 1682)]
    # u.item is Latin-1: accented titles must arrive intact.
    assert rows(pg, "SELECT title, year, genres FROM movie WHERE id = 1") == [
        ("Toy Story (1995)", 1995, "Animation|Children's|Comedy")
    ]
    assert rows(pg, "SELECT count(*) FROM movie WHERE title LIKE '%é%'")[0][0] > 0
    assert rows(pg, "SELECT age, gender, occupation FROM user_profile WHERE id = 1") == [
        (24, "M", "technician")
    ]
    batch = rows(pg, "SELECT dataset, status, ratings, users, movies, sha256 FROM ingest_batch")
    assert batch == [("ml-100k", "loaded", 100_000, 943, 1682, result.sha256)]


def test_ml1m_layout(pg: str) -> None:
    result = ingest_source(str(FIXTURES / "ml-1m"))
    assert (result.dataset, result.ratings, result.users, result.movies) == ("ml-1m", 8, 3, 4)
    assert rows(pg, "SELECT title FROM movie WHERE id = 3") == [("Misérables, Les (1995)",)]
    assert rows(pg, "SELECT gender, age FROM user_profile WHERE id = 2") == [("M", 56)]


def test_ml10m_layout_half_stars_and_tags(pg: str) -> None:
    result = ingest_source(str(FIXTURES / "ml-10m"))
    assert (result.dataset, result.ratings, result.tags) == ("ml-10m", 5, 2)
    assert rows(pg, "SELECT rating FROM rating WHERE user_id = 2 ORDER BY rating") == [
        (0.5,),
        (4.5,),
    ]
    assert rows(pg, "SELECT title, year FROM movie WHERE id = 5")[0][1] == 2001
    assert "Amélie" in rows(pg, "SELECT title FROM movie WHERE id = 5")[0][0]


def test_csv_layout_links_tags_and_no_genres(pg: str) -> None:
    result = ingest_source(str(FIXTURES / "ml-latest-small"))
    assert (result.dataset, result.ratings, result.movies, result.tags) == (
        "ml-latest-small",
        6,
        4,
        2,
    )
    assert rows(
        pg, "SELECT title, genres, imdb_id, tmdb_id FROM movie WHERE id IN (2, 4) ORDER BY id"
    ) == [
        ("American President, The (1995)", "Comedy|Drama|Romance", 112346, 9087),
        ("Some Film Without Genres (2018)", "", 4, None),
    ]
    assert rows(pg, "SELECT tag FROM tag WHERE movie_id = 3") == [("dark, weird",)]


def test_zip_of_csv_layout_and_dataset_override(pg: str, tmp_path: Path) -> None:
    archive = zip_dataset(FIXTURES / "ml-latest-small", tmp_path / "ml-25m.zip", "ml-25m")
    result = ingest_source(str(archive))
    assert (result.dataset, result.ratings) == ("ml-25m", 6)


def test_reingest_changes_nothing_whatever_the_container(pg: str, tmp_path: Path) -> None:
    first = ingest_source(str(FIXTURES / "ml-1m"))
    before = db_state(pg)
    again = ingest_source(str(FIXTURES / "ml-1m"))
    zipped = ingest_source(str(zip_dataset(FIXTURES / "ml-1m", tmp_path / "ml-1m.zip")))
    assert first.status == "loaded"
    assert again.status == zipped.status == "unchanged"
    assert again.batch_id == zipped.batch_id == first.batch_id
    assert "nothing changed" in again.message
    assert db_state(pg) == before


def damaged(tmp_path: Path, name: str, content: bytes, base: Path = FIXTURES / "ml-1m") -> Path:
    target = copy_dataset(base, tmp_path / base.name)
    (target / name).write_bytes(content)
    return target


BAD_RATINGS = [
    (b"1::1::5::978300760\n1::3::3\n", "ratings.dat:2: expected 4 columns"),
    (b"1::1::5::978300760\n1::3::3::978302109::9\n", "ratings.dat:2: expected 4 columns"),
    (b"1::1::5::978300760\n1::3::three::978302109\n", "ratings.dat:2: rating 'three' is not a"),
    (b"x::1::5::978300760\n", "ratings.dat:1: user id 'x' is not an integer"),
    (b"1::1::5::978300760\n1::3::6::978302109\n", "ratings.dat:2: rating 6 is not a whole"),
    (b"1::1::4.5::978300760\n", "ratings.dat:1: rating 4.5 is not a whole number"),
    (b"1::1::5::978300760\n1::99::3::978302109\n", "ratings.dat:2: movie 99 is not in the"),
    (b"1::1::5::-5\n", "ratings.dat:1: timestamp -5 is not a unix time"),
    (b"1::1::5::99999999999\n", "ratings.dat:1: timestamp 99999999999 is not a unix time"),
    (b"1::1::5::978300760\n\n2::1::4::978300275\n", "ratings.dat:2: empty line"),
    (
        b"1::1::5::978300760\n2::1::4::978300275\n1::1::5::978300760\n",
        "ratings.dat:3: duplicate (user, movie, timestamp) of line 1",
    ),
]


@pytest.mark.parametrize(
    ("content", "message"), BAD_RATINGS, ids=[m.split(": ", 1)[1][:30] for _, m in BAD_RATINGS]
)
def test_bad_ratings_are_rejected_and_nothing_changes(
    pg: str, tmp_path: Path, content: bytes, message: str
) -> None:
    ingest_source(str(FIXTURES / "ml-10m"))  # something already there must stay as it was
    before = db_state(pg)
    with pytest.raises(IngestError) as caught:
        ingest_source(str(damaged(tmp_path, "ratings.dat", content)))
    assert message in str(caught.value)
    assert "database is unchanged" in str(caught.value)
    assert db_state(pg) == before


def test_report_lists_first_errors_then_counts(pg: str, tmp_path: Path) -> None:
    lines = [f"1::1::{9 if i % 2 else 5}::{978300000 + i}" for i in range(60)]
    lines += ["1::77::3::978400000"] * 3
    with pytest.raises(IngestError) as caught:
        ingest_source(str(damaged(tmp_path, "ratings.dat", "\n".join(lines).encode() + b"\n")))
    message = str(caught.value)
    assert "rejected, 33 invalid row(s)" in message
    assert "... and 13 more" in message
    assert "counts: rating out of range: 30, unknown movie: 3" in message


def test_bad_encoding_is_named(pg: str, tmp_path: Path) -> None:
    ingest_source(str(FIXTURES / "ml-1m"))
    before = db_state(pg)
    movies = (FIXTURES / "ml-latest-small" / "movies.csv").read_bytes()
    broken = movies.replace("Cité".encode(), b"Cit\xe9")  # Latin-1 byte in a UTF-8 file
    source = damaged(tmp_path, "movies.csv", broken, base=FIXTURES / "ml-latest-small")
    with pytest.raises(IngestError, match=r"movies.csv:4: not valid utf-8 text: byte 0xe9"):
        ingest_source(str(source))
    assert db_state(pg) == before


def test_wrong_csv_header(pg: str, tmp_path: Path) -> None:
    source = damaged(
        tmp_path, "ratings.csv", b"user,item,rating\n1,1,4.0\n", base=FIXTURES / "ml-latest-small"
    )
    with pytest.raises(IngestError, match=r"ratings.csv:1: expected header userId,movieId"):
        ingest_source(str(source))
    assert db_state(pg)["rating"] == 0


def test_truncated_zip(pg: str, tmp_path: Path) -> None:
    archive = zip_dataset(FIXTURES / "ml-1m", tmp_path / "ml-1m.zip")
    data = archive.read_bytes()
    archive.write_bytes(data[: len(data) // 2])
    with pytest.raises(IngestError, match=r"ml-1m.zip: not a readable zip archive.*truncated"):
        ingest_source(str(archive))
    assert db_state(pg)["ingest_batch"] == 0


def test_missing_source_and_missing_file(pg: str, tmp_path: Path) -> None:
    with pytest.raises(IngestError, match=r"nowhere: no such file or directory"):
        ingest_source(str(tmp_path / "nowhere"))
    partial = copy_dataset(FIXTURES / "ml-1m", tmp_path / "partial")
    (partial / "movies.dat").unlink()
    with pytest.raises(IngestError, match="no MovieLens layout found"):
        ingest_source(str(partial))
    with pytest.raises(IngestError, match="missing file movies.dat for ml-1m"):
        ingest_source(str(partial), dataset="ml-1m")
    assert db_state(pg)["ingest_batch"] == 0


def test_ratings_clashing_with_an_earlier_batch(pg: str, tmp_path: Path) -> None:
    ingest_source(str(FIXTURES / "ml-1m"))
    before = db_state(pg)
    extra = (FIXTURES / "ml-1m" / "ratings.dat").read_bytes() + b"3::2::4::978300999\n"
    with pytest.raises(IngestError, match="already in the database from an earlier batch"):
        ingest_source(str(damaged(tmp_path, "ratings.dat", extra)))
    assert db_state(pg) == before


def test_lenient_loads_good_rows_and_stores_rejects(pg: str, tmp_path: Path) -> None:
    ingest_source(str(FIXTURES / "ml-1m"))
    content = (
        b"1::1::5::978300760\n"  # already loaded by the first batch
        b"1::2::4::978300761\n"  # new, good
        b"1::2::4::978300761\n"  # repeat of line 2
        b"1::3::9::978300762\n"  # out of range
        b"2::77::3::978300763\n"  # unknown movie
        b"2::3::x::978300764\n"
    )  # non-numeric
    result = ingest_source(str(damaged(tmp_path, "ratings.dat", content)), lenient=True)
    assert (result.ratings, result.rejected) == (1, 5)
    assert rows(pg, "SELECT count(*) FROM rating WHERE movie_id = 2 AND user_id = 1") == [(1,)]
    reasons = sorted(
        r[0].split(" ")[0]
        for r in rows(pg, f"SELECT reason FROM ingest_reject WHERE batch_id = {result.batch_id}")
    )
    assert reasons == ["already", "duplicate", "movie", "rating", "rating"]
    assert rows(
        pg,
        f"SELECT line FROM ingest_reject WHERE batch_id = {result.batch_id} AND "
        "reason LIKE 'duplicate%'",
    ) == [(3,)]
