"""Seeded hyperparameter tuning and cross-validation on training data only.

Every score here comes from a validation split carved out of the *training* frame (or from
k folds of it); the caller's test split is never seen. Trials fit the model with a fixed seed
and single-process optuna, so a given (data, seed, budget) always yields the same trials.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import optuna
import pandas as pd
import scipy.sparse as sp

from services.train.algorithms import (
    ALGORITHMS,
    BLEND_PARTS,
    Dimension,
    IterationCallback,
    blend_of,
    blend_part_params,
    dropout_searched,
    fit_algorithm,
)
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
    best_score: float | None  # None when no trial completed within the budget
    trials: pd.DataFrame
    validation: SplitSpec | None
    validation_users: int = 0  # users each trial scored (summed over folds)
    validation_users_total: int = 0  # users with held-out items (summed over folds)
    trials_run: int = 0  # trials started, whatever their end (complete, pruned)
    trials_cut: int = 0  # trials of the cap left undone when the time budget ran out
    trials_pruned: int = 0
    seconds: float = 0.0
    study: str = ""
    cut_reason: str = ""  # why the search stopped before its cap, when it did
    longest_trial_seconds: float = 0.0  # a trial cut at the deadline counts as projected
    longest_step_seconds: float = 0.0  # the longest piece no deadline could interrupt


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
    pruning: bool = False,
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
        pruning=pruning,
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
    deadline: float | None = None,
    pruning: bool = False,
    shared: SharedStudy | None = None,
    fit_scale: float = 0.0,
    first_trial_seconds: float = 0.0,
) -> TuningResult:
    """The search itself, over (fit matrix, held-out matrix) pairs that never touch test.

    A snapshot carries its validation pair ready-made; ``tune`` builds them from a frame.
    With ``validation_users``, each trial scores a seeded sample of that many users of each
    held-out matrix (the fit matrices keep every user). ``n_trials`` is a cap: no trial
    starts that is expected to end past ``deadline`` (wall-clock seconds since the epoch)
    together with the final fit that follows the search, ``fit_scale`` times a trial (see
    TrialClock; ``first_trial_seconds`` is the expectation before any trial has ended).
    A running ALS or BPR fit (a blend's part included) stops at the iteration after which
    its final fit, expected from the trial's own pace, would no longer end by ``deadline``
    (see TrialObjective.iteration_hook): the trial is cut, the search ends, and its
    ``cut_reason`` starts with "deadline". With ``pruning``, ALS
    and BPR trials report their validation score every few iterations and stop early when
    hopeless (see PRUNING_STEPS). With ``shared``, the study lives in its storage and
    other workers, asked by ``shared.spread``, draw trials from it at the same time.
    """
    objective, users_scored, users_total = prepare_objective(
        algorithm, matrices, seed=seed, k=k, metric=metric, search_space=search_space,
        grid=grid, fixed_params=fixed_params, num_threads=num_threads,
        validation_users=validation_users, pruning=pruning)
    objective.deadline, objective.fit_scale = deadline, fit_scale
    key = objective.key

    if not objective.space and not grid:  # nothing to search (e.g. the popularity baseline)
        started = time.perf_counter()
        params = objective.params({})
        value = objective.score(params)
        seconds = time.perf_counter() - started
        trials = pd.DataFrame([{"number": 0, "value": value, "duration_s": seconds,
                                "state": "COMPLETE", "worker": worker_name()}])
        return TuningResult(algorithm, key, params, value, trials, validation, users_scored,
                            users_total, trials_run=1, seconds=seconds)

    if grid:
        if shared is not None:
            raise ValueError("a grid search runs in one process; give a search space instead")
        sampler: optuna.samplers.BaseSampler = _GridSampler(
            {name: list(values) for name, values in grid.items()}, seed=seed
        )
        n_trials = int(np.prod([len(values) for values in grid.values()]))
    else:
        # With other workers drawing at once, TPE counts their running trials as bad
        # ones (its "constant liar") instead of proposing the same point again.
        sampler = optuna.samplers.TPESampler(seed=seed, constant_liar=shared is not None)

    clock = TrialClock(fit_scale, first_trial_seconds)
    started = time.perf_counter()
    with quiet_optuna():
        if shared is None:
            study = optuna.create_study(direction="maximize", sampler=sampler,
                                        pruner=make_pruner(objective.pruning))
            run_trials(study, objective, n_trials, deadline=deadline, on_trial=on_trial,
                       clock=clock)
        else:
            # A redelivered run carries the same name and carries on with the same study.
            study = optuna.create_study(storage=shared.storage, study_name=shared.name,
                                        direction="maximize", sampler=sampler,
                                        pruner=make_pruner(objective.pruning),
                                        load_if_exists=True)
            shared.spread()
            run_trials(study, objective, n_trials, deadline=deadline, lock=shared.lock,
                       on_trial=on_trial, clock=clock)
            wait_for_running_trials(study)
    return search_result(study, objective, n_trials, validation, users_scored, users_total,
                         time.perf_counter() - started)


class DeadlineCut(optuna.TrialPruned):
    """A running trial stopped because its final fit would otherwise end past the deadline."""


@dataclass(frozen=True)
class SharedStudy:
    """A study in a shared storage that several processes draw trials from."""

    name: str
    storage: optuna.storages.BaseStorage
    lock: Callable[[], AbstractContextManager[Any]] = nullcontext
    spread: Callable[[], None] = lambda: None  # asks other workers to draw trials too


def prepare_objective(
    algorithm: str,
    matrices: Sequence[tuple[sp.csr_matrix, sp.csr_matrix]],
    *,
    seed: int,
    k: int = 10,
    metric: str = "ndcg",
    search_space: Mapping[str, Dimension] | None = None,
    grid: Mapping[str, Sequence[Any]] | None = None,
    fixed_params: Mapping[str, Any] | None = None,
    num_threads: int = 0,
    validation_users: int = 0,
    pruning: bool = False,
) -> tuple[TrialObjective, int, int]:
    """The trial objective on the (sampled) validation pairs; users scored and users there."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {algorithm!r}; choose one of {sorted(ALGORITHMS)}")
    spec = ALGORITHMS[algorithm]
    key = _metric_key(metric, k)
    space = dict(spec.search_space if search_space is None else search_space)
    fixed = dict(fixed_params or {})
    spec.resolve_params({**fixed, **dict.fromkeys(grid or space)})  # raises on unknown names
    space = {name: dim for name, dim in space.items() if name not in fixed}  # held, not drawn
    if algorithm == "ease" and matrices and not dropout_searched(
            matrices[0][0].shape[1], spec.resolve_params(fixed)):
        space.pop("dropout", None)  # held at its value (0 unless given)
    sampled = [sample_validation_users(holdout, validation_users, seed)
               for _fit, holdout in matrices]
    pairs = [(fit, holdout) for (fit, _), (holdout, _, _) in zip(matrices, sampled, strict=True)]
    objective = TrialObjective(algorithm, pairs, key=key, k=k, seed=seed, space=space,
                               grid=grid, fixed=fixed, num_threads=num_threads,
                               pruning=pruning)
    return objective, sum(s[1] for s in sampled), sum(s[2] for s in sampled)


