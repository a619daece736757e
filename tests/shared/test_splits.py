"""Split policies: seeding, stratification, Recommenders parity, temporal errors, validation."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pandas as pd
import pytest

from shared.splits import (
    Split,
    _group_then_draw_order,
    kfold_splits,
    leave_last_n,
    random_split,
    temporal_split,
    validation_split,
)

T0 = int(datetime(1998, 1, 1, tzinfo=UTC).timestamp())
DAY = 86_400


@pytest.fixture
def interactions() -> pd.DataFrame:
    """40 users with 1..40 ratings each over 60 items, one rating a day per user."""
    rng = np.random.default_rng(0)
    rows = []
    for user in range(1, 41):
        items = rng.choice(np.arange(1, 61), size=user, replace=False)
        for day, item in enumerate(items):
            rows.append((user, int(item), int(rng.integers(1, 6)), T0 + (day + user) * DAY))
    frame = pd.DataFrame(rows, columns=["user_id", "movie_id", "rating", "rated_at"])
    return frame.sample(frac=1.0, random_state=1)  # no ordering the splits could lean on


def _assert_partition(df: pd.DataFrame, split: Split) -> None:
    assert split.train.index.intersection(split.test.index).empty
    assert split.train.index.union(split.test.index).sort_values().equals(df.index.sort_values())
    assert split.spec.n_train == len(split.train) and split.spec.n_test == len(split.test)


def _recommenders_train_counts(df: pd.DataFrame, ratio: float, by: str) -> pd.Series:
    """Train rows per group under Recommenders 1.2.1's python_stratified_split: each group
    is cut at Python's round(ratio * len(group)) (split_pandas_data_with_ratios)."""
    return df.groupby(by).size().map(lambda n: round(ratio * n))


def test_random_split_is_seeded_and_partitions(interactions: pd.DataFrame) -> None:
    first, again = random_split(interactions, 0.75, seed=3), random_split(interactions, 0.75, 3)
    other = random_split(interactions, 0.75, seed=4)
    _assert_partition(interactions, first)
    assert first.train.index.equals(again.train.index)
    assert not first.train.index.equals(other.train.index)
    assert first.spec.params == {"ratio": 0.75, "seed": 3, "stratify": "user"}


@pytest.mark.parametrize("stratify, column", [("user", "user_id"), ("item", "movie_id")])
def test_random_split_cuts_every_group_as_recommenders_does(
    interactions: pd.DataFrame, stratify: str, column: str
) -> None:
    split = random_split(interactions, 0.75, seed=42, stratify=stratify)
    expected = _recommenders_train_counts(interactions, 0.75, column)
    n_train = split.train.groupby(column).size().reindex(expected.index, fill_value=0)
    assert (n_train == expected).all()
    assert split.spec.params["stratify"] == stratify


def test_random_split_rounds_half_to_even() -> None:
    """Groups of 2, 6, 10 and 14 rows: 0.75 x count is 1.5, 4.5, 7.5, 10.5, which Python's
    round takes to 2, 4, 8, 10."""
    rows = [(user, item, 4, T0 + item) for user, size in enumerate((2, 6, 10, 14), 1)
            for item in range(size)]
    frame = pd.DataFrame(rows, columns=["user_id", "movie_id", "rating", "rated_at"])
    n_train = random_split(frame, 0.75, seed=7).train.groupby("user_id").size()
    assert n_train.to_dict() == {1: 2, 2: 4, 3: 8, 4: 10}


def test_random_split_on_movielens_matches_the_rounding_rule(ml100k) -> None:
    """The real ml-100k: per user and per item, round(0.75 x count) rows train; per user,
    346 of the 943 users keep one more train row than the rank/count <= 0.75 cut kept."""
    frame = pd.read_csv(ml100k / "u.data", sep="\t",
                        names=["user_id", "movie_id", "rating", "rated_at"])
    for stratify, column in (("user", "user_id"), ("item", "movie_id")):
        split = random_split(frame, 0.75, seed=42, stratify=stratify)
        counts = frame.groupby(column).size()
        n_train = split.train.groupby(column).size().reindex(counts.index, fill_value=0)
        n_test = split.test.groupby(column).size().reindex(counts.index, fill_value=0)
        assert (n_train == _recommenders_train_counts(frame, 0.75, column)).all(), stratify
        assert (n_train + n_test == counts).all()
    per_user = frame.groupby("user_id").size()
    floor_cut = np.floor(0.75 * per_user)
    assert int((_recommenders_train_counts(frame, 0.75, "user_id") != floor_cut).sum()) == 346


def test_random_split_rejects_bad_stratify(interactions: pd.DataFrame) -> None:
    with pytest.raises(ValueError, match="stratify must be one of user, item, got 'movie'"):
        random_split(interactions, 0.75, stratify="movie")


def test_random_split_rejects_bad_ratio(interactions: pd.DataFrame) -> None:
    with pytest.raises(ValueError, match="ratio"):
        random_split(interactions, 1.0)


