"""Celery tasks of the transform service (queue `transform`)."""

from __future__ import annotations

from typing import Any

from services.transform.snapshot import SnapshotError, SnapshotParams, build_snapshot
from shared.celery_app import service_task


@service_task("transform.snapshot")
def snapshot(self: Any, previous: dict[str, Any] | None = None, protocol: str | None = None,
             stratify: str | None = None, **overrides: Any) -> dict[str, Any]:
    """Snapshot the current ratings; in a chain `previous` is the ingest result."""
    try:
        params = SnapshotParams.from_settings(protocol=protocol, stratify=stratify, **overrides)
        return build_snapshot(params, task_id=self.request.id)
    except SnapshotError as error:
        raise SnapshotError(str(error)) from None
