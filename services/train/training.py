"""Training on a snapshot: tune on its validation pair, fit on its train split, store arrays.

The train service reads snapshots from the artifact store and writes model artifacts
there; registering the result is the registry's job. The only database it touches is
optuna's, when the trials of a search are spread over several train workers.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from services.train.algorithms import (
    ALGORITHMS,
    BLEND_PARTS,
    ITERATIVE,
    IterationCallback,
    StopFitting,
    fit_algorithm,
)
from services.train.estimates import Estimate, first_trial_estimate
from services.train.studies import shares_studies, study_lock, study_storage
from services.train.tuning import (
    SharedStudy,
    TrialClock,
    cross_validate,
    draw_trials,
    prepare_objective,
    tune_matrices,
)
from shared.artifacts import arrays_to_csr, read_artifact, write_artifact
from shared.errors import RecsysError
from shared.recommenders import default_num_threads, evaluate_model
from shared.settings import get_settings

Progress = Callable[[str, dict[str, Any]], None]
DEFAULT_ALGORITHMS = ("popular", "itemknn_cosine", "itemknn_bm25", "als", "bpr", "ease",
                      "ease_als")
# What the default list trains instead of an algorithm the catalogue is too large for.
CAPPED_REPLACEMENTS = {"ease": "sparse_ease"}


class TrainingError(RecsysError):
    """A training request names an unknown algorithm, bad parameters or a bad snapshot."""


@dataclass
class SnapshotData:
    """The arrays of a snapshot that training reads."""

    info: dict[str, Any]
    arrays: dict[str, np.ndarray]

    def matrix(self, name: str) -> sp.csr_matrix:
        return arrays_to_csr(name, self.arrays)


def load_snapshot(snapshot: dict[str, Any]) -> SnapshotData:
    """Read a snapshot artifact, verified against its recorded sha256."""
    arrays, _manifest = read_artifact(snapshot["artifact_path"], snapshot["sha256"])
    return SnapshotData(snapshot, arrays)


def default_params(algorithm: str) -> dict[str, Any]:
    """The algorithm's frozen defaults; ALS takes ALS_RANK and ALS_ITERATIONS."""
    if algorithm not in ALGORITHMS:
        raise TrainingError(f"unknown algorithm {algorithm!r}; one of {', '.join(ALGORITHMS)}")
    params = ALGORITHMS[algorithm].resolve_params()
    if algorithm == "als":
        settings = get_settings()
        params.update(factors=settings.als_rank, iterations=settings.als_iterations)
    return params


def threads() -> int:
    configured = get_settings().train_threads
    return configured if configured > 0 else default_num_threads()


