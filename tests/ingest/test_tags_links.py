"""Tags and links into the real Postgres: streamed blocks, exact text, each kind of bad line."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import text

from services.ingest import ratings as ratings_module
from services.ingest.errors import IngestError
from services.ingest.ingest import ingest_source
from shared.db.session import engine_for
from tests.conftest import FIXTURES
from tests.ingest.helpers import copy_dataset, db_state

CSV = FIXTURES / "ml-latest-small"
TAGS_HEADER = "userId,movieId,tag,timestamp\n"


@pytest.fixture
def pg(pg_url: str, use_settings) -> str:  # type: ignore[no-untyped-def]
    use_settings(DATABASE_URL=pg_url)
    return pg_url


def rows(url: str, sql: str) -> list[tuple]:
    with engine_for(url).connect() as conn:
        return [tuple(r) for r in conn.execute(text(sql))]


def with_file(tmp_path: Path, name: str, content: str | bytes, base: Path = CSV) -> Path:
    target = copy_dataset(base, tmp_path / base.name)
    data = content.encode("utf-8") if isinstance(content, str) else content
    (target / name).write_bytes(data)
    return target


def many_tags(count: int) -> list[str]:
    """Valid tag lines over the fixture's movies 1-4, with texts that need CSV quoting."""
    texts = ["plain", '"dark, weird"', "NA", '""', '"she said ""no"""', "null", "Amélie"]
    return [f"{i % 3 + 1},{i % 4 + 1},{texts[i % len(texts)]},{1_300_000_000 + i}\n"
            for i in range(count)]


def test_tags_keep_their_text_exactly_across_many_blocks(
    pg: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ratings_module, "BLOCK_BYTES", 256)  # dozens of blocks
    source = with_file(tmp_path, "tags.csv", TAGS_HEADER + "".join(many_tags(500)))
    result = ingest_source(str(source))
    assert result.tags == 500
    counted = dict(rows(pg, "SELECT tag, count(*) FROM tag GROUP BY tag"))
    assert counted == {
        "plain": 72, "dark, weird": 72, "NA": 72, "": 71, 'she said "no"': 71, "null": 71,
        "Amélie": 71,
    }
    assert rows(pg, "SELECT user_id, movie_id, tagged_at FROM tag ORDER BY tagged_at LIMIT 2") == [
        (1, 1, 1_300_000_000),
        (2, 2, 1_300_000_001),
    ]
    assert rows(pg, "SELECT tags FROM ingest_batch") == [(500,)]


BAD_TAGS = [
    ("3,99,pixar,1306463600\n", "tags.csv:{line}: tag of unknown movie 99", "unknown movie"),
    ("3,1,pixar\n", "tags.csv:{line}: expected userId, movieId, tag, timestamp", "bad tag"),
    ("3,1,pixar,1306463600,extra\n", "tags.csv:{line}: expected userId, movieId", "bad tag"),
    ("x,1,pixar,1306463600\n", "tags.csv:{line}: expected userId, movieId", "bad tag"),
    ("-3,1,pixar,1306463600\n", "tags.csv:{line}: expected userId, movieId", "bad tag"),
    ("3,1,pixar,soon\n", "tags.csv:{line}: expected userId, movieId", "bad tag"),
    ("3,1,pix\x00ar,1306463600\n", "tags.csv:{line}: tag holds a NUL byte", "bad tag"),
    ("3,1,99999999999,1306463600\n".replace("3,1", "3,99999999999"), "is out of range",
     "bad tag"),
]


@pytest.mark.parametrize(("bad", "message", "kind"), BAD_TAGS,
                         ids=[kind + ":" + bad[:14] for bad, _, kind in BAD_TAGS])
def test_a_bad_tag_deep_in_the_file_is_named_and_nothing_changes(
    pg: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bad: str, message: str,
    kind: str,
) -> None:
    monkeypatch.setattr(ratings_module, "BLOCK_BYTES", 512)
    ingest_source(str(FIXTURES / "ml-10m"))  # something already there must stay as it was
    before = db_state(pg)
    lines = many_tags(300)
    lines[250] = bad  # line 252 of the file, counting the header
    with pytest.raises(IngestError) as caught:
        ingest_source(str(with_file(tmp_path, "tags.csv", TAGS_HEADER + "".join(lines))))
    assert message.format(line=252) in str(caught.value)
    assert f"counts: {kind}: 1" in str(caught.value)
    assert "database is unchanged" in str(caught.value)
    assert db_state(pg) == before


def test_bad_encoding_in_tags_is_named(pg: str, tmp_path: Path) -> None:
    content = TAGS_HEADER.encode() + b"2,3,good,1445714994\n3,1,Cit\xe9,1306463600\n"
    with pytest.raises(IngestError, match=r"tags.csv:3: not valid utf-8 text: byte 0xe9"):
        ingest_source(str(with_file(tmp_path, "tags.csv", content)))
    assert db_state(pg)["tag"] == 0


