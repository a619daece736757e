"""Seeded hyperparameter tuning and cross-validation on training data only.

Every score here comes from a validation split carved out of the *training* frame (or from
k folds of it); the caller's test split is never seen. Trials fit the model with a fixed seed
and single-process optuna, so a given (data, seed, budget) always yields the same trials.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import optuna
import pandas as pd
import scipy.sparse as sp

from services.train.algorithms import ALGORITHMS, Dimension, fit_algorithm
from services.train.ease_path import EaseLambdaPath
from shared.features import IdIndex, interactions_csr
from shared.recommenders import Recommender, evaluate_model
from shared.splits import Split, SplitSpec, kfold_splits, validation_split


@dataclass(frozen=True, eq=False)
class TuningResult:
    """Best parameters (complete, defaults included), their score and every trial."""

    algorithm: str
    metric: str
    best_params: dict[str, Any]
    best_score: float
    trials: pd.DataFrame
    validation: SplitSpec | None
    validation_users: int = 0  # users each trial scored (summed over folds)
    validation_users_total: int = 0  # users with held-out items (summed over folds)


@dataclass(frozen=True)
class CrossValidationResult:
    """Mean and standard deviation of a metric over k folds of the training data."""

    metric: str
    mean: float
    std: float
    fold_scores: tuple[float, ...]


def split_matrices(split: Split, reference: pd.DataFrame) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    """Raw-rating train and test CSRs of a split, indexed by the users/items of ``reference``."""
    users, items = (
        IdIndex.from_values(reference["user_id"]),
        IdIndex.from_values(reference["movie_id"]),
    )
    train = interactions_csr(split.train, users, items)
    # Validation/test rows for ids unknown to the reference cannot be scored; drop them.
    test = interactions_csr(split.test, users, items, drop_unknown=True)
    return train, test


def sample_validation_users(holdout: sp.csr_matrix, n_users: int, seed: int
                            ) -> tuple[sp.csr_matrix, int, int]:
    """The held-out rows of a seeded sample of ``n_users`` users (all when 0 or more than
    there are), the others emptied; with the sample size and the number of users there were."""
    holdout = sp.csr_matrix(holdout)
    users = np.flatnonzero(np.diff(holdout.indptr))
    if n_users < 0:
        raise ValueError(f"validation users must be 0 (all) or positive, got {n_users}")
    if not n_users or n_users >= users.size:
        return holdout, users.size, users.size
    chosen = np.random.default_rng(seed).choice(users, n_users, replace=False)
    keep = np.zeros(holdout.shape[0], dtype=np.float32)
    keep[chosen] = 1.0
    sampled = sp.csr_matrix(sp.diags(keep) @ holdout)
    sampled.eliminate_zeros()
    return sampled, n_users, users.size


def suggest_params(trial: optuna.Trial, space: Mapping[str, Dimension]) -> dict[str, Any]:
    """Draw one value per declared hyperparameter from an optuna trial."""
    params: dict[str, Any] = {}
    for name, dim in space.items():
        if dim.kind == "int":
            params[name] = trial.suggest_int(name, int(dim.low), int(dim.high), log=dim.log)
        elif dim.kind == "float":
            params[name] = trial.suggest_float(name, dim.low, dim.high, log=dim.log)
        elif dim.kind == "choice":
            params[name] = trial.suggest_categorical(name, list(dim.values))
        else:
            raise ValueError(f"unsupported search dimension kind for {name!r}: {dim.kind!r}")
    return params


def _metric_key(metric: str, k: int) -> str:
    key = metric if "@" in metric else f"{metric}@{k}"
    name = key.split("@")[0]
    if name not in ("ndcg", "precision", "recall", "map", "hit_rate", "mrr"):
        raise ValueError(f"cannot tune on {metric!r}; use an accuracy metric such as 'ndcg'")
    return key


def tune(
    algorithm: str,
    train: pd.DataFrame,
    *,
    n_trials: int = 20,
    seed: int = 42,
    k: int = 10,
    metric: str = "ndcg",
    like: SplitSpec | None = None,
    search_space: Mapping[str, Dimension] | None = None,
    grid: Mapping[str, Sequence[Any]] | None = None,
    fixed_params: Mapping[str, Any] | None = None,
    cv_folds: int | None = None,
    num_threads: int = 0,
    validation_users: int = 0,
) -> TuningResult:
    """Search hyperparameters maximising ``metric@k`` on a validation split of ``train``.

    The validation split mirrors ``like`` (the main split's spec; random 75/25 by default), or
    with ``cv_folds`` each trial scores the mean over per-user folds of ``train``. The search is
    seeded TPE over the algorithm's declared space, or an exhaustive grid when ``grid`` is given.
    """
    if cv_folds:
        splits = kfold_splits(train, k=cv_folds, seed=seed)
        validation = None
    else:
        splits = [validation_split(train, like)]
        validation = splits[0].spec
    matrices = [split_matrices(split, train) for split in splits]
    return tune_matrices(
        algorithm, matrices, n_trials=n_trials, seed=seed, k=k, metric=metric,
        search_space=search_space, grid=grid, fixed_params=fixed_params,
        num_threads=num_threads, validation=validation, validation_users=validation_users,
    )


def tune_matrices(
    algorithm: str,
    matrices: Sequence[tuple[sp.csr_matrix, sp.csr_matrix]],
    *,
    n_trials: int = 20,
    seed: int = 42,
    k: int = 10,
    metric: str = "ndcg",
    search_space: Mapping[str, Dimension] | None = None,
    grid: Mapping[str, Sequence[Any]] | None = None,
    fixed_params: Mapping[str, Any] | None = None,
    num_threads: int = 0,
    validation: SplitSpec | None = None,
    on_trial: Callable[[int, float], None] | None = None,
    validation_users: int = 0,
) -> TuningResult:
    """The search itself, over (fit matrix, held-out matrix) pairs that never touch test.

    A snapshot carries its validation pair ready-made; ``tune`` builds them from a frame.
    With ``validation_users``, each trial scores a seeded sample of that many users of each
    held-out matrix (the fit matrices keep every user).
    """
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {algorithm!r}; choose one of {sorted(ALGORITHMS)}")
    spec = ALGORITHMS[algorithm]
    key = _metric_key(metric, k)
    space = dict(spec.search_space if search_space is None else search_space)
    fixed = dict(fixed_params or {})
    spec.resolve_params({**fixed, **dict.fromkeys(grid or space)})  # raises on unknown names
    sampled = [sample_validation_users(holdout, validation_users, seed)
               for _fit, holdout in matrices]
    matrices = [(fit, holdout) for (fit, _), (holdout, _, _) in zip(matrices, sampled,
                                                                    strict=True)]
    users_scored, users_total = (sum(s[1] for s in sampled), sum(s[2] for s in sampled))

    ease_paths: dict[int, tuple[str, EaseLambdaPath]] = {}  # per fit matrix

    def trial_model(position: int, fit_matrix: sp.csr_matrix, params: Mapping[str, Any]
                    ) -> Recommender:
        if algorithm != "ease":
            return fit_algorithm(algorithm, fit_matrix, params, seed, num_threads)
        # One factorisation per matrix (and weighting) serves every l2 the search draws.
        rest = repr(sorted((name, value) for name, value in params.items() if name != "l2"))
        if position not in ease_paths or ease_paths[position][0] != rest:
            ease_paths[position] = (rest, EaseLambdaPath(fit_matrix, params, num_threads))
        return ease_paths[position][1].model(float(params["l2"]))

    def score(params: Mapping[str, Any]) -> float:
        values = []
        for position, (fit_matrix, holdout) in enumerate(matrices):
            model = trial_model(position, fit_matrix, params)
            values.append(evaluate_model(model, fit_matrix, holdout, (k,))[key])
        return float(np.mean(values))

    if not space and not grid:  # nothing to search (e.g. the popularity baseline)
        params = spec.resolve_params(fixed)
        value = score(params)
        trials = pd.DataFrame([{"number": 0, "value": value, "duration_s": 0.0}])
        return TuningResult(algorithm, key, params, value, trials, validation, users_scored,
                            users_total)

    if grid:
        sampler: optuna.samplers.BaseSampler = optuna.samplers.GridSampler(
            {name: list(values) for name, values in grid.items()}, seed=seed
        )
        n_trials = int(np.prod([len(values) for values in grid.values()]))
    else:
        sampler = optuna.samplers.TPESampler(seed=seed)

    rows: list[dict[str, Any]] = []

    def objective(trial: optuna.Trial) -> float:
        started = time.perf_counter()
        drawn = (
            {name: trial.suggest_categorical(name, list(values)) for name, values in grid.items()}
            if grid
            else suggest_params(trial, space)
        )
        value = score(spec.resolve_params({**fixed, **drawn}))
        if on_trial is not None:
            on_trial(trial.number, value)
        rows.append(
            {
                "number": trial.number,
                **drawn,
                "value": value,
                "duration_s": time.perf_counter() - started,
            }
        )
        return value

    optuna_logger = logging.getLogger("optuna")
    previous_level = optuna_logger.level
    optuna_logger.setLevel(logging.WARNING)  # one INFO line per trial is noise in workers
    try:
        study = optuna.create_study(direction="maximize", sampler=sampler)
        study.optimize(objective, n_trials=n_trials, n_jobs=1)
    finally:
        optuna_logger.setLevel(previous_level)
    best = spec.resolve_params({**fixed, **study.best_trial.params})
    return TuningResult(
        algorithm, key, best, float(study.best_value), pd.DataFrame(rows), validation,
        users_scored, users_total,
    )


def cross_validate(
    algorithm: str,
    train: pd.DataFrame,
    params: Mapping[str, Any] | None = None,
    *,
    folds: int = 5,
    seed: int = 42,
    k: int = 10,
    metric: str = "ndcg",
    num_threads: int = 0,
) -> CrossValidationResult:
    """Per-user k-fold cross-validation of one parameter setting on ``train``."""
    key = _metric_key(metric, k)
    scores = []
    for split in kfold_splits(train, k=folds, seed=seed):
        fit_matrix, holdout = split_matrices(split, train)
        model = fit_algorithm(algorithm, fit_matrix, params, seed, num_threads)
        scores.append(evaluate_model(model, fit_matrix, holdout, (k,))[key])
    values = np.asarray(scores)
    return CrossValidationResult(
        key, float(values.mean()), float(values.std(ddof=1)), tuple(scores)
    )