def fit_on_snapshot(data: SnapshotData, algorithm: str, params: dict[str, Any] | None = None,
                    tune: bool = False, n_trials: int | None = None,
                    progress: Progress | None = None, cv_folds: int | None = None,
                    allowance: float | None = None, workers: int = 1, run_id: str = "",
                    measured: dict[str, float] | None = None) -> dict[str, Any]:
    """Tune (optionally) on validation, fit on train, store the model; a JSON-able record.

    ``allowance`` bounds the tuning and the final fit in seconds: no trial starts that is
    expected to end, with the final fit, past it (see TrialClock; before one has ended a
    trial is expected to take what services.train.estimates says, ``measured`` being the
    final fits of the algorithms before this one), a running ALS/BPR trial stops at the
    deadline, and when the final fit itself is expected to end past the allowance the
    algorithm is skipped: the record has no artifact, ``skipped`` true and its
    ``cut_reason``. Cross-validation (``cv_folds``) follows the final fit and, under an
    allowance, runs only when its folds are expected to end within it (else
    ``tuning.cross_validation_cut`` says why). With ``workers`` above 1,
    ``workers - 1`` other train workers draw trials of the same study. A search capped
    at one trial has nothing to choose between: it fits the defaults once, on train.
    """
    settings = get_settings()
    started = time.perf_counter()
    try:
        base = {**default_params(algorithm), **(params or {})}
        ALGORITHMS[algorithm].resolve_params(base)
    except ValueError as error:
        raise TrainingError(str(error)) from None
    pair = (data.matrix("validation_train"), data.matrix("validation_test"))
    spec = ALGORITHMS[algorithm]
    trials = trial_cap(algorithm, n_trials) if tune else 0
    deadline = None if allowance is None else time.time() + allowance
    fit_scale = data.arrays["train.data"].size / max(pair[0].nnz, 1)
    estimate = Estimate(0.0, 0.0, "")
    if deadline is not None and trials and deadline > time.time():
        estimate = first_trial_estimate(algorithm, pair[0], base, settings.seed, threads(),
                                        measured or {})
    first_trial_seconds = estimate.seconds
    if trials == 1:
        chosen, validation = spec.resolve_params(base), {}
        tuning = {**untuned_record(trials, allowance), "trials_cut": 1,
                  "cut_reason": "one trial has nothing to choose between: the defaults "
                                "are fitted once, on train"}
    elif trials:
        fixed = {k: v for k, v in base.items() if k not in spec.search_space}
        shared = shared_study(data.info, algorithm, run_id, workers, trials, fixed,
                              deadline, fit_scale, first_trial_seconds) if workers > 1 else None
        result = tune_matrices(
            algorithm, [pair], n_trials=trials, seed=settings.seed, fixed_params=fixed,
            num_threads=threads(), validation_users=settings.tune_validation_users,
            on_trial=(lambda number, value: progress("trial", {
                "algorithm": algorithm, "trial": number + 1, "trials": trials,
                "value": value})) if progress else None, deadline=deadline,
            pruning=pruning_applies(pair[0]), shared=shared, fit_scale=fit_scale,
            first_trial_seconds=first_trial_seconds)
        chosen = result.best_params
        validation = {} if result.best_score is None else {result.metric: result.best_score}
        expected = result.longest_trial_seconds or first_trial_seconds
        non_iterative = 0.0 if algorithm in ITERATIVE else result.longest_trial_seconds
        tuning = {"trials_cap": trials, "trials_run": result.trials_run,
                  "trials_cut": result.trials_cut, "trials_pruned": result.trials_pruned,
                  "cut_reason": result.cut_reason or None,
                  "seconds": round(result.seconds, 3),
                  "allowance_seconds": None if allowance is None else round(allowance, 3),
                  "longest_trial_seconds": round(result.longest_trial_seconds, 3),
                  "fit_reserved_seconds": round(expected * fit_scale, 3),
                  "longest_step_seconds": round(max(result.longest_step_seconds,
                                                    non_iterative), 3),
                  "validation_users": result.validation_users,
                  "validation_users_total": result.validation_users_total,
                  "study": result.study if shared else None,
                  "workers": sorted(set(result.trials["worker"])) if len(result.trials) else []}
    elif tune:  # nothing to search (most-popular): still report its validation score
        scored = time.perf_counter()
        chosen = spec.resolve_params(base)
        model = fit_algorithm(algorithm, pair[0], chosen, settings.seed, threads())
        validation = {"ndcg@10": evaluate_model(model, pair[0], pair[1], (10,))["ndcg@10"]}
        users = int(np.count_nonzero(np.diff(pair[1].indptr)))
        tuning = {**untuned_record(0, None), "seconds": round(time.perf_counter() - scored, 3),
                  "validation_users": users, "validation_users_total": users}
    else:
        # A plain fit trains once: measuring is eval's job, and a validation pass here
        # would cost a second fit and a scoring of every user (5x the fit at 25M ratings).
        chosen, validation, tuning = spec.resolve_params(base), {}, None
    if tuning is not None and deadline is not None:
        tuning.update(first_trial_estimate_seconds=round(estimate.seconds, 3),
                      estimate_rule=estimate.rule or None,
                      probe_seconds=round(estimate.probe_seconds, 3))
        skip = skip_reason(fit_scale * (tuning.get("longest_trial_seconds") or
                                        estimate.seconds), deadline - time.time(),
                           iterative=algorithm in ITERATIVE)
        if skip:
            before = tuning.get("cut_reason")
            tuning.update(skipped=True, trials_cut=max(tuning["trials_cut"], 1),
                          cut_reason=skip + (f" (the search: {before})" if before else ""))
            tuning["slack_seconds"] = slack_seconds(tuning)
            return {"algorithm": algorithm, "params": chosen, "artifact_path": None,
                    "sha256": None, "snapshot": data.info, "skipped": True,
                    "validation": {f"validation_{k}": v for k, v in validation.items()},
                    "tuned": False, "cross_validation": None, "tuning": tuning,
                    "seconds": round(time.perf_counter() - started, 3)}
    if progress:
        progress("fit", {"algorithm": algorithm, "params": chosen})
    fitting = time.perf_counter()
    stopped: list[int] = []
    iterations = iterations_key(algorithm)
    hook = final_fit_stop(deadline, stopped) if (
        deadline is not None and iterations) else None
    model = fit_algorithm(algorithm, data.matrix("train"), chosen, settings.seed, threads(),
                          on_iteration=hook)
    fit_seconds = time.perf_counter() - fitting
    if stopped:  # only an iterative fit has the hook that fills it
        tuning = tuning or {}
        tuning["final_fit_cut"] = (f"deadline: the final fit stopped after iteration "
                                   f"{stopped[0]} of {chosen[iterations]}")
        chosen = {**chosen, iterations: stopped[0]}
    if tuning is not None:
        tuning["fit_seconds"] = round(fit_seconds, 3)
    arrays = {**model.to_arrays(), "user_ids": data.arrays["user_ids"],
              "item_ids": data.arrays["item_ids"]}
    manifest = {"kind": "model", "algorithm": algorithm, "params": chosen,
                "snapshot_id": data.info["snapshot_id"], "seed": settings.seed,
                "validation": {f"validation_{k}": v for k, v in validation.items()}}
    writing = time.perf_counter()
    ref = write_artifact("models", arrays, manifest)
    if tuning is not None:
        tuning["write_seconds"] = round(time.perf_counter() - writing, 3)
        tuning["slack_seconds"] = slack_seconds(tuning)
    spread = None
    if cv_folds:
        refusal = cross_validation_refusal(cv_folds, fit_seconds, deadline)
        if refusal:
            tuning = {**(tuning or {}), "cross_validation_cut": refusal}
        else:
            spread = cross_validation(data, algorithm, chosen, cv_folds)
    return {"algorithm": algorithm, "params": chosen, "artifact_path": ref.path,
            "sha256": ref.sha256, "snapshot": data.info,
            "validation": manifest["validation"], "tuned": bool(tune and spec.search_space),
            "cross_validation": spread, "tuning": tuning,
            "seconds": round(time.perf_counter() - started, 3)}


