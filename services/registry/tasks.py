"""Celery tasks of the registry service (queue `registry`)."""

from __future__ import annotations

from typing import Any

from services.registry import registry
from shared.celery_app import service_task
from shared.metrics import GATE_METRIC


@service_task("registry.register")
def register(self: Any, trained: list[dict[str, Any]] | dict[str, Any]) -> list[dict[str, Any]]:
    """Register trained models (one or a list); the same fit gives the same version. An
    algorithm the tuning budget skipped has no model to register."""
    items = [t for t in (trained if isinstance(trained, list) else [trained])
             if not t.get("skipped")]
    return [
        registry.register(
            snapshot_id=t["snapshot"]["snapshot_id"], algorithm=t["algorithm"],
            params=t["params"], artifact_path=t["artifact_path"], sha256=t["sha256"],
            metrics=t.get("validation", {}), task_id=t.get("task_id") or self.request.id,
        ) | {"snapshot_artifact": t["snapshot"]}
        for t in items
    ]


@service_task("registry.promote")
def promote(self: Any, version: int, alias: str = "champion", reason: str = "") -> dict[str, Any]:
    """Point an alias at a version and publish `model.promoted`."""
    return registry.promote(version, alias, reason)


@service_task("registry.rollback")
def rollback(self: Any, alias: str = "champion", reason: str = "") -> dict[str, Any]:
    """Move an alias back to the version it held before its last promotion."""
    return registry.rollback(alias, reason)


@service_task("registry.promote_if_better")
def promote_if_better(self: Any, evaluated: dict[str, Any], metric: str = GATE_METRIC
                      ) -> dict[str, Any]:
    """The gate: promote the best new version if it scores at least the champion's figure
    on the same test interactions, which neither was trained on."""
    return registry.promote_if_better(evaluated, metric)