def draw_trials(objective: TrialObjective, shared: SharedStudy, *, n_trials: int, seed: int,
                deadline: float | None = None, clock: TrialClock | None = None) -> int:
    """Another worker's share of a shared search: trials until the study holds
    ``n_trials`` or the deadline passes; returns how many this worker ran. ``seed`` must
    differ between workers (the sampler's random start would repeat itself otherwise)."""
    sampler = optuna.samplers.TPESampler(seed=seed, constant_liar=True)
    if clock is not None:
        objective.deadline, objective.fit_scale = deadline, clock.fit_scale
    with quiet_optuna():
        study = optuna.load_study(study_name=shared.name, storage=shared.storage,
                                  sampler=sampler, pruner=make_pruner(objective.pruning))
        return run_trials(study, objective, n_trials, deadline=deadline, lock=shared.lock,
                          clock=clock)


def wait_for_running_trials(study: optuna.Study, poll: float = 0.2) -> None:
    """Wait for the trials other workers still run, as long as five times the longest
    trial so far (at least a minute): one whose worker died is left out after that."""
    def running() -> list[optuna.trial.FrozenTrial]:
        return study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))

    longest = max((t.user_attrs.get("duration_s", 0.0) for t in study.get_trials(
        deepcopy=False)), default=0.0)
    give_up = time.monotonic() + max(60.0, 5 * longest)
    while running() and time.monotonic() < give_up:
        time.sleep(poll)


