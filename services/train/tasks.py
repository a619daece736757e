"""Celery tasks of the train service (queue `train`)."""

from __future__ import annotations

from typing import Any

from services.train.training import (
    TrainingError,
    draw_trials_on_snapshot,
    fit_on_snapshot,
    load_snapshot,
    train_many,
)
from shared.artifacts import ArtifactError
from shared.celery_app import service_task
from shared.progress import report


def _progress(task: Any) -> Any:
    """Task state PROGRESS with the current trial (visible in Flower and to callers), and the
    same report to listeners in this process (the CLI's progress line in embedded mode)."""

    def publish(stage: str, meta: dict[str, Any]) -> None:
        if not task.request.is_eager:
            task.update_state(state="PROGRESS", meta={"stage": stage, **meta})
        report(stage, meta)

    return publish


@service_task("train.fit")
def fit(self: Any, snapshot: dict[str, Any], algorithm: str = "als",
        params: dict[str, Any] | None = None) -> dict[str, Any]:
    """Fit one algorithm on a snapshot's train split with given or default parameters."""
    try:
        result = fit_on_snapshot(load_snapshot(snapshot), algorithm, params,
                                 progress=_progress(self))
    except (TrainingError, ArtifactError, ValueError) as error:  # ValueError: bad params
        raise TrainingError(str(error)) from None
    return {**result, "task_id": self.request.id}


@service_task("train.tune")
def tune(self: Any, snapshot: dict[str, Any], algorithms: list[str] | None = None,
         n_trials: int | None = None, cv_folds: int | None = None,
         tune_budget: float | None = None) -> list[dict[str, Any]]:
    """Tune every algorithm on the snapshot's validation pair (within ``tune_budget``
    seconds when given), then fit each on train."""
    try:
        results = train_many(snapshot, algorithms, tune=True, n_trials=n_trials,
                             progress=_progress(self), cv_folds=cv_folds,
                             tune_budget=tune_budget, run_id=self.request.id)
    except (TrainingError, ArtifactError, ValueError) as error:  # ValueError: bad params
        raise TrainingError(str(error)) from None
    return [{**r, "task_id": self.request.id} for r in results]


@service_task("train.trials")
def trials(self: Any, snapshot: dict[str, Any], algorithm: str, study: str, n_trials: int,
           fixed_params: dict[str, Any], deadline: float | None = None,
           helper: int = 1, fit_scale: float = 0.0,
           first_trial_seconds: float = 0.0) -> dict[str, Any]:
    """Draw trials of a search another train worker started, until its study is full or
    the next trial is expected to end, with the final fit, past ``deadline``."""
    try:
        result = draw_trials_on_snapshot(snapshot, algorithm, study, n_trials, fixed_params,
                                         deadline, helper, fit_scale, first_trial_seconds)
    except (TrainingError, ArtifactError, ValueError) as error:
        raise TrainingError(str(error)) from None
    return {**result, "task_id": self.request.id}
