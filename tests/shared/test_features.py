"""Id maps, CSR building, weighting (checked against implicit) and interaction filters."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from implicit.nearest_neighbours import bm25_weight, tfidf_weight

from shared.features import (
    IdIndex,
    Weighting,
    centre_user_ratings,
    filter_min_interactions,
    interactions_csr,
    to_csr,
)


@pytest.fixture
def frame() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "user_id": [30, 10, 10, 20, 30, 30],
            "movie_id": [7, 5, 9, 5, 9, 7],
            "rating": [4, 5, 1, 3, 2, 5],
            "rated_at": [1, 2, 3, 4, 5, 9],
        }
    )


@pytest.fixture
def ratings() -> sp.csr_matrix:
    rng = np.random.default_rng(3)
    dense = rng.integers(1, 6, size=(30, 20)) * (rng.random((30, 20)) < 0.3)
    return sp.csr_matrix(dense.astype(np.float32))


def test_id_index_is_sorted_and_round_trips() -> None:
    index = IdIndex.from_values(np.array([42, 7, 42, 13]))
    assert index.ids.tolist() == [7, 13, 42] and len(index) == 3
    assert index.to_index(np.array([42, 7])).tolist() == [2, 0]
    assert index.to_ids(np.array([1, 2])).tolist() == [13, 42]
    with pytest.raises(ValueError, match="99"):
        index.to_index(np.array([99]))
    assert index.to_index(np.array([99, 13]), allow_unknown=True).tolist() == [-1, 1]


def test_interactions_csr_keeps_latest_duplicate(frame: pd.DataFrame) -> None:
    users, items = IdIndex.from_values(frame["user_id"]), IdIndex.from_values(frame["movie_id"])
    matrix = interactions_csr(frame, users, items)
    assert matrix.shape == (3, 3) and matrix.nnz == 5
    assert matrix[2, 1] == 5  # user 30, movie 7: rated 4 at t=1 then 5 at t=9
    assert matrix[0, 2] == 1  # user 10, movie 9


def test_unknown_ids_raise_unless_dropped(frame: pd.DataFrame) -> None:
    users, items = IdIndex.from_values([10, 20]), IdIndex.from_values(frame["movie_id"])
    with pytest.raises(ValueError, match=r"user_id not in the index \(first few\): \[30\]"):
        interactions_csr(frame, users, items)
    assert interactions_csr(frame, users, items, drop_unknown=True).nnz == 3


def test_simple_weightings(ratings: sp.csr_matrix) -> None:
    assert (Weighting("binary").transform(ratings).data == 1).all()
    linear = Weighting("linear", alpha=0.5).transform(ratings)
    np.testing.assert_allclose(linear.data, 1 + 0.5 * ratings.data)
    kept = Weighting("threshold", threshold=4).transform(ratings)
    assert kept.nnz == int((ratings.data >= 4).sum()) and (kept.data == 1).all()
    assert (Weighting("none").transform(ratings) != ratings).nnz == 0


@pytest.mark.parametrize("binarise", [False, True])
def test_bm25_and_tfidf_match_implicit(ratings: sp.csr_matrix, binarise: bool) -> None:
    source = ratings.copy()
    if binarise:
        source.data[:] = 1
    for scheme, reference in [
        ("bm25", bm25_weight(source, K1=1.5, B=0.6)),
        ("tfidf", tfidf_weight(source)),
    ]:
        weighting = Weighting(scheme, k1=1.5, b=0.6, binarise=binarise)
        ours = weighting.fit(ratings).transform(ratings)
        np.testing.assert_allclose(ours.toarray(), reference.toarray(), rtol=1e-5, atol=1e-6)


def test_fitted_weighting_uses_training_statistics_for_new_rows(ratings: sp.csr_matrix) -> None:
    weighting = Weighting("bm25").fit(ratings)
    whole = weighting.transform(ratings)
    rows = weighting.transform(ratings[[4, 17]])  # e.g. two users' histories at serving time
    np.testing.assert_allclose(rows.toarray(), whole[[4, 17]].toarray())
    with pytest.raises(ValueError, match="fitted"):
        Weighting("bm25").transform(ratings)


def test_weighting_arrays_round_trip(ratings: sp.csr_matrix) -> None:
    weighting = Weighting("bm25", k1=2.0, b=0.5, binarise=False).fit(ratings)
    arrays = weighting.to_arrays()
    assert all(isinstance(value, np.ndarray) and value.dtype != object for value in arrays.values())
    restored = Weighting.from_arrays(arrays)
    assert restored == weighting
    np.testing.assert_array_equal(restored.idf, weighting.idf)
    np.testing.assert_array_equal(
        restored.transform(ratings).toarray(), weighting.transform(ratings).toarray()
    )


def test_unknown_weighting_is_rejected() -> None:
    with pytest.raises(ValueError, match="log"):
        Weighting("log")


def test_to_csr_applies_the_named_weighting(frame: pd.DataFrame) -> None:
    users, items = IdIndex.from_values(frame["user_id"]), IdIndex.from_values(frame["movie_id"])
    assert (to_csr(frame, users, items, "binary").data == 1).all()
    linear = to_csr(frame, users, items, "linear", alpha=2.0)
    assert linear[0, 0] == 11.0  # user 10, movie 5, rating 5


def test_filter_min_interactions_iterates_to_a_fixed_point() -> None:
    # Item 3 has one rating; dropping it leaves user 2 with one rating, which then drops item 2
    # below two ratings, and so on: only the dense block of users 0/1 x items 0/1 survives.
    frame = pd.DataFrame(
        {
            "user_id": [0, 0, 1, 1, 2, 2],
            "movie_id": [0, 1, 0, 1, 2, 3],
            "rating": [1] * 6,
        }
    )
    kept = filter_min_interactions(frame, min_user_interactions=2, min_item_interactions=2)
    assert sorted(kept.index) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="items=0"):
        filter_min_interactions(frame, 1, 0)


def test_centre_user_ratings(frame: pd.DataFrame) -> None:
    centred, means = centre_user_ratings(frame)
    assert means.loc[10] == pytest.approx(3.0)
    assert centred.groupby("user_id")["rating"].mean().abs().max() == pytest.approx(0.0)
    assert frame["rating"].tolist() == [4, 5, 1, 3, 2, 5]  # input untouched