class _GridSampler(optuna.samplers.GridSampler):
    """optuna's grid sampler, without its stop at the last cell: that works only inside
    ``Study.optimize``, and ``run_trials`` stops at the grid's size anyway."""

    def after_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial,
                    state: optuna.trial.TrialState, values: Sequence[float] | None) -> None:
        return None


def worker_name() -> str:
    """Host and process recorded on each trial (a prefork pool's children differ)."""
    return f"{socket.gethostname()}:{os.getpid()}"


class TrialObjective:
    """One trial: draw parameters, fit on each validation pair, score its held-out users.

    EASE keeps one factorisation of each fit matrix's Gram matrix for every l2 it is given;
    a blend keeps its parts fitted once per fit matrix and parameters, so that a trial of
    its weight costs a scoring only.
    """

    def __init__(self, algorithm: str, matrices: Sequence[tuple[sp.csr_matrix, sp.csr_matrix]],
                 *, key: str, k: int, seed: int, space: Mapping[str, Dimension],
                 grid: Mapping[str, Sequence[Any]] | None, fixed: Mapping[str, Any],
                 num_threads: int, pruning: bool = False) -> None:
        self.algorithm, self.spec = algorithm, ALGORITHMS[algorithm]
        self.matrices, self.key, self.k, self.seed = list(matrices), key, k, seed
        self.space, self.grid, self.fixed = space, grid, dict(fixed)
        self.num_threads = num_threads
        # Intermediate scores need one validation pair: a fold's partial fit says nothing
        # of the other folds'.
        self.pruning = pruning and algorithm in PRUNING_STEPS and len(self.matrices) == 1
        self._ease_paths: dict[int, tuple[str, EaseLambdaPath]] = {}  # per fit matrix
        self._blend_parts: dict[tuple[int, str], Recommender] = {}  # (fit matrix, part)
        self.deadline: float | None = None  # epoch seconds the final fit must end by
        self.fit_scale = 0.0  # the final fit's cost over a trial's (see TrialClock)
        self.longest_step = 0.0  # seconds of the longest iteration, or scoring pass

    def draw(self, trial: optuna.Trial) -> dict[str, Any]:
        if self.grid:
            return {name: trial.suggest_categorical(name, list(values))
                    for name, values in self.grid.items()}
        return suggest_params(trial, self.space)

    def params(self, drawn: Mapping[str, Any]) -> dict[str, Any]:
        return self.spec.resolve_params({**self.fixed, **drawn})

    def model(self, position: int, fit_matrix: sp.csr_matrix, params: Mapping[str, Any],
              trial: optuna.Trial | None = None) -> Recommender:
        if self.algorithm in BLEND_PARTS:
            return self._blend(position, fit_matrix, params, trial)
        if self.algorithm != "ease":
            hook = self.iteration_hook(self.algorithm, trial, position, params)
            return fit_algorithm(self.algorithm, fit_matrix, params, self.seed,
                                 self.num_threads, on_iteration=hook)
        if float(params["dropout"]):  # one inversion per trial (see prepare_objective)
            return fit_algorithm("ease", fit_matrix, params, self.seed, self.num_threads)
        rest = repr(sorted((name, value) for name, value in params.items() if name != "l2"))
        if position not in self._ease_paths or self._ease_paths[position][0] != rest:
            path = EaseLambdaPath(fit_matrix, params, self.num_threads)
            self._ease_paths[position] = (rest, path)
        return self._ease_paths[position][1].model(float(params["l2"]))

    def _blend(self, position: int, fit_matrix: sp.csr_matrix, params: Mapping[str, Any],
               trial: optuna.Trial | None = None) -> Recommender:
        parts = []
        for part, own in blend_part_params(self.algorithm, params):
            key = (position, f"{part}:{sorted(own.items())!r}")
            if key not in self._blend_parts:
                self._blend_parts[key] = fit_algorithm(
                    part, fit_matrix, own, self.seed, self.num_threads,
                    on_iteration=self.iteration_hook(part, trial, position, own))
            parts.append(self._blend_parts[key])
        return blend_of(self.algorithm, parts, params)

    def iteration_hook(self, algorithm: str, trial: optuna.Trial | None, position: int,
                       params: Mapping[str, Any]) -> IterationCallback | None:
        """What runs after each iteration of an iterative fit (None for the others): the
        deadline check, then the pruner's report (see _pruning_hook).

        The deadline rule: the first iteration carries a fit's start-up, so the pace is
        that of the iterations after it. After iteration i of n, the trial is projected to
        take the first iteration's seconds plus the pace times n - 1; it is cut when one
        more iteration at that pace and then the final fit, expected to take ``fit_scale``
        times the longer of that projection and the study's longest trial, would no longer
        end by the deadline (after the first iteration: when the final fit of the study's
        longest trial would not). So the final fit finds its time left, unless an iteration
        ran longer than the pace (by at most ``longest_step``)."""
        if algorithm not in PRUNING_STEPS or trial is None:
            return None
        iterations = int(params["iterations"])
        prune = self._pruning_hook(trial, position, iterations) if (
            self.pruning and algorithm == self.algorithm) else None
        started = time.perf_counter()
        last, first = [started], [0.0]

        def hook(iteration: int, current: Callable[[], Recommender]) -> None:
            now = time.perf_counter()
            self.longest_step = max(self.longest_step, now - last[0])
            if iteration == 1:
                first[0] = now - started
            if self.deadline is not None and iteration < iterations:
                pace = (now - started - first[0]) / (iteration - 1) if iteration > 1 else 0.0
                projected = first[0] + pace * (iterations - 1)
                fit = self.fit_scale * max(projected, longest_trial(trial.study))
                if time.time() + pace + fit > self.deadline:
                    trial.set_user_attr("projected_s", projected)
                    raise DeadlineCut(
                        f"deadline: {algorithm} stopped after iteration {iteration} of "
                        f"{iterations}, its final fit expected to take {fit:.2f} s")
            if prune is not None:
                prune(iteration, current)
            last[0] = time.perf_counter()

        return hook

    def _pruning_hook(self, trial: optuna.Trial, position: int, iterations: int
                      ) -> IterationCallback:
        """Every few iterations, the validation score of the model so far goes to the
        pruner, which stops the fit when the trial cannot catch up."""
        fit_matrix, holdout = self.matrices[position]
        step = PRUNING_STEPS[self.algorithm]

        def report(iteration: int, current: Callable[[], Recommender]) -> None:
            if iteration % step or iteration >= iterations:  # the last one is the result
                return
            value = evaluate_model(current(), fit_matrix, holdout, (self.k,))[self.key]
            trial.report(value, iteration)
            if trial.should_prune():
                raise optuna.TrialPruned(f"{self.key} {value:.4f} at iteration {iteration}")

        return report

    def score(self, params: Mapping[str, Any], trial: optuna.Trial | None = None) -> float:
        values = []
        for position, (fit_matrix, holdout) in enumerate(self.matrices):
            model = self.model(position, fit_matrix, params, trial)
            scoring = time.perf_counter()
            values.append(evaluate_model(model, fit_matrix, holdout, (self.k,))[self.key])
            self.longest_step = max(self.longest_step, time.perf_counter() - scoring)
        return float(np.mean(values))

    def __call__(self, trial: optuna.Trial) -> float:
        return self.score(self.params(self.draw(trial)), trial)


