"""Every algorithm fits and recommends on a tiny matrix; serialisation, EASE, ALS fold-in."""

from __future__ import annotations

import io

import numpy as np
import pytest
import scipy.sparse as sp
from implicit.cpu.als import AlternatingLeastSquares

import shared.recommenders as recommenders
from services.train.algorithms import ALGORITHMS, _pruned_gram, fit_algorithm
from shared.recommenders import (
    FactoredSimilarityModel,
    FactorModel,
    Recommender,
    from_arrays,
)

# Small factor counts and few iterations keep these fits instantaneous.
TINY_PARAMS = {
    "als": {"factors": 8, "regularization": 0.5, "iterations": 5},
    "bpr": {"factors": 8, "iterations": 20},
    "itemknn_cosine": {"neighbours": 10},
    "itemknn_bm25": {"neighbours": 10},
    "ease": {"l2": 5.0},
    "popular": {},
    "sparse_ease": {"l2": 5.0, "target_density": 0.5},
    "ease_als": {"ease_l2": 5.0, "als_factors": 8, "als_regularization": 0.5,
                 "als_iterations": 5, "blend_weight": 0.4},
}


@pytest.fixture(scope="module")
def ratings() -> sp.csr_matrix:
    """40 users x 30 items of 1-5 ratings with two taste groups, ~30% dense."""
    rng = np.random.default_rng(11)
    taste = np.where(np.arange(40)[:, None] < 20, np.arange(30) < 15, np.arange(30) >= 15)
    mask = rng.random((40, 30)) < np.where(taste, 0.5, 0.1)
    return sp.csr_matrix((rng.integers(1, 6, (40, 30)) * mask).astype(np.float32))


@pytest.fixture(scope="module", params=sorted(ALGORITHMS))
def fitted(request: pytest.FixtureRequest, ratings: sp.csr_matrix) -> Recommender:
    return fit_algorithm(request.param, ratings, TINY_PARAMS[request.param], seed=7, num_threads=1)


def test_recommendations_are_ranked_unseen_and_unique(
    fitted: Recommender, ratings: sp.csr_matrix
) -> None:
    users = np.array([0, 5, 25, 39])
    ids, scores = fitted.recommend(users, ratings[users], k=8)
    assert ids.shape == scores.shape == (4, 8)
    for row, user in enumerate(users):
        assert not np.isin(ids[row], ratings[user].indices).any()
        assert len(set(ids[row].tolist())) == 8
        assert (np.diff(scores[row]) <= 0).all()


def test_seen_items_can_be_kept(fitted: Recommender, ratings: sp.csr_matrix) -> None:
    ids, _ = fitted.recommend([3], ratings[[3]], k=30, filter_seen=False)
    assert sorted(ids[0].tolist()) == list(range(30))


def test_rows_short_of_k_are_padded(fitted: Recommender, ratings: sp.csr_matrix) -> None:
    n_unseen = 30 - ratings[0].nnz
    ids, scores = fitted.recommend([0], ratings[[0]], k=40)
    assert (ids[0, n_unseen:] == -1).all() and np.isneginf(scores[0, n_unseen:]).all()
    assert (ids[0, :n_unseen] >= 0).all()


def test_scoring_in_blocks_changes_nothing(
    fitted: Recommender, ratings: sp.csr_matrix, monkeypatch: pytest.MonkeyPatch
) -> None:
    users = np.arange(40)
    expected_ids, expected_scores = fitted.recommend(users, ratings, k=6)
    monkeypatch.setattr(recommenders, "SCORE_BLOCK_CELLS", 7 * 30)  # 7 users per block
    ids, scores = fitted.recommend(users, ratings, k=6)
    np.testing.assert_array_equal(ids, expected_ids)
    np.testing.assert_allclose(scores, expected_scores, rtol=1e-6, atol=1e-6)