def test_many_bad_tags_report_the_first_then_counts(pg: str, tmp_path: Path) -> None:
    lines = many_tags(100)
    for index in range(0, 100, 2):
        lines[index] = f"1,{500 + index},orphan,1300000000\n"
    lines[1] = "1,1\n"
    with pytest.raises(IngestError) as caught:
        ingest_source(str(with_file(tmp_path, "tags.csv", TAGS_HEADER + "".join(lines))))
    message = str(caught.value)
    assert "rejected, 51 invalid row(s)" in message
    assert "tags.csv:2: tag of unknown movie 500" in message
    assert "tags.csv:3: expected userId, movieId, tag, timestamp" in message
    assert "... and 31 more" in message
    assert "counts: unknown movie: 50, bad tag: 1" in message


def test_lenient_loads_good_tags_and_stores_each_bad_one(pg: str, tmp_path: Path) -> None:
    content = TAGS_HEADER + (
        "2,3,good,1445714994\n"
        "3,77,orphan,1306463600\n"  # unknown movie
        "3,1,no timestamp\n"
        "\n"  # blank lines are skipped, as GroupLens files may end with one
        "1,2,\"fine, too\",1306463601\n"
    )
    result = ingest_source(str(with_file(tmp_path, "tags.csv", content)), lenient=True)
    assert (result.tags, result.rejected) == (2, 2)
    assert sorted(rows(pg, "SELECT tag FROM tag")) == [("fine, too",), ("good",)]
    assert rows(pg, "SELECT file, line, reason, raw FROM ingest_reject ORDER BY line") == [
        ("tags.csv", 3, "tag of unknown movie 77", "3,77,orphan,1306463600"),
        ("tags.csv", 4, "expected userId, movieId, tag, timestamp", "3|1|no timestamp"),
    ]


def test_tags_of_movies_already_in_the_database_are_accepted(pg: str, tmp_path: Path) -> None:
    ingest_source(str(CSV))
    movies = "movieId,title,genres\n10,Another (2001),Drama\n"
    ratings = "userId,movieId,rating,timestamp\n9,10,4.0,1306463000\n"
    source = with_file(tmp_path, "movies.csv", movies)
    (source / "ratings.csv").write_text(ratings)
    (source / "links.csv").write_text("movieId,imdbId,tmdbId\n10,0000010,10\n")
    (source / "tags.csv").write_text(TAGS_HEADER + "9,1,old movie,1306463001\n"
                                     "9,10,new movie,1306463002\n")
    result = ingest_source(str(source))
    assert result.tags == 2
    assert rows(pg, "SELECT movie_id, tag FROM tag WHERE user_id = 9 ORDER BY movie_id") == [
        (1, "old movie"),
        (10, "new movie"),
    ]


def test_ml10m_tags_dat_with_a_colon_in_a_tag(pg: str, tmp_path: Path) -> None:
    content = "15::5::excellent!::1215184630\n20::1::sci-fi: classic::1188263880\n"
    result = ingest_source(str(with_file(tmp_path, "tags.dat", content, FIXTURES / "ml-10m")))
    assert result.tags == 2
    assert rows(pg, "SELECT tag FROM tag ORDER BY user_id") == [("excellent!",),
                                                                ("sci-fi: classic",)]


def test_links_fill_the_movies_and_a_bad_link_is_named(pg: str, tmp_path: Path) -> None:
    links = ("movieId,imdbId,tmdbId\n1,0114709,862\n2,0112346,\n3,0112682,902\n"
             "77,0000077,77\n"  # a movie not in the files: ignored
             "3,0000003,3\n")  # listed twice: the last line wins
    result = ingest_source(str(with_file(tmp_path, "links.csv", links)))
    assert result.movies == 4
    assert rows(pg, "SELECT id, imdb_id, tmdb_id FROM movie ORDER BY id") == [
        (1, 114709, 862), (2, 112346, None), (3, 3, 3), (4, None, None),
    ]
    before = db_state(pg)
    for number, (bad, message) in enumerate([
        ("2,0112346\n", "links.csv:3: expected movieId,imdbId,tmdbId"),
        ("two,0112346,9087\n", "links.csv:3: expected movieId,imdbId,tmdbId"),
        ("2,01123460000000000000,9087\n", "links.csv:3: imdbId '01123460000000000000' or"),
    ]):
        broken = f"movieId,imdbId,tmdbId\n1,0114709,862\n{bad}"
        with pytest.raises(IngestError) as caught:
            ingest_source(str(with_file(tmp_path / str(number), "links.csv", broken)))
        assert message in str(caught.value)
        assert "counts: bad link: 1" in str(caught.value)
    assert db_state(pg) == before


def test_links_and_tags_on_the_embedded_database(tmp_path: Path, use_settings) -> None:  # type: ignore[no-untyped-def]
    url = f"sqlite:///{tmp_path / 'recsys.db'}"
    use_settings(DATABASE_URL=url)
    from shared.db import migrate

    migrate(url)
    result = ingest_source(str(CSV))
    assert (result.tags, result.movies) == (2, 4)
    assert rows(url, "SELECT id, imdb_id, tmdb_id FROM movie WHERE id IN (2, 4) ORDER BY id") == [
        (2, 112346, 9087), (4, 4, None),
    ]
    assert rows(url, "SELECT tag FROM tag WHERE movie_id = 3") == [("dark, weird",)]