def iterations_key(algorithm: str) -> str:
    """The parameter counting the iterations a final fit can stop after: ALS's and BPR's
    ``iterations``, a blend's iterative part's under its prefix ("" for the others)."""
    if algorithm in ITERATIVE:
        return "iterations"
    return next((f"{part}_iterations" for part in BLEND_PARTS.get(algorithm, ())
                 if part in ITERATIVE), "")


def final_fit_stop(deadline: float, stopped: list[int]) -> IterationCallback:
    """Ends an ALS/BPR final fit at the iteration after which one more, at the pace of
    those after the first, would end past ``deadline``; the iterations done go to
    ``stopped`` and the model is that of those iterations."""
    started = time.perf_counter()
    first = [0.0]

    def hook(iteration: int, _current: Any) -> None:
        now = time.perf_counter()
        if iteration == 1:
            first[0] = now - started
        pace = (now - started - first[0]) / (iteration - 1) if iteration > 1 else first[0]
        if time.time() + pace > deadline:
            stopped.append(iteration)
            raise StopFitting

    return hook


def cross_validation_refusal(folds: int, fit_seconds: float, deadline: float | None) -> str:
    """Why cross-validation may not run before ``deadline`` ("" when it may, or with no
    deadline): it fits ``folds`` times on (folds - 1) / folds of train, each expected to
    take that share of the final fit's ``fit_seconds``, and no fold can be interrupted."""
    if deadline is None:
        return ""
    expected, left = folds * fit_seconds * (folds - 1) / folds, deadline - time.time()
    if expected > left:
        return (f"skipped: {folds} folds expected to take {expected:.2f} s, past the "
                f"allowance ({max(left, 0.0):.2f} s left)")
    return ""


def slack_seconds(tuning: dict[str, Any]) -> float:
    """The longest piece of an algorithm's budgeted work no deadline could interrupt or
    estimate beforehand: an iteration, a scoring pass, a whole non-iterative trial, the
    cost probe, the model's write. The stage ends within its budget plus the largest."""
    return max(float(tuning.get(key) or 0.0) for key in (
        "longest_step_seconds", "probe_seconds", "write_seconds"))


def skip_reason(expected_fit: float, left: float, iterative: bool = False) -> str:
    """Why the final fit may not run in the ``left`` seconds of its allowance ("" if it may).
    An iterative fit (ALS, BPR) stops at the deadline with the iterations it has done, so
    it runs while at least half of them fit in what is left; any other fit needs all of it."""
    if left <= 0:
        return "skipped: its allowance was spent before its final fit"
    if iterative and expected_fit / 2 > left:
        return (f"skipped: its final fit, expected to take {expected_fit:.2f} s, would not "
                f"get half of its iterations in its allowance ({left:.2f} s left)")
    if not iterative and expected_fit > left:
        return (f"skipped: its final fit, expected to take {expected_fit:.2f} s, would end "
                f"past its allowance ({left:.2f} s left)")
    return ""


