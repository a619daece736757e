"""Tuning and cross-validation: seeded, train-only, and honest about what was searched."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import services.train.tuning as tuning
from services.train.algorithms import Dimension
from services.train.ease_path import EaseLambdaPath
from services.train.tuning import cross_validate, split_matrices, tune
from shared.recommenders import evaluate_model
from shared.splits import random_split


@pytest.fixture(scope="module")
def interactions() -> pd.DataFrame:
    """60 users, 40 items, two taste groups, ~16 ratings per user."""
    rng = np.random.default_rng(5)
    rows = []
    for user in range(60):
        liked = np.arange(20) if user < 30 else np.arange(20, 40)
        others = np.setdiff1d(np.arange(40), liked)
        items = np.concatenate([rng.choice(liked, 13, replace=False), rng.choice(others, 3)])
        for position, item in enumerate(np.unique(items)):
            rows.append((user + 100, int(item) + 500, int(rng.integers(1, 6)), 1_000 + position))
    return pd.DataFrame(rows, columns=["user_id", "movie_id", "rating", "rated_at"])


def test_tuning_is_reproducible_and_stays_in_the_space(interactions: pd.DataFrame) -> None:
    train = random_split(interactions, 0.75, seed=1).train
    first = tune("als", train, n_trials=4, seed=3, num_threads=1)
    again = tune("als", train, n_trials=4, seed=3, num_threads=1)
    pd.testing.assert_frame_equal(
        first.trials.drop(columns="duration_s"), again.trials.drop(columns="duration_s")
    )
    assert first.best_params == again.best_params
    assert first.metric == "ndcg@10" and len(first.trials) == 4
    assert first.best_score == pytest.approx(first.trials["value"].max())
    assert 16 <= first.best_params["factors"] <= 256
    assert first.best_params["iterations"] == 15  # undeclared parameters keep their defaults


def test_validation_comes_from_train_only(
    interactions: pd.DataFrame, monkeypatch: pytest.MonkeyPatch
) -> None:
    split = random_split(interactions, 0.75, seed=1)
    seen: list[pd.DataFrame] = []
    original = tuning.validation_split

    def recording_validation_split(frame: pd.DataFrame, like=None):
        seen.append(frame)
        return original(frame, like)

    monkeypatch.setattr(tuning, "validation_split", recording_validation_split)
    result = tune("ease", split.train, n_trials=2, seed=0, like=split.spec)
    assert len(seen) == 1 and seen[0].index.equals(split.train.index)
    assert result.validation is not None
    assert result.validation.n_train + result.validation.n_test == len(split.train)
    assert result.validation.params == split.spec.params


def test_grid_search_tries_every_combination(interactions: pd.DataFrame) -> None:
    train = random_split(interactions, 0.75, seed=1).train
    result = tune("itemknn_bm25", train, grid={"neighbours": [5, 20], "knn_b": [0.2, 0.8]})
    tried = set(zip(result.trials["neighbours"], result.trials["knn_b"], strict=True))
    assert tried == {(5, 0.2), (5, 0.8), (20, 0.2), (20, 0.8)}


def test_custom_space_and_fixed_params(interactions: pd.DataFrame) -> None:
    train = random_split(interactions, 0.75, seed=1).train
    space = {"l2": Dimension("float", 1.0, 10.0, log=True)}
    result = tune("ease", train, n_trials=3, search_space=space, fixed_params={"max_items": 50})
    assert 1.0 <= result.best_params["l2"] <= 10.0 and result.best_params["max_items"] == 50
    with pytest.raises(ValueError, match="unknown ease parameters"):
        tune("ease", train, n_trials=1, fixed_params={"lambda": 1.0})
    with pytest.raises(ValueError, match="coverage"):
        tune("ease", train, n_trials=1, metric="coverage")


def test_algorithm_without_space_is_scored_once(interactions: pd.DataFrame) -> None:
    result = tune("popular", random_split(interactions, 0.75, seed=1).train)
    assert len(result.trials) == 1 and result.best_params["weighting"] == "binary"


def test_tuned_model_beats_popularity_on_structured_data(interactions: pd.DataFrame) -> None:
    split = random_split(interactions, 0.75, seed=1)
    train, test = split_matrices(split, interactions)
    scores = {}
    for name in ("ease", "popular"):
        best = tune(name, split.train, n_trials=5, seed=2, like=split.spec).best_params
        model = tuning.fit_algorithm(name, train, best, seed=2)
        scores[name] = evaluate_model(model, train, test, (5,))["ndcg@5"]
    assert scores["ease"] > scores["popular"]


def test_cross_validation_reports_mean_and_spread(interactions: pd.DataFrame) -> None:
    result = cross_validate("ease", interactions, {"l2": 5.0}, folds=3, seed=4)
    assert len(result.fold_scores) == 3 and result.metric == "ndcg@10"
    assert result.mean == pytest.approx(np.mean(result.fold_scores))
    assert result.std == pytest.approx(np.std(result.fold_scores, ddof=1))
    cv_tuned = tune("ease", interactions, n_trials=2, cv_folds=3, seed=4)
    assert cv_tuned.validation is None and len(cv_tuned.trials) == 2


def test_ease_search_reuses_one_factorisation_with_the_same_scores(
    interactions: pd.DataFrame, monkeypatch: pytest.MonkeyPatch
) -> None:
    split = random_split(interactions, 0.75, seed=1)
    fit_matrix, holdout = split_matrices(split, interactions)
    params = tuning.ALGORITHMS["ease"].resolve_params({"weighting": "bm25"})
    path = EaseLambdaPath(fit_matrix, params, num_threads=1)
    users = np.arange(fit_matrix.shape[0])
    for l2 in (0.5, 12.0, 4000.0):
        fitted = tuning.fit_algorithm("ease", fit_matrix, {**params, "l2": l2})
        np.testing.assert_allclose(path.model(l2).score(users, fit_matrix[users]),
                                   fitted.score(users, fit_matrix[users]), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(path.model(l2).similar_items(3, 5)[1],
                                   fitted.similar_items(3, 5)[1], rtol=1e-4)
    with pytest.raises(ValueError, match="l2 must be positive"):
        path.model(-1e9)
    # Fewer users than items: the path factorises the users' Gram, with the same scores.
    few = sp.csr_matrix(fit_matrix[:25])
    users_path = EaseLambdaPath(few, params, num_threads=1)
    assert users_path.spectrum.eigenvectors.shape[1] <= 25 < few.shape[1]
    for l2 in (0.5, 12.0, 4000.0):
        fitted = tuning.fit_algorithm("ease", few, {**params, "l2": l2})
        rows = np.arange(25)
        np.testing.assert_allclose(users_path.model(l2).score(rows, few[rows]),
                                   fitted.score(rows, few[rows]), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(users_path.model(l2).similar_items(3, 5)[1],
                                   fitted.similar_items(3, 5)[1], rtol=1e-4)

    factorised: list[int] = []
    original = tuning.EaseLambdaPath
    monkeypatch.setattr(tuning, "EaseLambdaPath",
                        lambda *args: factorised.append(1) or original(*args))
    # A search of l2 alone (dropout held) factorises once.
    result = tune("ease", split.train, n_trials=6, seed=3, like=split.spec, num_threads=1,
                  fixed_params={"dropout": 0.0})
    assert len(factorised) == 1 and len(result.trials) == 6
    validation = split_matrices(tuning.validation_split(split.train, split.spec), split.train)
    for row in result.trials.itertuples():  # every trial's value is that of a full EASE fit
        model = tuning.fit_algorithm("ease", validation[0], {"l2": row.l2})
        assert row.value == pytest.approx(
            evaluate_model(model, *validation, (10,))["ndcg@10"], abs=1e-9)


def test_trials_score_a_seeded_sample_of_validation_users(interactions: pd.DataFrame) -> None:
    split = random_split(interactions, 0.75, seed=1)
    _fit, holdout = split_matrices(split, interactions)
    sampled, used, total = tuning.sample_validation_users(holdout, 20, seed=5)
    again, _, _ = tuning.sample_validation_users(holdout, 20, seed=5)
    kept = np.flatnonzero(np.diff(sampled.indptr))
    assert (used, total) == (20, 60) and kept.size == 20
    np.testing.assert_array_equal(kept, np.flatnonzero(np.diff(again.indptr)))
    assert (sampled[kept] != holdout[kept]).nnz == 0  # the sampled users keep every item
    assert tuning.sample_validation_users(holdout, 0, seed=5)[1:] == (60, 60)
    assert tuning.sample_validation_users(holdout, 500, seed=5)[1:] == (60, 60)
    with pytest.raises(ValueError, match="validation users must be 0"):
        tuning.sample_validation_users(holdout, -1, seed=5)

    full = tune("ease", split.train, n_trials=3, seed=3, like=split.spec)
    assert (full.validation_users, full.validation_users_total) == (60, 60)
    part = tune("ease", split.train, n_trials=3, seed=3, like=split.spec, validation_users=25)
    assert (part.validation_users, part.validation_users_total) == (25, 60)
    assert not np.allclose(part.trials["value"], full.trials["value"])


def test_ease_dropout_is_searched_with_each_trial_a_full_fit(interactions: pd.DataFrame
                                                            ) -> None:
    """EDLAE's dropout penalty joins the search on small catalogues; each trial's value is a
    full fit's with that l2 and dropout. Above dropout_max_items it is held at 0."""
    split = random_split(interactions, 0.75, seed=1)
    result = tune("ease", split.train, n_trials=6, seed=3, like=split.spec, num_threads=1)
    assert (result.trials["dropout"] > 0).any()
    validation = split_matrices(tuning.validation_split(split.train, split.spec), split.train)
    for row in result.trials.itertuples():
        model = tuning.fit_algorithm("ease", validation[0], {"l2": row.l2,
                                                             "dropout": row.dropout})
        assert row.value == pytest.approx(
            evaluate_model(model, *validation, (10,))["ndcg@10"], abs=1e-9)
    capped = tune("ease", split.train, n_trials=3, seed=3, like=split.spec, num_threads=1,
                  fixed_params={"dropout_max_items": 5})
    assert "dropout" not in capped.trials and capped.best_params["dropout"] == 0.0
