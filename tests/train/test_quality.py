"""Quality bar on MovieLens 100K under the Microsoft Recommenders protocol.

Random per-user 75/25 split (seed 42), top-10, train items filtered, every test item relevant.
Each algorithm is tuned with its registered budget on a validation split carved from train
only, then refitted on the full train split and scored once on test. Reference (Recommenders'
ML-100K table, same protocol): BiVAE nDCG@10 0.475 / P@10 0.412, BPR 0.442 / 0.388.
"""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd
import pytest

from services.train.algorithms import ALGORITHMS, BLEND_PARTS, fit_algorithm
from services.train.tuning import split_matrices, tune
from shared.recommenders import evaluate_model
from shared.splits import random_split, validation_split

pytestmark = pytest.mark.slow

SEED, K = 42, 10


def _load_ratings(source: Path) -> pd.DataFrame:
    # File order matters: the seeded split draws one number per row in this order.
    return pd.read_csv(source / "u.data", sep="\t",
                       names=["user_id", "movie_id", "rating", "rated_at"])


@pytest.fixture(scope="module")
def results(ml100k: Path) -> dict[str, dict]:
    ratings = _load_ratings(ml100k)
    split = random_split(ratings, ratio=0.75, seed=SEED)
    train, test = split_matrices(split, ratings)
    # The validation pair tuning scores on (carved from train, as `tune` carves it).
    fit_part, held_out = split_matrices(validation_split(split.train, split.spec), split.train)
    outcome: dict[str, dict] = {}
    print(f"\n{'algorithm':15} {'ndcg@10':>8} {'P@10':>7} {'MAP@10':>7} {'R@10':>7}  seconds")
    for name, spec in ALGORITHMS.items():
        if name in BLEND_PARTS:  # measured on the published table's own split below
            continue
        started = time.perf_counter()
        tuned = tune(name, split.train, n_trials=spec.n_trials, seed=SEED, like=split.spec, k=K)
        model = fit_algorithm(name, train, tuned.best_params, seed=SEED)
        metrics = evaluate_model(model, train, test, (K,))
        seconds = time.perf_counter() - started
        frozen = fit_algorithm(name, fit_part, spec.resolve_params(), seed=SEED)
        outcome[name] = {"metrics": metrics, "params": tuned.best_params,
                         "tuned_validation": tuned.best_score,
                         "frozen_validation": evaluate_model(
                             frozen, fit_part, held_out, (K,))[f"ndcg@{K}"]}
        print(
            f"{name:15} {metrics['ndcg@10']:8.4f} {metrics['precision@10']:7.4f} "
            f"{metrics['map@10']:7.4f} {metrics['recall@10']:7.4f}  {seconds:6.1f}"
            f"  {_searched(name, tuned.best_params)}"
        )
    return outcome


def _searched(name: str, params: dict) -> dict:
    return {key: params[key] for key in ALGORITHMS[name].search_space}


def test_the_frozen_defaults_are_as_good_as_tuning_finds(results: dict[str, dict]) -> None:
    """The defaults were frozen from this search. Its exact path depends on the last bits
    of BLAS arithmetic (another CPU's kernels can tip TPE to a neighbouring trial), so what
    must hold everywhere is their worth: on the validation pair, the frozen defaults score
    within 0.005 nDCG@10 of the best trial found here."""
    for name, outcome in results.items():
        assert outcome["frozen_validation"] >= outcome["tuned_validation"] - 0.005, (
            name, outcome["params"], ALGORITHMS[name].resolve_params())


def test_best_model_clears_the_bar(results: dict[str, dict]) -> None:
    best = max(results.values(), key=lambda outcome: outcome["metrics"]["ndcg@10"])["metrics"]
    assert best["ndcg@10"] >= 0.47
    assert best["precision@10"] >= 0.405


def test_tuned_als_is_competitive(results: dict[str, dict]) -> None:
    assert results["als"]["metrics"]["ndcg@10"] >= 0.42


def test_sparse_ease_matches_dense_ease(results: dict[str, dict], ml100k: Path) -> None:
    """Where dense EASE fits, its sparse approximation loses at most 0.005 nDCG@10 on test
    against the model it approximates: EASE's l2 penalty alone, its dropout held at 0
    (measured: 0.4752 against 0.4801; with the dropout penalty searched EASE scores
    0.4810)."""
    ratings = _load_ratings(ml100k)
    split = random_split(ratings, ratio=0.75, seed=SEED)
    train, test = split_matrices(split, ratings)
    tuned = tune("ease", split.train, n_trials=ALGORITHMS["ease"].n_trials, seed=SEED,
                 like=split.spec, k=K, fixed_params={"dropout": 0.0})
    plain = evaluate_model(fit_algorithm("ease", train, tuned.best_params, seed=SEED),
                           train, test, (K,))["ndcg@10"]
    sparse = results["sparse_ease"]["metrics"]["ndcg@10"]
    assert sparse >= plain - 0.005, (sparse, plain)
    assert results["ease"]["metrics"]["ndcg@10"] >= plain - 0.002  # the search may hold 0


def test_most_popular_is_a_sane_baseline(results: dict[str, dict]) -> None:
    ndcg = results["popular"]["metrics"]["ndcg@10"]
    assert 0.22 <= ndcg <= 0.28
    personalised = [out["metrics"]["ndcg@10"] for name, out in results.items() if name != "popular"]
    assert min(personalised) > ndcg


@pytest.fixture(scope="module")
def item_stratified(ml100k: Path, tmp_path_factory: pytest.TempPathFactory,
                    monkeypatch_module: pytest.MonkeyPatch) -> dict[str, dict[str, float]]:
    """Seed 42 of bench/quality.py: the published table's item-stratified split, the train
    stage tuning EASE, ALS and their blend (10 trials each) on validation carved from train."""
    from bench.quality import load_ratings, run_seed

    monkeypatch_module.setenv("MODEL_PATH", str(tmp_path_factory.mktemp("quality-models")))
    return run_seed(load_ratings(ml100k, 0), SEED, ["ease", "als", "ease_als"], 10)


@pytest.fixture(scope="module")
def monkeypatch_module():  # type: ignore[no-untyped-def]
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def test_blend_beats_its_parts_on_the_published_split(item_stratified: dict) -> None:
    """Measured with bench/quality.py (seed 42): EASE 0.4811, the blend 0.4942 nDCG@10 and
    0.4274 P@10."""
    blend, ease = item_stratified["ease_als"], item_stratified["ease"]
    assert blend["ndcg@10"] >= 0.490 and blend["precision@10"] >= 0.425, blend
    assert blend["ndcg@10"] > ease["ndcg@10"] > item_stratified["als"]["ndcg@10"]