# Iterations between the intermediate scores a pruned search reports, per iterative fit.
PRUNING_STEPS = {"als": 5, "bpr": 25}
# A trial is pruned when its intermediate score falls below the median of the completed
# trials' at the same iteration, once five trials have completed. The rule draws no random
# numbers, so a pruned search stays as reproducible as its seeded sampler.
PRUNER_STARTUP_TRIALS = 5


def make_pruner(pruning: bool) -> optuna.pruners.BasePruner:
    """The median rule when pruning, else none."""
    if not pruning:
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(n_startup_trials=PRUNER_STARTUP_TRIALS,
                                       n_warmup_steps=0)


@dataclass(frozen=True)
class TrialClock:
    """What a budgeted search expects of its next trial and of the final fit after it.

    A trial is expected to take as long as the longest trial of the study so far (pruned
    ones included, from any worker; one cut at the deadline by its projected length);
    before any has ended, ``first_trial_seconds``. The
    final fit of the best parameters is expected to take ``fit_scale`` times that (the
    caller's ratio of the train split's size to the validation fit matrix's).
    """

    fit_scale: float = 0.0
    first_trial_seconds: float = 0.0

    def expected(self, study: optuna.Study) -> tuple[float, float]:
        """Seconds of the next trial, and of the final fit, as this study stands."""
        trial = longest_trial(study, self.first_trial_seconds)
        return trial, trial * self.fit_scale

    def refusal(self, study: optuna.Study, deadline: float) -> str:
        """Why the next trial may not start before ``deadline`` ("" when it may)."""
        left = deadline - time.time()
        trial, fit = self.expected(study)
        if left <= 0:
            return "the time budget was spent"
        if trial + fit > left:
            return (f"a trial expected to take {trial:.2f} s, then the final fit "
                    f"{fit:.2f} s, would end past the budget ({left:.2f} s left)")
        return ""


