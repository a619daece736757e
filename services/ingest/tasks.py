"""Celery tasks of the ingest service (queue `ingest`)."""

from __future__ import annotations

from typing import Any

from services.ingest.errors import IngestError
from services.ingest.feedback import store_feedback, store_impressions
from services.ingest.ingest import ingest_source
from shared.celery_app import service_task
from shared.settings import get_settings


@service_task("ingest.load")
def load(
    self: Any, source: str | None = None, dataset: str | None = None, lenient: bool = False
) -> dict[str, Any]:
    """Ingest a MovieLens source (DATA_SOURCE when none is given); idempotent by content."""
    try:
        result = ingest_source(source or get_settings().data_source, dataset, lenient)
    except IngestError as error:
        # Plain message: the caller's side rebuilds the exception from JSON.
        raise IngestError(str(error)) from None
    return result.to_dict()


# Accepted feedback must never be dropped: retry for as long as the database is down,
# the message staying unacknowledged on the queue meanwhile (acks late).
@service_task("ingest.feedback", max_retries=None, retry_backoff_max=30)
def feedback(self: Any, events: list[dict[str, Any]]) -> dict[str, Any]:
    """Persist feedback events accepted by serve (idempotent by event id)."""
    return store_feedback(events)


@service_task("ingest.impressions", max_retries=None, retry_backoff_max=30)
def impressions(self: Any, lists: list[dict[str, Any]]) -> dict[str, Any]:
    """Persist served recommendation lists, one row per item and position."""
    return store_impressions(lists)