def test_arrays_round_trip_gives_identical_recommendations(
    fitted: Recommender, ratings: sp.csr_matrix
) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, **fitted.to_arrays())
    buffer.seek(0)
    with np.load(buffer, allow_pickle=False) as stored:  # numpy arrays only, no pickle
        restored = Recommender.from_arrays(dict(stored))
    users = np.arange(40)
    expected_ids, expected_scores = fitted.recommend(users, ratings, k=10)
    ids, scores = restored.recommend(users, ratings, k=10)
    np.testing.assert_array_equal(ids, expected_ids)
    np.testing.assert_array_equal(scores, expected_scores)
    np.testing.assert_array_equal(restored.similar_items(2, 5)[0], fitted.similar_items(2, 5)[0])


def test_similar_items_exclude_the_item(fitted: Recommender) -> None:
    ids, scores = fitted.similar_items(4, k=5)
    assert ids.shape == (5,) and 4 not in ids.tolist()
    with pytest.raises(ValueError, match="item index 30"):
        fitted.similar_items(30, k=5)


def test_history_recommendations_for_new_users(fitted: Recommender, ratings: sp.csr_matrix) -> None:
    history = ratings[[1, 30]]
    ids, _ = fitted.recommend_for_history(history, k=5)
    assert ids.shape == (2, 5)
    assert not np.isin(ids[0], history[0].indices).any()
    if fitted.algorithm != "bpr":  # BPR's fold-in is a heuristic; the others are exact or stateless
        trained_ids, _ = fitted.recommend([1, 30], history, k=5)
        overlap = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(ids, trained_ids, strict=True)])
        assert overlap >= 0.6


@pytest.mark.parametrize("name", ["als", "bpr"])
def test_factor_models_are_reproducible_with_a_seed(name: str, ratings: sp.csr_matrix) -> None:
    first = fit_algorithm(name, ratings, TINY_PARAMS[name], seed=3, num_threads=2)
    again = fit_algorithm(name, ratings, TINY_PARAMS[name], seed=3, num_threads=2)
    other = fit_algorithm(name, ratings, TINY_PARAMS[name], seed=4, num_threads=2)
    assert isinstance(first, FactorModel)
    np.testing.assert_array_equal(first.item_factors, again.item_factors)
    assert not np.array_equal(first.item_factors, other.item_factors)


def test_als_fold_in_matches_implicit_recalculate_user(ratings: sp.csr_matrix) -> None:
    params = {"factors": 6, "regularization": 2.0, "alpha": 4.0, "iterations": 8}
    model = fit_algorithm("als", ratings, params, seed=1, num_threads=1)
    assert isinstance(model, FactorModel)
    reference = AlternatingLeastSquares(factors=6, regularization=2.0, alpha=4.0, num_threads=1)
    reference.user_factors, reference.item_factors = model.user_factors, model.item_factors
    rows = model.weighting.transform(ratings[[2, 9, 33]])
    expected = reference.recalculate_user([2, 9, 33], rows)
    np.testing.assert_allclose(model.fold_in(rows), expected, rtol=1e-3, atol=1e-5)
    # recalculate_user=True in implicit's recommend gives the same ranking as fold-in here.
    ids, _ = reference.recommend([2, 9, 33], rows, N=5, recalculate_user=True)
    np.testing.assert_array_equal(model.recommend_for_history(ratings[[2, 9, 33]], 5)[0], ids)


def test_ease_is_the_closed_form(ratings: sp.csr_matrix) -> None:
    model = fit_algorithm("ease", ratings, {"l2": 3.0})
    binary = (ratings > 0).astype(np.float64).toarray()
    inverse = np.linalg.inv(binary.T @ binary + 3.0 * np.eye(30))
    expected = np.eye(30) - inverse / np.diag(inverse)
    np.testing.assert_allclose(model.to_arrays()["similarity"], expected, atol=1e-5)


def test_ease_with_few_users_is_the_closed_form(ratings: sp.csr_matrix) -> None:
    few = sp.csr_matrix(ratings[:12])  # 12 users of 30 items: P from the users' Gram
    model = fit_algorithm("ease", few, {"l2": 3.0})
    binary = (few > 0).astype(np.float64).toarray()
    inverse = np.linalg.inv(binary.T @ binary + 3.0 * np.eye(30))
    expected = np.eye(30) - inverse / np.diag(inverse)
    np.testing.assert_allclose(model.to_arrays()["similarity"], expected, atol=1e-5)


