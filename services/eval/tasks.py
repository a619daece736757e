"""Celery tasks of the eval service (queue `eval`)."""

from __future__ import annotations

from typing import Any

from services.eval.offline import EvaluationError, evaluate_versions
from shared.artifacts import ArtifactError
from shared.celery_app import service_task


@service_task("eval.offline")
def offline(self: Any, registered: list[dict[str, Any]],
            k_values: list[int] | None = None) -> dict[str, Any]:
    """Metrics of registered versions on their snapshot's test split, and the champion's."""
    try:
        return evaluate_versions(registered, k_values)
    except (EvaluationError, ArtifactError) as error:
        raise EvaluationError(str(error)) from None