def untuned_record(cap: int, allowance: float | None) -> dict[str, Any]:
    """The tuning record of a search that ran no trial."""
    return {"trials_cap": cap, "trials_run": 0, "trials_cut": 0, "trials_pruned": 0,
            "cut_reason": None, "seconds": 0.0,
            "allowance_seconds": None if allowance is None else round(allowance, 3),
            "longest_trial_seconds": 0.0, "fit_reserved_seconds": 0.0,
            "longest_step_seconds": 0.0,
            "validation_users": 0, "validation_users_total": 0, "study": None, "workers": []}


def cross_validation(data: SnapshotData, algorithm: str, params: dict[str, Any],
                     folds: int) -> dict[str, Any]:
    """Mean and spread of nDCG@10 over per-user folds of the train split (never test)."""
    train = data.matrix("train").tocoo()
    frame = pd.DataFrame({"user_id": train.row, "movie_id": train.col, "rating": train.data})
    result = cross_validate(algorithm, frame, params, folds=folds, seed=get_settings().seed,
                            num_threads=threads())
    return {"metric": result.metric, "mean": result.mean, "std": result.std,
            "folds": list(result.fold_scores)}


def study_name(snapshot: dict[str, Any], algorithm: str, run_id: str) -> str:
    """A shared study is named after the snapshot, the algorithm and the training run."""
    return f"{snapshot['snapshot_id']}.{algorithm}.{run_id}"


def shared_study(snapshot: dict[str, Any], algorithm: str, run_id: str, workers: int,
                 n_trials: int, fixed: dict[str, Any], deadline: float | None,
                 fit_scale: float = 0.0, first_trial_seconds: float = 0.0) -> SharedStudy:
    """The study of one search in Postgres, and the `train.trials` tasks that ask
    ``workers - 1`` other train workers to draw from it. A task that arrives after the
    search is over finds the study full and returns at once, so one worker still works."""
    from shared.celery_app import app

    settings = get_settings()
    name = study_name(snapshot, algorithm, run_id)

    def spread() -> None:
        for helper in range(1, workers):
            app.send_task("train.trials", queue="train", kwargs={
                "snapshot": snapshot, "algorithm": algorithm, "study": name,
                "n_trials": n_trials, "fixed_params": fixed, "deadline": deadline,
                "helper": helper, "fit_scale": fit_scale,
                "first_trial_seconds": first_trial_seconds})

    return SharedStudy(name, study_storage(settings.database_url),
                       lambda: study_lock(settings.database_url, name), spread)


def draw_trials_on_snapshot(snapshot: dict[str, Any], algorithm: str, study: str,
                            n_trials: int, fixed_params: dict[str, Any],
                            deadline: float | None, helper: int, fit_scale: float = 0.0,
                            first_trial_seconds: float = 0.0) -> dict[str, Any]:
    """One worker's share of a search spread over train workers (the task `train.trials`)."""
    settings = get_settings()
    if not shares_studies(settings.database_url):
        raise TrainingError("train.trials needs DATABASE_URL on Postgres, where the study is")
    data = load_snapshot(snapshot)
    pair = (data.matrix("validation_train"), data.matrix("validation_test"))
    objective, _, _ = prepare_objective(
        algorithm, [pair], seed=settings.seed, fixed_params=fixed_params,
        num_threads=threads(), validation_users=settings.tune_validation_users,
        pruning=pruning_applies(pair[0]))
    shared = SharedStudy(study, study_storage(settings.database_url),
                         lambda: study_lock(settings.database_url, study))
    ran = draw_trials(objective, shared, n_trials=n_trials, seed=settings.seed + helper,
                      deadline=deadline, clock=TrialClock(fit_scale, first_trial_seconds))
    return {"study": study, "algorithm": algorithm, "trials_run": ran}


def pruning_applies(fit_matrix: sp.csr_matrix) -> bool:
    """TUNE_PRUNING, where the data is large enough for pruning to save time: on ml-100k
    (56,000 validation interactions) scoring ALS and BPR every few iterations cost more
    than the iterations pruning saved, and the pruned BPR search chose worse."""
    settings = get_settings()
    return settings.tune_pruning and fit_matrix.nnz >= settings.tune_pruning_min_interactions


