"""Feedback and impressions handed to the ingest service, durably, by task name.

With a broker, `send_task` publishes a persistent message to the durable `ingest` queue
on a channel in confirm mode (the Celery app sets `confirm_publish`), so it returns only
once RabbitMQ has taken responsibility for it; only then does POST /feedback answer 202.
The ingest worker retries while Postgres is down, the message waiting on the queue.
Embedded (no broker), the task runs in this process.
"""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

import amqp.exceptions
import kombu.exceptions
import sqlalchemy.exc

from services.serve.cache import Cache
from services.serve.history import History, event_value, merge
from services.serve.metrics import FEEDBACK
from services.serve.schemas import FeedbackIn
from shared.celery_app import app, run_task
from shared.errors import RecsysError

# Whatever says "not durably handed over": broker refused, nacked, timed out, or (embedded)
# the database failed.
HANDOVER_ERRORS: tuple[type[BaseException], ...] = (
    kombu.exceptions.KombuError, amqp.exceptions.AMQPError, amqp.exceptions.MessageNacked,
    OSError, sqlalchemy.exc.SQLAlchemyError, RecsysError)
# Bounded waits: a request must not hang on a broker that is down.
RETRY_POLICY = {"max_retries": 2, "interval_start": 0.1, "interval_step": 0.4,
                "interval_max": 1.0}
CONFIRM_TIMEOUT = 5.0


class FeedbackUnavailable(RecsysError):
    """The events could not be handed over durably; the client should retry."""


def send_to_ingest(task: str, argument: str, payload: list[dict[str, Any]]) -> None:
    """Hand `payload` to an ingest task: confirmed publish, or run here when embedded."""
    if app.conf.task_always_eager:
        run_task(task, {argument: payload})
        return
    # ignore_result: serve never waits for the result, and the result backend (Redis)
    # must not be a dependency of accepting feedback.
    # argsrepr: Celery would otherwise build a repr of the whole payload for the message
    # headers, costing more CPU than the publish itself.
    app.send_task(task, args=[payload], queue="ingest", ignore_result=True, retry=True,
                  retry_policy=RETRY_POLICY, confirm_timeout=CONFIRM_TIMEOUT,
                  argsrepr=f"[<{len(payload)} {argument}>]")


def task_payload(event: FeedbackIn, now: dt.datetime) -> dict[str, Any]:
    """The event as `ingest.feedback` takes it, with a serve-assigned event id."""
    return {"event_id": uuid.uuid4().hex, "user_id": event.user_id, "movie_id": event.movie_id,
            "type": event.type, "value": event.value,
            "timestamp": (event.timestamp or now).isoformat(), "request_id": event.request_id}


def accept_feedback(events: list[FeedbackIn], cache: Cache, implicit_rating: float
                    ) -> list[str]:
    """Queue the events durably, then drop their users' cached lists; their event ids."""
    now = dt.datetime.now(dt.UTC)
    payload = [task_payload(e, now) for e in events]
    try:
        send_to_ingest("ingest.feedback", "events", payload)
    except HANDOVER_ERRORS as error:
        raise FeedbackUnavailable(f"feedback not accepted, the broker did not confirm it "
                                  f"({error}); nothing was stored, retry") from None
    for event in events:
        FEEDBACK.labels(event.type).inc()
    by_user: dict[int, History] = {}
    for event in events:
        merge(by_user.setdefault(event.user_id, {}), event.movie_id,
              event_value(event.type, event.value, implicit_rating))
    for user_id, items in by_user.items():
        cache.note_feedback(user_id, items)
    return [p["event_id"] for p in payload]
