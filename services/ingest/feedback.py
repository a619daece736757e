"""Persisting what serve accepted: feedback events and served impressions.

Both arrive as Celery tasks on the `ingest` queue, sent by serve with publisher confirms
(feedback also from serve's outbox, after a broker outage). Inserts skip rows already
stored (feedback by `event_id`, which the client may choose; impressions by request and
position), so a redelivered task, an event shipped twice or a client's retry stores
nothing twice; while Postgres is down the task retries and its message stays on the
queue, so an accepted event is never dropped.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from pydantic import BaseModel, Field, ValidationError, field_validator
from sqlalchemy import Engine
from sqlalchemy.dialects import postgresql, sqlite

from services.ingest.errors import IngestError
from shared.db import Feedback, Impression, get_engine
from shared.events import get_event_bus

FEEDBACK_TYPES = ("rating", "click", "view", "watch")


class FeedbackEvent(BaseModel):
    event_id: str = Field(min_length=1, max_length=64)
    user_id: int = Field(gt=0)
    movie_id: int = Field(gt=0)
    type: str
    value: float | None = None
    timestamp: dt.datetime
    request_id: str | None = Field(default=None, max_length=64)


class ImpressionList(BaseModel):
    request_id: str = Field(min_length=1, max_length=64)
    user_id: int
    items: list[int]  # or the comma-separated ids, as serve sends them
    model_version: int | None = None
    variant: str = "champion"
    source: str = "model"
    served_at: dt.datetime  # ISO 8601, or a Unix timestamp

    @field_validator("items", mode="before")
    @classmethod
    def _split_ids(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [int(i) for i in value.split(",") if i.strip()]
        return value


def _insert_ignoring_repeats(engine: Engine, table: Any, rows: list[dict[str, Any]]) -> int:
    if not rows:
        return 0
    dialect = postgresql if engine.dialect.name == "postgresql" else sqlite
    with engine.begin() as conn:
        result = conn.execute(dialect.insert(table).on_conflict_do_nothing(), rows)
    return max(result.rowcount, 0)


def store_feedback(events: list[dict[str, Any]], engine: Engine | None = None) -> dict[str, Any]:
    """Store feedback events once each; announce them as `feedback.received`."""
    try:
        parsed = [FeedbackEvent.model_validate(e) for e in events]
    except ValidationError as error:
        raise IngestError(f"feedback batch rejected: {error}") from None
    bad = [e.type for e in parsed if e.type not in FEEDBACK_TYPES]
    if bad:
        raise IngestError(f"feedback type {bad[0]!r} is not one of {', '.join(FEEDBACK_TYPES)}")
    rows = [{"event_id": e.event_id, "user_id": e.user_id, "movie_id": e.movie_id,
             "type": e.type, "value": e.value, "request_id": e.request_id,
             "occurred_at": e.timestamp} for e in parsed]
    stored = _insert_ignoring_repeats(engine or get_engine(), Feedback.__table__, rows)
    summary = {"received": len(rows), "stored": stored,
               "users": sorted({e.user_id for e in parsed})}
    if stored:
        get_event_bus().publish("feedback.received", summary)
    return summary


def store_impressions(lists: list[dict[str, Any]], engine: Engine | None = None
                      ) -> dict[str, Any]:
    """Store served lists as one row per (request, position)."""
    try:
        parsed = [ImpressionList.model_validate(item) for item in lists]
    except ValidationError as error:
        raise IngestError(f"impression batch rejected: {error}") from None
    rows = [{"request_id": p.request_id, "user_id": p.user_id, "movie_id": movie_id,
             "position": position, "model_version": p.model_version, "variant": p.variant,
             "source": p.source, "served_at": p.served_at}
            for p in parsed for position, movie_id in enumerate(p.items, start=1)]
    stored = _insert_ignoring_repeats(engine or get_engine(), Impression.__table__, rows)
    return {"lists": len(parsed), "rows": len(rows), "stored": stored}