def longest_trial(study: optuna.Study, default: float = 0.0) -> float:
    """Seconds of the study's longest ended trial (``default`` before any has ended); a
    trial cut at the deadline counts for the length it was projected to take."""
    return max((max(float(t.user_attrs["duration_s"]), float(t.user_attrs.get(
        "projected_s", 0.0))) for t in study.get_trials(deepcopy=False)
        if "duration_s" in t.user_attrs), default=default)


def run_trials(study: optuna.Study, objective: Callable[[optuna.Trial], float], n_trials: int,
               *, deadline: float | None = None,
               lock: Callable[[], AbstractContextManager[Any]] = nullcontext,
               on_trial: Callable[[int, float], None] | None = None,
               clock: TrialClock | None = None) -> int:
    """Run trials until the study holds ``n_trials`` (in any state) or the next trial is
    expected (by ``clock``) to end, with the final fit after it, past ``deadline``; returns
    how many this call ran, or a running trial is cut at the deadline (DeadlineCut: it ends
    pruned, marked ``cut`` "deadline", and the search ends with it). Why it stopped short
    of the cap goes to the study's user attribute ``cut_reason``.

    ``lock`` makes counting and starting a trial atomic among processes sharing the study.
    """
    clock = clock or TrialClock()
    ran = 0
    while True:
        with lock():
            if len(study.get_trials(deepcopy=False)) >= n_trials:
                break
            reason = "" if deadline is None else clock.refusal(study, deadline)
            if reason:
                study.set_user_attr("cut_reason", reason)
                break
            trial = study.ask()
        started = time.perf_counter()
        trial.set_user_attr("worker", worker_name())
        try:
            value = objective(trial)
        except DeadlineCut as cut:
            trial.set_user_attr("duration_s", time.perf_counter() - started)
            trial.set_user_attr("cut", "deadline")
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            study.set_user_attr("cut_reason", str(cut))
            ran += 1
            break
        except optuna.TrialPruned:
            trial.set_user_attr("duration_s", time.perf_counter() - started)
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        except BaseException:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            raise
        else:
            trial.set_user_attr("duration_s", time.perf_counter() - started)
            study.tell(trial, value)
            if on_trial is not None:
                on_trial(trial.number, value)
        ran += 1
    return ran


def search_result(study: optuna.Study, objective: TrialObjective, n_trials: int,
                  validation: SplitSpec | None, users_scored: int, users_total: int,
                  seconds: float) -> TuningResult:
    """The study's best trial (the defaults when no trial completed) and every trial."""
    trials = [t for t in study.get_trials(deepcopy=False)
              if t.state != optuna.trial.TrialState.RUNNING]
    rows = [{"number": t.number, **t.params, "value": t.value,
             "duration_s": t.user_attrs.get("duration_s", 0.0), "state": t.state.name,
             "worker": t.user_attrs.get("worker", "")} for t in trials]
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    if complete:
        best_trial = max(complete, key=lambda t: (t.value, -t.number))
        best, score = objective.params(best_trial.params), float(best_trial.value)
    else:  # the budget ended before any trial did: the frozen defaults stand
        best, score = objective.params({}), None
    pruned = sum(t.state == optuna.trial.TrialState.PRUNED for t in trials)
    cut = max(n_trials - len(trials), 0)
    return TuningResult(
        objective.algorithm, objective.key, best, score, pd.DataFrame(rows), validation,
        users_scored, users_total, trials_run=len(trials), trials_cut=cut,
        trials_pruned=pruned, seconds=seconds, study=study.study_name,
        cut_reason=str(study.user_attrs.get("cut_reason", "")) if cut or any(
            t.user_attrs.get("cut") == "deadline" for t in trials) else "",
        longest_trial_seconds=longest_trial(study),
        longest_step_seconds=objective.longest_step,
    )


@contextmanager
def quiet_optuna() -> Iterator[None]:
    """One INFO line per trial is noise in workers."""
    optuna_logger = logging.getLogger("optuna")
    previous_level = optuna_logger.level
    optuna_logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        optuna_logger.setLevel(previous_level)


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