def test_temporal_split_cuts_at_the_date(interactions: pd.DataFrame) -> None:
    cutoff = datetime(1998, 1, 31, tzinfo=UTC)
    train, test = temporal_split(interactions, cutoff)
    assert (train["rated_at"] < cutoff.timestamp()).all()
    assert (test["rated_at"] >= cutoff.timestamp()).all()
    split = temporal_split(interactions, "1998-01-31")  # naive dates are UTC
    assert split.train.index.equals(train.index)
    assert split.spec.params == {"split_date": "1998-01-31T00:00:00+00:00"}
    # Users whose whole history is after the cut appear only in test: counted, not hidden.
    assert split.spec.cold_start_test_users > 0


@pytest.mark.parametrize("date", ["2030-01-01", "1990-05-01", T0])
def test_temporal_split_outside_the_data_names_the_range(
    interactions: pd.DataFrame, date: str | int
) -> None:
    with pytest.raises(ValueError) as error:
        temporal_split(interactions, date)
    message = str(error.value)
    assert "outside the data" in message
    assert "1998-01-02T00:00:00+00:00" in message  # first rating
    assert "1998-03-21T00:00:00+00:00" in message  # last rating
    assert str(date) in message


def test_leave_last_n_takes_latest_with_deterministic_ties() -> None:
    frame = pd.DataFrame(
        {
            "user_id": [1, 1, 1, 1, 2, 2],
            "movie_id": [10, 30, 20, 40, 10, 20],
            "rating": [5, 4, 3, 2, 1, 5],
            "rated_at": [100, 300, 300, 200, 100, 100],
        }
    )
    split = leave_last_n(frame, n=2)
    # User 1: items 20 and 30 tie at t=300 and are the last two. User 2: 2 rows <= n, all train.
    assert sorted(split.test["movie_id"]) == [20, 30]
    one = leave_last_n(frame, n=1)
    assert one.test["movie_id"].tolist() == [30, 20]  # at t=300 (and t=100) movie 30/20 sort last
    assert one.spec.params == {"n": 1}


def test_kfold_each_row_tests_once_and_small_users_stay_in_train(
    interactions: pd.DataFrame,
) -> None:
    folds = kfold_splits(interactions, k=5, seed=42)
    assert len(folds) == 5
    tested = pd.concat([fold.test for fold in folds])
    assert not tested.index.duplicated().any()
    counts = interactions.groupby("user_id").size()
    small = counts[counts < 5].index
    assert not tested["user_id"].isin(small).any()
    assert len(tested) == len(interactions[~interactions["user_id"].isin(small)])
    again = kfold_splits(interactions, k=5, seed=42)
    assert all(a.test.index.equals(b.test.index) for a, b in zip(folds, again, strict=True))


@pytest.mark.parametrize(
    "make_split",
    [
        lambda df: random_split(df, 0.8, seed=5),
        lambda df: leave_last_n(df, 2),
        lambda df: temporal_split(df, "1998-02-20"),
        lambda df: kfold_splits(df, 4, seed=5)[0],
    ],
)
def test_validation_is_carved_from_train_only(interactions: pd.DataFrame, make_split) -> None:
    main = make_split(interactions)
    validation = validation_split(main.train, like=main.spec)
    assert set(validation.train.index) | set(validation.test.index) == set(main.train.index)
    assert validation.test.index.intersection(main.test.index).empty
    expected_policy = "random" if main.spec.policy == "kfold" else main.spec.policy
    assert validation.spec.policy == expected_policy
    assert validation.spec.n_test > 0


def test_validation_mirrors_the_main_parameters(interactions: pd.DataFrame) -> None:
    main = random_split(interactions, 0.8, seed=5)
    validation = validation_split(main.train, like=main.spec)
    assert validation.spec.params == {"ratio": 0.8, "seed": 5, "stratify": "user"}
    assert validation_split(main.train).spec.params == {"ratio": 0.75, "seed": 42,
                                                       "stratify": "user"}
    by_item = random_split(interactions, 0.8, seed=5, stratify="item")
    assert validation_split(by_item.train, like=by_item.spec).spec.params["stratify"] == "item"


def test_missing_columns_are_named() -> None:
    with pytest.raises(ValueError, match="rated_at"):
        temporal_split(pd.DataFrame({"user_id": [1], "movie_id": [2]}), "1998-01-01")


@pytest.mark.parametrize("groups, draws", [
    # Draws a float key cannot tell apart (one ulp at 2**20), in both position orders.
    (np.array([2**20, 2**20, 2**20, 7]), np.array([0.5 + 2**-40, 0.5, 0.5 + 2**-41, 0.25])),
    (np.array([3, 3, 1, 1]), np.array([0.125, 0.125, 0.5, 0.5])),  # equal draws: by position
    (np.array([2**41, 5, 2**41]), np.array([0.75, 0.5, 0.25])),  # ids too large for the key
    (np.array([-4, 9, -4, 0]), np.array([0.9, 0.1, 0.3, 1 - 2**-53])),
])
def test_group_then_draw_order_is_lexsorts_order(groups: np.ndarray, draws: np.ndarray) -> None:
    np.testing.assert_array_equal(_group_then_draw_order(groups, draws),
                                  np.lexsort((draws, groups)))


def test_group_then_draw_order_matches_lexsort_on_many_rows() -> None:
    rng = np.random.default_rng(7)
    groups = rng.integers(0, 50_000, 200_000)
    draws = np.random.RandomState(42).rand(len(groups))
    np.testing.assert_array_equal(_group_then_draw_order(groups, draws),
                                  np.lexsort((draws, groups)))