def tuning_workers() -> int:
    """Train workers a search is spread over: TUNE_WORKERS, or with 0 as many as answer on
    the train queue; 1 (this process alone) without a broker and Postgres."""
    settings = get_settings()
    if not (settings.broker_url and shares_studies(settings.database_url)):
        return 1
    if settings.tune_workers:
        return settings.tune_workers
    from shared.celery_app import ServiceQueue, answering_workers

    return max(answering_workers(ServiceQueue.TRAIN), 1)


def trial_cap(algorithm: str, n_trials: int | None = None) -> int:
    """Trials an algorithm's search may run: ``n_trials``, else its own count (0 when it has
    nothing to search)."""
    spec = ALGORITHMS[algorithm]
    return (n_trials or spec.n_trials or 10) if spec.search_space else 0


def item_cap(name: str, n_items: int) -> int:
    """The most items ``name`` fits densely; a blend, the fewest of its parts'."""
    if name in BLEND_PARTS:
        return min(item_cap(part, n_items) for part in BLEND_PARTS[name])
    return int(default_params(name).get("max_items", n_items))


def part_params(name: str, trained: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """A blend's parameters for the parts trained before it in the same run: the values
    they were tuned to on this snapshot's validation pair (a part not trained keeps its
    defaults). None for an algorithm that is not a blend."""
    if name not in BLEND_PARTS:
        return None
    chosen = {result["algorithm"]: result["params"] for result in trained}
    return {f"{part}_{key}": value for part in BLEND_PARTS[name]
            for key, value in chosen.get(part, {}).items()}


def train_many(snapshot: dict[str, Any], algorithms: Sequence[str] | None = None,
               tune: bool = True, n_trials: int | None = None,
               progress: Progress | None = None, cv_folds: int | None = None,
               tune_budget: float | None = None, run_id: str | None = None
               ) -> list[dict[str, Any]]:
    """Every requested algorithm on one snapshot, loaded once.

    A tuning budget (``tune_budget`` seconds, else TUNE_BUDGET_SECONDS; 0 is unlimited)
    covers the whole stage, final fits included, and is shared in order: each algorithm may
    spend the budget still unspent times its trial cap over the caps of the algorithms
    still to tune, its final fit included, so time one leaves passes to the next. An
    algorithm's first trial is expected to take what services.train.estimates says; an
    algorithm whose final fit cannot end within its share is skipped (its record says why
    and has no artifact; most-popular, with nothing to search, always trains). The stage
    ends within the budget plus the largest ``slack_seconds`` of its records.
    """
    budget = get_settings().tune_budget_seconds if tune_budget is None else tune_budget
    if budget < 0:
        raise TrainingError(f"the tuning budget must be positive seconds, got {budget}")
    names = list(algorithms or DEFAULT_ALGORITHMS)
    unknown = [n for n in names if n not in ALGORITHMS]
    if unknown:
        raise TrainingError(f"unknown algorithm(s) {', '.join(unknown)}; "
                            f"one of {', '.join(ALGORITHMS)}")
    started = time.perf_counter()
    data = load_snapshot(snapshot)
    if algorithms is None:
        # By default, leave out what cannot fit this catalogue (EASE's dense item x item
        # matrices above max_items) and train its sparse form in its place; asked for by
        # name, dense EASE fails with its own message.
        n_items = len(data.arrays["item_ids"])
        names = [n if n_items <= item_cap(n, n_items) else CAPPED_REPLACEMENTS.get(n, "")
                 for n in names]
        names = [n for n in names if n]
    caps = [trial_cap(name, n_trials) if tune else 0 for name in names]
    workers = tuning_workers() if any(caps) else 1
    run_id = run_id or uuid.uuid4().hex
    measured: dict[str, float] = {}  # final fit seconds, for a blend's estimate
    results: list[dict[str, Any]] = []
    for position, name in enumerate(names):
        allowance = None
        if budget and caps[position]:
            left = max(budget - (time.perf_counter() - started), 0.0)
            allowance = left * caps[position] / sum(caps[position:])
        result = fit_on_snapshot(data, name, part_params(name, results), tune=tune,
                                 n_trials=n_trials, progress=progress, cv_folds=cv_folds,
                                 allowance=allowance, workers=workers, run_id=run_id,
                                 measured=measured)
        if result["tuning"] and not result.get("skipped"):
            measured[name] = result["tuning"]["fit_seconds"]
        results.append(result)
    return results