def test_ease_refuses_too_many_items(ratings: sp.csr_matrix) -> None:
    with pytest.raises(ValueError, match=r"30 items exceeds max_items=20 \(about"):
        fit_algorithm("ease", ratings, {"max_items": 20})


def test_sparse_ease_at_full_density_is_the_closed_form(ratings: sp.csr_matrix) -> None:
    model = fit_algorithm("sparse_ease", ratings, {"l2": 3.0, "target_density": 1.0})
    assert isinstance(model, FactoredSimilarityModel)
    left, right = model.factors
    weights = (left @ right).toarray() + np.eye(30)
    binary = (ratings > 0).astype(np.float64).toarray()
    inverse = np.linalg.inv(binary.T @ binary + 3.0 * np.eye(30))
    expected = np.eye(30) - inverse / np.diag(inverse)
    np.testing.assert_allclose(weights, expected, atol=1e-2)  # the inverse of L is iterated
    np.testing.assert_allclose(np.diag(weights), 0.0, atol=1e-5)


def test_sparse_ease_keeps_its_factors_sparse_and_is_reproducible(
    ratings: sp.csr_matrix,
) -> None:
    params = {"l2": 3.0, "target_density": 0.1}
    first = fit_algorithm("sparse_ease", ratings, params, seed=1)
    again = fit_algorithm("sparse_ease", ratings, params, seed=1)
    assert isinstance(first, FactoredSimilarityModel) and isinstance(again, FactoredSimilarityModel)
    dense = fit_algorithm("sparse_ease", ratings, {"l2": 3.0, "target_density": 1.0})
    assert sum(f.nnz for f in first.factors) < 0.6 * sum(f.nnz for f in dense.factors)
    for a, b in zip(first.factors, again.factors, strict=True):
        np.testing.assert_array_equal(a.toarray(), b.toarray())
    capped = fit_algorithm("sparse_ease", ratings, {**params, "max_item_weights": 2})
    assert max(f.nnz for f in capped.factors) < max(f.nnz for f in first.factors)


def test_sparse_ease_incomplete_factorisation_follows_the_tastes(ratings: sp.csr_matrix) -> None:
    model = fit_algorithm("sparse_ease", ratings, {"l2": 0.1, "factorizer": "icf",
                                                   "max_item_weights": 20})
    assert isinstance(model, FactoredSimilarityModel)
    assert max(f.nnz for f in model.factors) <= 20 * 30
    ids, _ = model.recommend(np.arange(40), ratings, k=5)
    own_group = np.where(np.arange(40)[:, None] < 20, ids < 15, ids >= 15)
    # Half of a user's own group is seen, so unseen items drawn at random would be ~36% theirs.
    assert own_group.mean() >= 0.55


def test_pruned_gram_keeps_the_largest_co_occurrences_symmetric(ratings: sp.csr_matrix) -> None:
    binary = sp.csr_matrix((ratings > 0).astype(np.float32))
    gram = (binary.T @ binary).toarray()
    pruned = _pruned_gram(binary, 5, block_cells=7 * 30).toarray()  # blocks of 7 items
    np.testing.assert_array_equal(pruned, pruned.T)
    np.testing.assert_array_equal(np.diag(pruned), np.diag(gram))
    kept = pruned != 0
    np.testing.assert_array_equal(pruned[kept], gram[kept])
    assert kept.sum() <= 2 * 5 * 30 + 30 and kept.sum() < (gram != 0).sum()  # both halves kept
    np.testing.assert_array_equal(_pruned_gram(binary, 30).toarray(), gram)
    unrated = sp.hstack([binary, sp.csr_matrix((40, 1))]).tocsr()  # an item nobody rated
    assert _pruned_gram(unrated, 5)[30, 30] > 0 and _pruned_gram(unrated, 5)[30].nnz == 1


def test_sparse_ease_refuses_an_unknown_factorizer(ratings: sp.csr_matrix) -> None:
    with pytest.raises(ValueError, match="factorizer must be 'auto', 'cholmod' or 'icf', got 'lu'"):
        fit_algorithm("sparse_ease", ratings, {"factorizer": "lu"})


