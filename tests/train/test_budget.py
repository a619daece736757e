"""A tuning budget in seconds: trial counts are caps, the budget is shared in order."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from services.train.training import (
    TrainingError,
    cross_validation_refusal,
    fit_on_snapshot,
    load_snapshot,
    train_many,
    trial_cap,
)
from services.train.tuning import split_matrices, tune, tune_matrices
from shared.artifacts import csr_to_arrays, write_artifact
from shared.splits import random_split, validation_split


@pytest.fixture
def snapshot(use_settings, tmp_path: Path) -> dict:  # type: ignore[no-untyped-def]
    use_settings(MODEL_PATH=str(tmp_path / "models"))
    rng = np.random.default_rng(3)
    taste = np.where(np.arange(80)[:, None] < 40, np.arange(40) < 20, np.arange(40) >= 20)
    liked = rng.random((80, 40)) < np.where(taste, 0.6, 0.1)
    seen = liked & (rng.random((80, 40)) < 0.7)  # the rest of what they like is held out
    matrix = sp.csr_matrix(seen.astype(np.float32) * 4.0)
    held = sp.csr_matrix((liked & ~seen).astype(np.float32) * 4.0)
    arrays = {"user_ids": np.arange(1, 81), "item_ids": np.arange(1, 41)}
    for name, part in (("train", matrix), ("validation_train", matrix),
                       ("validation_test", held), ("test", held)):
        arrays.update(csr_to_arrays(name, part))
    ref = write_artifact("snapshots", arrays, {"kind": "snapshot"})
    return {"snapshot_id": "s", "artifact_path": ref.path, "sha256": ref.sha256}


@pytest.fixture(scope="module")
def train() -> pd.DataFrame:
    rng = np.random.default_rng(8)
    rows = [(user, item, 4, 0) for user in range(50) for item in range(30)
            if rng.random() < (0.5 if (item < 15) == (user < 25) else 0.1)]
    frame = pd.DataFrame(rows, columns=["user_id", "movie_id", "rating", "rated_at"])
    return random_split(frame, 0.75, seed=1).train


def test_a_spent_budget_keeps_the_defaults_and_says_what_was_cut(train: pd.DataFrame) -> None:
    pair = split_matrices(validation_split(train), train)
    cut = tune_matrices("itemknn_bm25", [pair], n_trials=5, seed=2, deadline=time.time() - 1)
    assert (cut.trials_run, cut.trials_cut, cut.best_score) == (0, 5, None)
    assert cut.best_params["neighbours"] == 204  # the frozen default
    whole = tune_matrices("itemknn_bm25", [pair], n_trials=5, seed=2, deadline=time.time() + 3600)
    assert (whole.trials_run, whole.trials_cut) == (5, 0)
    assert whole.best_score == pytest.approx(whole.trials["value"].max())


def test_a_budget_counted_in_trials_reproduces_a_prefix_of_the_search(train: pd.DataFrame
                                                                      ) -> None:
    """Trials are drawn one after another from a seeded sampler, so a search stopped after
    n trials (by the clock or by the cap) has run the first n trials of the longer one."""
    long = tune("als", train, n_trials=6, seed=4, num_threads=1)
    short = tune("als", train, n_trials=3, seed=4, num_threads=1)
    columns = ["number", "factors", "regularization", "alpha", "weighting", "value"]
    pd.testing.assert_frame_equal(short.trials[columns], long.trials[columns].iloc[:3])


def test_the_budget_is_shared_by_trial_caps_and_passed_on(snapshot: dict) -> None:
    names = ["popular", "itemknn_cosine", "itemknn_bm25", "ease"]
    budget = 1000.0
    trained = train_many(snapshot, names, n_trials=4, tune_budget=budget)
    tuning = {t["algorithm"]: t["tuning"] for t in trained}
    assert tuning["popular"]["allowance_seconds"] is None  # nothing to search, not budgeted
    # Each share is of the budget the stage has left, every fit before it spent (the
    # snapshot's load and writes aside, a few milliseconds here).
    spent = trained[0]["seconds"]
    for position, share in ((1, 1 / 3), (2, 1 / 2), (3, 1.0)):
        allowance = tuning[names[position]]["allowance_seconds"]
        assert allowance <= (budget - spent) * share + 1e-3
        assert allowance == pytest.approx((budget - spent) * share, abs=0.5)
        spent += trained[position]["seconds"]
    for name in names[1:]:
        assert (tuning[name]["trials_run"], tuning[name]["trials_cut"]) == (4, 0)
    # With the budget ample, the run is the unbudgeted one.
    plain = train_many(snapshot, names, n_trials=4)
    assert [t["params"] for t in plain] == [t["params"] for t in trained]
    assert trial_cap("popular") == 0 and trial_cap("als") == 30 and trial_cap("als", 7) == 7


def test_an_exhausted_budget_skips_what_it_cannot_fit_and_the_run_goes_on(
        snapshot: dict, use_settings) -> None:  # type: ignore[no-untyped-def]
    use_settings(TUNE_BUDGET_SECONDS="1e-9")
    trained = train_many(snapshot, ["popular", "itemknn_cosine", "ease"], n_trials=4)
    assert trained[0]["artifact_path"]  # most-popular has nothing to search: it trains
    for model in trained[1:]:  # no time is left for a final fit within a nanosecond
        assert model["skipped"] and model["artifact_path"] is None
        assert model["tuning"]["cut_reason"].startswith("skipped: its allowance was spent")
        assert model["tuning"]["trials_run"] <= 1
    assert trained[2]["tuning"]["trials_run"] == 0 and trained[2]["validation"] == {}
    assert trained[2]["params"]["l2"] == 412.8
    with pytest.raises(TrainingError, match="tuning budget must be positive"):
        train_many(snapshot, ["ease"], tune_budget=-1.0)


@pytest.mark.parametrize("algorithm", ["als", "bpr"])
def test_pruning_stops_hopeless_trials_reproducibly(train: pd.DataFrame, algorithm: str) -> None:
    pruned = tune(algorithm, train, n_trials=14, seed=6, num_threads=1, pruning=True)
    again = tune(algorithm, train, n_trials=14, seed=6, num_threads=1, pruning=True)
    plain = tune(algorithm, train, n_trials=14, seed=6, num_threads=1)
    states = pruned.trials["state"]
    assert pruned.trials_pruned == (states == "PRUNED").sum() > 0
    assert (states.iloc[:5] == "COMPLETE").all()  # the median rule waits for five trials
    assert plain.trials_pruned == 0 and (plain.trials["state"] == "COMPLETE").all()
    pd.testing.assert_frame_equal(pruned.trials.drop(columns="duration_s"),
                                  again.trials.drop(columns="duration_s"))
    complete = pruned.trials[states == "COMPLETE"]
    assert pruned.best_score == complete["value"].max()
    # Up to the first pruned trial the searches agree: pruning changes nothing it keeps.
    first = int(np.flatnonzero(states == "PRUNED")[0])
    assert pruned.trials["value"].iloc[:first].tolist() == plain.trials["value"].iloc[
        :first].tolist()


def test_pruning_waits_for_data_large_enough(snapshot: dict, use_settings) -> None:  # type: ignore[no-untyped-def]
    (small,) = train_many(snapshot, ["als"], n_trials=12)
    assert small["tuning"]["trials_pruned"] == 0  # 80 x 40 is far below the threshold
    use_settings(TUNE_PRUNING_MIN_INTERACTIONS="0")
    (forced,) = train_many(snapshot, ["als"], n_trials=12)
    assert forced["tuning"]["trials_pruned"] > 0
    assert forced["tuning"]["trials_run"] == 12
    use_settings(TUNE_PRUNING_MIN_INTERACTIONS="0", TUNE_PRUNING="false")
    (off,) = train_many(snapshot, ["als"], n_trials=12)
    assert off["tuning"]["trials_pruned"] == 0 and off["params"] == small["params"]


def _snapshot_with_a_large_train_split(seed: int, items: int = 400, kept: float = 0.25
                                       ) -> dict:
    """A snapshot whose train split holds 1 / ``kept`` times its validation fit matrix (by
    default four times, so the final fit costs several trials)."""
    rng = np.random.default_rng(seed)
    users = 1500
    group = (np.arange(users)[:, None] % 4) == (np.arange(items)[None, :] % 4)
    liked = rng.random((users, items)) < np.where(group, 0.3, 0.03)
    train = sp.csr_matrix(liked.astype(np.float32) * 4.0)
    keep = sp.csr_matrix(train.multiply(rng.random(train.shape) < kept))
    keep.eliminate_zeros()
    held = sp.csr_matrix(train - keep)
    held.eliminate_zeros()
    arrays = {"user_ids": np.arange(1, users + 1), "item_ids": np.arange(1, items + 1)}
    for name, part in (("train", train), ("validation_train", keep),
                       ("validation_test", held), ("test", held)):
        arrays.update(csr_to_arrays(name, part))
    ref = write_artifact("snapshots", arrays, {"kind": "snapshot"})
    return {"snapshot_id": "large-train", "artifact_path": ref.path, "sha256": ref.sha256}


def test_a_budgeted_stage_ends_within_the_budget_final_fits_included(use_settings,  # type: ignore[no-untyped-def]
                                                                     tmp_path: Path) -> None:
    """The budget covers the final fit: the search stops while the time its next trial and
    its final fit are expected to take is still left. The slack stated for the stage is
    its longest trial (what an estimate from past trials can miss by)."""
    use_settings(MODEL_PATH=str(tmp_path / "models"), TRAIN_THREADS="1")
    snapshot = _snapshot_with_a_large_train_split(5)
    budget = 3.0
    clock = time.perf_counter()
    (trained,) = train_many(snapshot, ["als"], n_trials=200, tune_budget=budget)
    stage = time.perf_counter() - clock
    tuning = trained["tuning"]
    assert tuning["trials_run"] > 0 and tuning["trials_cut"] > 0
    assert ("would end past the budget" in tuning["cut_reason"]
            or tuning["cut_reason"].startswith("deadline: als stopped after iteration"))
    assert tuning["fit_reserved_seconds"] == pytest.approx(
        tuning["longest_trial_seconds"] * 4, rel=0.1)  # train is 4x the fit matrix
    assert stage <= budget + tuning["longest_trial_seconds"], (stage, tuning)


def test_a_tiny_budget_holds_for_the_default_algorithms(use_settings, tmp_path: Path  # type: ignore[no-untyped-def]
                                                       ) -> None:
    """3,000 items: one dense EASE solve takes longer than the whole budget. The stage ends
    within the budget plus its stated slack (the longest piece no deadline interrupts),
    skips what it had no time to fit, and says so; most-popular always trains."""
    use_settings(MODEL_PATH=str(tmp_path / "models"), TRAIN_THREADS="1")
    snapshot = _snapshot_with_a_large_train_split(7, items=3000, kept=0.75)
    budget = 5.0
    clock = time.perf_counter()
    trained = train_many(snapshot, None, tune_budget=budget)
    stage = time.perf_counter() - clock
    slack = max(t["tuning"]["slack_seconds"] for t in trained if t["tuning"])
    assert stage <= budget + slack, (stage, slack, [t["tuning"] for t in trained])
    by_name = {t["algorithm"]: t for t in trained}
    assert list(by_name) == ["popular", "itemknn_cosine", "itemknn_bm25", "als", "bpr",
                             "ease", "ease_als"]
    assert by_name["popular"]["artifact_path"] and not by_name["popular"].get("skipped")
    # Its first trial and its final fit are each a 3,000 x 3,000 solve: more than the budget.
    ease = by_name["ease"]["tuning"]
    assert by_name["ease"].get("skipped") and by_name["ease"]["artifact_path"] is None, ease
    assert ease["trials_run"] == 0 and ease["cut_reason"].startswith("skipped: its ")
    for model in trained:
        cut = model["tuning"] and model["tuning"]["trials_cut"]
        assert not cut or model["tuning"]["cut_reason"], model["tuning"]
        assert bool(model.get("skipped")) == (model["artifact_path"] is None)


def test_a_trial_expected_to_overrun_the_budget_is_not_started(train: pd.DataFrame) -> None:
    pair = split_matrices(validation_split(train), train)
    # Before any trial: the stated expectation for a first trial decides.
    none = tune_matrices("itemknn_bm25", [pair], n_trials=5, seed=2,
                         deadline=time.time() + 600, first_trial_seconds=900.0)
    assert (none.trials_run, none.trials_cut) == (0, 5)
    assert "expected to take 900.00 s" in none.cut_reason
    # After one: the trial measured, and a final fit far costlier than a trial.
    one = tune_matrices("itemknn_bm25", [pair], n_trials=5, seed=2,
                        deadline=time.time() + 600, fit_scale=1e9)
    assert (one.trials_run, one.trials_cut) == (1, 4)
    assert "would end past the budget" in one.cut_reason
    assert one.best_score == pytest.approx(one.trials["value"].iloc[0])
    ample = tune_matrices("itemknn_bm25", [pair], n_trials=5, seed=2,
                          deadline=time.time() + 600, fit_scale=1.0)
    assert (ample.trials_run, ample.trials_cut, ample.cut_reason) == (5, 0, "")


def test_one_trial_fits_the_defaults_once(snapshot: dict) -> None:
    (fixed,) = train_many(snapshot, ["als"], n_trials=1)
    (plain,) = train_many(snapshot, ["als"], tune=False)
    assert fixed["params"] == plain["params"]
    assert (fixed["tuning"]["trials_run"], fixed["tuning"]["trials_cut"]) == (0, 1)
    assert "nothing to choose between" in fixed["tuning"]["cut_reason"]
    assert fixed["validation"] == {}


def test_cross_validation_runs_only_when_its_folds_fit_what_is_left(snapshot: dict) -> None:
    soon = time.time() + 20.0
    assert cross_validation_refusal(5, 1.0, None) == ""
    assert cross_validation_refusal(5, 1.0, soon) == ""  # 5 folds of 0.8 s: 4 s
    assert cross_validation_refusal(5, 10.0, soon).startswith(
        "skipped: 5 folds expected to take 40.00 s")
    assert cross_validation_refusal(3, 0.1, time.time() - 1.0).startswith("skipped")
    (budgeted,) = train_many(snapshot, ["ease"], n_trials=2, cv_folds=3, tune_budget=600)
    assert len(budgeted["cross_validation"]["folds"]) == 3  # ample time: it ran, after the fit
    assert "cross_validation_cut" not in budgeted["tuning"]


def test_a_blends_final_fit_stops_its_iterative_part_at_the_deadline(snapshot: dict) -> None:
    # One trial: no search measures the blend, and its ALS part, estimated at nothing as
    # an iterative fit, would not finish a million iterations in the allowance.
    result = fit_on_snapshot(load_snapshot(snapshot), "ease_als",
                             {"als_factors": 4, "als_iterations": 1_000_000}, tune=True,
                             n_trials=1, allowance=1.0)
    assert not result.get("skipped") and result["artifact_path"]
    assert result["tuning"]["final_fit_cut"].startswith("deadline: the final fit stopped")
    assert result["params"]["als_iterations"] < 1_000_000
