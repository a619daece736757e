"""Celery tasks of the eval service (queue `eval`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from services.eval.batch import recommend_batch
from services.eval.offline import EvaluationError, evaluate_versions
from services.eval.online import compute_online
from services.eval.policy import release_lock
from services.eval.versions import evaluate_version
from shared.artifacts import ArtifactError, open_store
from shared.celery_app import service_task


@service_task("eval.offline")
def offline(self: Any, registered: list[dict[str, Any]],
            k_values: list[int] | None = None) -> dict[str, Any]:
    """Metrics of registered versions on their snapshot's test split, and the champion's."""
    try:
        return evaluate_versions(registered, k_values)
    except (EvaluationError, ArtifactError) as error:
        raise EvaluationError(str(error)) from None


@service_task("eval.evaluate")
def evaluate(self: Any, model: str = "latest", k_values: list[int] | None = None,
             sample_users: int | None = None) -> dict[str, Any]:
    """One version (number, `latest` or `challenger`) beside the most-popular baseline on its
    snapshot's test split (or a seeded sample of its users); the figures are stored."""
    return evaluate_version(model, k_values, sample_users=sample_users)


@service_task("eval.online")
def online(self: Any, window_seconds: int | None = None) -> dict[str, Any]:
    """The online window ending now: stored, and published as `metrics.online`."""
    return compute_online(window_seconds=window_seconds)


@service_task("eval.release_lock")
def release(self: Any, holder: str) -> dict[str, Any]:
    """The retrain chain's last link and every link's error callback: give the retrain lock
    back, so the next retrain (API, policy or pipeline) may start."""
    return {"holder": holder, "released": release_lock(holder)}


@service_task("eval.recommend_batch")
def batch(self: Any, users: str | list[int] = "all", k: int = 10, model: str = "latest",
          exclude_seen: bool = True, genres: list[str] | None = None,
          output: str | None = None) -> dict[str, Any]:
    """Every asked user's top k written to `output` (by default the artifact store's
    `batches/<task id>.parquet`); a redelivered task resumes from its written chunks."""
    store = key = None
    if output is None:
        store, key = open_store(), f"batches/{self.request.id}.parquet"
        output = str(store.local_file(key))

    def report(done: int, total: int) -> None:
        if not self.request.called_directly and self.request.id:
            self.update_state(state="PROGRESS", meta={"users_done": done, "users": total})

    summary = recommend_batch(users, k, output, model, exclude_seen, genres, progress=report)
    if store is not None and key is not None:
        # An object store's copy is the one every host reaches; a directory's is the file.
        summary["output"] = store.put_file(Path(output), key)
    return summary
