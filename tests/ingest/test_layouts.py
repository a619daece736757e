"""Layout detection for every GroupLens release family."""

from __future__ import annotations

import pytest

from services.ingest.errors import IngestError
from services.ingest.layouts import detect_layout, year_from_title


@pytest.mark.parametrize(
    ("names", "dataset", "family", "half_stars"),
    [
        (
            ["ml-100k/u.data", "ml-100k/u.item", "ml-100k/u.user", "ml-100k/u.genre"],
            "ml-100k",
            "100k",
            False,
        ),
        (["ml-1m/ratings.dat", "ml-1m/movies.dat", "ml-1m/users.dat"], "ml-1m", "dat", False),
        (
            ["ml-10M100K/ratings.dat", "ml-10M100K/movies.dat", "ml-10M100K/tags.dat"],
            "ml-10m",
            "dat",
            True,
        ),
        (["ml-25m/ratings.csv", "ml-25m/movies.csv", "ml-25m/links.csv"], "ml-25m", "csv", True),
        (["ml-20m/ratings.csv", "ml-20m/movies.csv"], "ml-20m", "csv", True),
        (["ml-32m/ratings.csv", "ml-32m/movies.csv"], "ml-32m", "csv", True),
        (
            ["ml-latest-small/ratings.csv", "ml-latest-small/movies.csv"],
            "ml-latest-small",
            "csv",
            True,
        ),
        (["ratings.csv", "movies.csv"], "ml-latest", "csv", True),
    ],
)
def test_detects_each_layout(names: list[str], dataset: str, family: str, half_stars: bool) -> None:
    layout = detect_layout(names, "source")
    assert (layout.dataset, layout.format.family, layout.format.half_stars) == (
        dataset,
        family,
        half_stars,
    )
    assert layout.ratings in names and layout.movies in names


def test_override_and_unknown_dataset() -> None:
    layout = detect_layout(["ratings.csv", "movies.csv"], "x", dataset="ml-25m")
    assert layout.dataset == "ml-25m"
    with pytest.raises(IngestError, match="--dataset 'ml-5m' is not a MovieLens data set"):
        detect_layout(["ratings.csv", "movies.csv"], "x", dataset="ml-5m")


def test_missing_files_are_named() -> None:
    with pytest.raises(IngestError, match="no MovieLens layout found.*found u.data"):
        detect_layout(["u.data"], "here")
    with pytest.raises(IngestError, match="missing file u.item for ml-100k"):
        detect_layout(["u.data"], "here", dataset="ml-100k")


def test_year_from_title() -> None:
    assert year_from_title("Toy Story (1995)") == 1995
    assert year_from_title("Babylon 5 (1994-1998)") == 1994
    assert year_from_title("unknown") is None


def test_blocks_cut_at_line_ends_and_number_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    from services.ingest import ratings
    from services.ingest.layouts import ML_1M, ML_CSV

    monkeypatch.setattr(ratings, "BLOCK_BYTES", 7)
    data = b"1::2::3::4\n5::6::7::8\n9::1::2::3"  # no newline at the end
    blocks = list(ratings.raw_blocks(io.BytesIO(data), ML_1M, "ratings.dat"))
    assert [first for first, _ in blocks] == [1, 2, 3]
    assert b"".join(raw for _, raw in blocks) == data.replace(b"::", b"\t")
    csv = b"userId,movieId,rating,timestamp\n1,2,3.5,4\n5,6,7,8\n"
    firsts = [first for first, _ in ratings.raw_blocks(io.BytesIO(csv), ML_CSV, "ratings.csv")]
    assert firsts == [2, 3]