def test_bad_requests_are_explained(ratings: sp.csr_matrix) -> None:
    with pytest.raises(ValueError, match="unknown algorithm 'svd'"):
        fit_algorithm("svd", ratings)
    with pytest.raises(ValueError, match=r"unknown als parameters \['factor'\]"):
        fit_algorithm("als", ratings, {"factor": 3})
    model = fit_algorithm("popular", ratings)
    with pytest.raises(ValueError, match="one history row per requested user"):
        model.recommend([0, 1], ratings, k=3)
    als = fit_algorithm("als", ratings, TINY_PARAMS["als"], num_threads=1)
    with pytest.raises(ValueError, match="user indices must lie in 0..39"):
        als.recommend([40], ratings[[0]], k=3)


def test_unknown_algorithm_in_arrays() -> None:
    with pytest.raises(ValueError, match="unknown algorithm 'svd'"):
        from_arrays(
            {
                "algorithm": np.array("svd"),
                "weighting.scheme": np.array("binary"),
                "weighting.numbers": np.ones(4),
                "weighting.binarise": np.array(True),
            }
        )


def test_registry_fit_overlays_partial_params_on_defaults(ratings: sp.csr_matrix) -> None:
    model = ALGORITHMS["als"].fit(ratings, {"factors": 4, "iterations": 2}, 1, num_threads=1)
    assert isinstance(model, FactorModel) and model.item_factors.shape == (30, 4)
    assert model.regularization == ALGORITHMS["als"].defaults["regularization"]


def test_every_algorithm_declares_defaults_and_a_search_space() -> None:
    for name, spec in ALGORITHMS.items():
        params = spec.resolve_params()
        assert set(spec.search_space) <= set(params), name
        for dimension in spec.search_space.values():
            assert dimension.kind in ("int", "float", "choice")
            assert dimension.kind == "choice" or dimension.low < dimension.high


def test_blend_is_the_weighted_sum_of_its_standardised_parts(ratings: sp.csr_matrix) -> None:
    from shared.recommenders import BlendModel

    blend = fit_algorithm("ease_als", ratings, TINY_PARAMS["ease_als"], seed=7, num_threads=1)
    assert isinstance(blend, BlendModel) and list(blend.weights) == pytest.approx([0.6, 0.4])
    ease = fit_algorithm("ease", ratings, {"l2": 5.0}, seed=7, num_threads=1)
    als = fit_algorithm("als", ratings, TINY_PARAMS["als"], seed=7, num_threads=1)
    users = np.arange(ratings.shape[0])

    def standardised(scores: np.ndarray) -> np.ndarray:
        scores = np.asarray(scores, dtype=np.float64)
        return (scores - scores.mean(1, keepdims=True)) / scores.std(1, keepdims=True)

    expected = 0.6 * standardised(ease.score(users, ratings)) + 0.4 * standardised(
        als.score(users, ratings))
    np.testing.assert_allclose(blend.score(users, ratings), expected, rtol=1e-4, atol=1e-4)


def test_blend_refuses_a_weight_outside_zero_to_one(ratings: sp.csr_matrix) -> None:
    with pytest.raises(ValueError, match="ease_als blend_weight must lie in \\[0, 1\\], got 1.5"):
        fit_algorithm("ease_als", ratings, {**TINY_PARAMS["ease_als"], "blend_weight": 1.5})


def test_ease_dropout_is_edlaes_popularity_weighted_penalty() -> None:
    """dropout p adds p / (1 - p) * diag(X^T X) to l2 on the Gram's diagonal (Steck 2020);
    0 is plain EASE."""
    rng = np.random.default_rng(4)
    train = sp.csr_matrix((rng.random((60, 30)) < 0.2).astype(np.float32))
    gram = (train.T @ train).toarray().astype(np.float64)
    p, l2 = 0.5, 3.0
    inverse = np.linalg.inv(gram + np.diag(l2 + p / (1 - p) * np.diag(gram)))
    expected = -inverse / np.diag(inverse)
    np.fill_diagonal(expected, 0.0)
    model = ALGORITHMS["ease"].fit(train, {"l2": l2, "dropout": p, "weighting": "none"})
    users = np.arange(60)
    np.testing.assert_allclose(model.score(users, train), train.toarray() @ expected,
                               rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="dropout must be in"):
        ALGORITHMS["ease"].fit(train, {"dropout": 1.0})
