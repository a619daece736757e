"""Feedback and impressions handed to the ingest service, durably, by task name.

With a broker, `send_task` publishes a persistent message to the durable `ingest` queue
on a channel in confirm mode (the Celery app sets `confirm_publish`), so it returns only
once RabbitMQ has taken responsibility for it. The ingest worker retries while Postgres is
down, the message waiting on the queue. Embedded (no broker), the task runs in this process.

Feedback is group-committed: a thread per process publishes, and every request that
arrives while it waits for a confirm joins the next message. Each request answers only
after the events of its group are durable (and its users' cached lists are dropped), but
concurrent requests share one publish, one confirm, one cache round trip and, downstream,
one ingest task and one database commit.

Durable means confirmed by RabbitMQ, or, when RabbitMQ does not connect or confirm within
FEEDBACK_CONFIRM_SECONDS, kept in the replica's outbox (services/serve/outbox.py, fsync'd);
from then on groups go to the outbox until a drainer thread has shipped it (or found the
broker answering again). Every event carries its id into Postgres, where the ingest
service stores each id once: a publish whose confirm never came, a row shipped again
after a crash, or a client's retry of the same events all end as one stored event.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import queue
import sqlite3
import threading
import uuid
from concurrent.futures import Future
from typing import Any

import amqp.exceptions
import kombu
import kombu.exceptions
import sqlalchemy.exc
from starlette.concurrency import run_in_threadpool

from services.serve.cache import Cache
from services.serve.metrics import FEEDBACK, FEEDBACK_OUTBOX
from services.serve.outbox import Events, FeedbackOutbox
from services.serve.schemas import FeedbackIn
from shared.celery_app import app, run_task
from shared.errors import RecsysError
from shared.history import History, event_value, merge

log = logging.getLogger(__name__)

# Whatever says "not durably handed over": broker refused, nacked, timed out, or (embedded)
# the database failed.
HANDOVER_ERRORS: tuple[type[BaseException], ...] = (
    kombu.exceptions.KombuError, amqp.exceptions.AMQPError, amqp.exceptions.MessageNacked,
    OSError, sqlalchemy.exc.SQLAlchemyError, RecsysError)
# Bounded waits: a request must not hang on a broker that is down.
RETRY_POLICY = {"max_retries": 2, "interval_start": 0.1, "interval_step": 0.4,
                "interval_max": 1.0}
# Feedback's own connections: one immediate reconnect (a pooled connection the broker
# closed), then the outbox takes the events.
FEEDBACK_RETRY_POLICY = {"max_retries": 1, "interval_start": 0, "interval_step": 0,
                         "interval_max": 0}
CONFIRM_TIMEOUT = 5.0
# A request waits this long for its group; the publish itself is bounded by
# FEEDBACK_CONFIRM_SECONDS, so this only guards against a stuck publisher.
ACCEPT_TIMEOUT = 60.0
MAX_EVENTS_PER_MESSAGE = 2000
DRAIN_INTERVAL = 0.5  # seconds between a drainer's looks at an empty outbox
DRAIN_BACKOFF_MAX = 5.0  # longest wait between shipments the broker refused
# Ids derived from an Idempotency-Key: the same key and position give the same id.
IDEMPOTENCY_NAMESPACE = uuid.UUID("5b0c8f0e-4a52-4c44-9d7e-3f2a1c6e9b10")


class FeedbackUnavailable(RecsysError):
    """The events could not be made durable; a retry with the same event ids is safe."""

    def __init__(self, message: str, event_ids: list[str] | None = None) -> None:
        super().__init__(message)
        self.event_ids = event_ids or []


def send_to_ingest(task: str, argument: str, payload: list[dict[str, Any]],
                   connection: kombu.Connection | None = None,
                   confirm_timeout: float = CONFIRM_TIMEOUT) -> None:
    """Hand `payload` to an ingest task: confirmed publish (on `connection` when given, else
    a pooled one), or run here when embedded."""
    if app.conf.task_always_eager:
        run_task(task, {argument: payload})
        return
    # ignore_result: serve never waits for the result, and the result backend (Redis)
    # must not be a dependency of accepting feedback.
    # argsrepr: Celery would otherwise build a repr of the whole payload for the message
    # headers, costing more CPU than the publish itself.
    app.send_task(task, args=[payload], queue="ingest", ignore_result=True, retry=True,
                  retry_policy=RETRY_POLICY if connection is None else FEEDBACK_RETRY_POLICY,
                  confirm_timeout=confirm_timeout, connection=connection,
                  argsrepr=f"[<{len(payload)} {argument}>]")


def feedback_connection(timeout: float) -> kombu.Connection:
    """A broker connection whose connect (and handshake) gives up after `timeout`, once."""
    return app.connection_for_write(connect_timeout=timeout,
                                    transport_options={"max_retries": 0})


def event_ids(events: list[FeedbackIn], idempotency_key: str | None) -> list[str]:
    """Each event's id: its own, else one derived from the request's Idempotency-Key and
    its position, else a new one. Refuses an id given twice in one request."""
    ids = [e.event_id or (uuid.uuid5(IDEMPOTENCY_NAMESPACE, f"{idempotency_key}/{i}").hex
                          if idempotency_key else uuid.uuid4().hex)
           for i, e in enumerate(events)]
    seen: set[str] = set()
    for event_id in ids:
        if event_id in seen:
            raise ValueError(f"event_id {event_id!r} appears more than once in the request")
        seen.add(event_id)
    return ids


def task_payload(event: FeedbackIn, now: dt.datetime, event_id: str | None = None
                 ) -> dict[str, Any]:
    """The event as `ingest.feedback` takes it, with its event id."""
    return {"event_id": event_id or event.event_id or uuid.uuid4().hex,
            "user_id": event.user_id, "movie_id": event.movie_id,
            "type": event.type, "value": event.value,
            "timestamp": (event.timestamp or now).isoformat(), "request_id": event.request_id}


def cache_updates(payload: list[dict[str, Any]], implicit_rating: float
                  ) -> dict[int, History]:
    """What each user's cached state learns from these events, later events winning."""
    by_user: dict[int, History] = {}
    for event in payload:
        merge(by_user.setdefault(event["user_id"], {}), event["movie_id"],
              event_value(event["type"], event["value"], implicit_rating))
    return by_user


def _ids(payload: Events) -> list[str]:
    return [event["event_id"] for event in payload]


class FeedbackPublisher:
    """Group commit of feedback: requests queue their events; a publisher thread takes all
    that wait, publishes them as one confirmed `ingest.feedback` message (or keeps them in
    the outbox while the broker is down), drops the users' cached lists, then releases
    those requests (or fails them with FeedbackUnavailable).

    One thread per process: measured under load here (2 cores shared with the broker,
    Redis, Postgres and the ingest worker), a second one only split the batches in two
    and added contention for the interpreter, serving 15-25% fewer requests. A second
    thread drains the outbox."""

    def __init__(self, cache: Cache, implicit_rating: float,
                 max_events: int = MAX_EVENTS_PER_MESSAGE,
                 outbox: FeedbackOutbox | None = None, confirm_seconds: float = 1.0) -> None:
        self.cache = cache
        self.implicit_rating = implicit_rating
        self.max_events = max_events
        self.outbox = outbox
        self.confirm_seconds = confirm_seconds
        # Set while the broker is taken to be down: groups go straight to the outbox.
        self.broker_down = threading.Event()
        self._queue: queue.SimpleQueue[tuple[list[dict[str, Any]], Future[None]] | None] = (
            queue.SimpleQueue())
        self._thread: threading.Thread | None = None
        self._drainer: threading.Thread | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._connection: kombu.Connection | None = None  # the publisher thread's

    def start(self) -> None:
        with self._lock:
            if self._thread is None and not app.conf.task_always_eager:
                self._stopping.clear()
                self._thread = threading.Thread(target=self._run, name="serve-feedback",
                                                daemon=True)
                self._thread.start()
                if self.outbox is not None:
                    self._drainer = threading.Thread(target=self._drain, daemon=True,
                                                     name="serve-feedback-outbox")
                    self._drainer.start()

    def close(self, timeout: float = 30.0) -> None:
        """Make what is queued durable, then stop the threads (the outbox keeps the rest
        for the next start)."""
        with self._lock:
            thread, self._thread = self._thread, None
            drainer, self._drainer = self._drainer, None
        if thread is not None:
            self._queue.put(None)
            thread.join(timeout)
        self._stopping.set()
        if drainer is not None:
            drainer.join(timeout)

    async def submit(self, payload: list[dict[str, Any]]) -> None:
        """Return once the events are durable (confirmed by the broker or in the outbox);
        FeedbackUnavailable when neither. The request waits on the event loop, holding no
        thread, while the publisher thread commits its group."""
        if self._thread is None:  # embedded, or not started: a worker thread does the work
            await run_in_threadpool(self._commit, payload)
            return
        done: Future[None] = Future()
        self._queue.put((payload, done))
        try:
            await asyncio.wait_for(asyncio.wrap_future(done), ACCEPT_TIMEOUT)
        except TimeoutError:
            raise FeedbackUnavailable(
                f"feedback not confirmed within {ACCEPT_TIMEOUT:.0f} s; it may have been "
                "stored: retrying with the same event ids is safe", _ids(payload)) from None

    def _publish(self, payload: Events) -> None:
        """One confirmed message on this thread's connection (a new one after a failure)."""
        if self._connection is None:
            self._connection = feedback_connection(self.confirm_seconds)
        try:
            send_to_ingest("ingest.feedback", "events", payload, self._connection,
                           self.confirm_seconds)
        except BaseException:
            self._connection.collect()  # drop it without talking to a broker that is gone
            self._connection = None
            raise

    def _commit(self, payload: Events) -> None:
        if app.conf.task_always_eager or self.outbox is None:
            try:
                send_to_ingest("ingest.feedback", "events", payload)
            except HANDOVER_ERRORS as error:
                raise FeedbackUnavailable(
                    f"feedback not accepted ({error}); it may have been stored: retrying "
                    "with the same event ids is safe", _ids(payload)) from None
        else:
            self._publish_or_keep(payload)
        self.cache.note_feedback(cache_updates(payload, self.implicit_rating))

    def _publish_or_keep(self, payload: Events) -> None:
        """Confirmed by the broker, else in the outbox; FeedbackUnavailable when neither."""
        assert self.outbox is not None
        failure: BaseException | None = None
        if not self.broker_down.is_set():
            try:
                self._publish(payload)
                return
            except HANDOVER_ERRORS as error:
                failure = error
                if not self.broker_down.is_set():
                    log.warning("RabbitMQ did not confirm feedback (%s); keeping it in the "
                                "outbox %s until the broker answers", error, self.outbox.path)
                self.broker_down.set()
        try:
            self.outbox.add(payload)
        except (sqlite3.Error, OSError) as error:
            raise FeedbackUnavailable(
                f"feedback not accepted: the broker did not confirm it ({failure or 'down'}) "
                f"and the outbox failed ({error}); it may have been stored: retrying with "
                "the same event ids is safe", _ids(payload)) from None
        FEEDBACK_OUTBOX.labels("kept").inc(len(payload))

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                if self._connection is not None:
                    self._connection.collect()  # never blocks on a broker that is gone
                    self._connection = None
                if self.outbox is not None:
                    self.outbox.close()
                return
            batch, events = [], 0
            while True:
                # A request whose client went away before its group formed is dropped
                # (it was never accepted); once taken, its events go out with the group.
                if item[1].set_running_or_notify_cancel():
                    batch.append(item)
                    events += len(item[0])
                if events >= self.max_events:
                    break
                try:  # everything that queued meanwhile joins
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    self._queue.put(None)  # stop once this batch is out
                    break
            if not batch:
                continue
            try:
                self._commit([event for payload, _ in batch for event in payload])
            except Exception as error:  # every waiter learns it; the thread carries on
                for payload, done in batch:
                    if isinstance(error, FeedbackUnavailable):
                        failed = FeedbackUnavailable(str(error), _ids(payload))
                    else:
                        log.exception("feedback publish failed")
                        failed = FeedbackUnavailable(
                            f"feedback not accepted ({error}); it may have been stored: "
                            "retrying with the same event ids is safe", _ids(payload))
                    done.set_exception(failed)
            else:
                for _, done in batch:
                    done.set_result(None)

    def _drain(self) -> None:
        """Ship the outbox with confirms, deleting rows only once confirmed; while it is
        empty and the broker is taken to be down, check whether the broker answers."""
        assert self.outbox is not None
        connection: kombu.Connection | None = None
        backoff = DRAIN_INTERVAL
        while not self._stopping.is_set():
            try:
                claimed = self.outbox.claim(self.max_events)
            except sqlite3.Error as error:
                log.warning("feedback outbox %s unreadable (%s)", self.outbox.path, error)
                self._stopping.wait(DRAIN_BACKOFF_MAX)
                continue
            if not claimed:
                if self.broker_down.is_set() and self._broker_answers():
                    self.broker_down.clear()
                self._stopping.wait(DRAIN_INTERVAL)
                continue
            ids = [row_id for row_id, _ in claimed]
            events = [event for _, payload in claimed for event in payload]
            try:
                if connection is None:
                    connection = feedback_connection(self.confirm_seconds)
                send_to_ingest("ingest.feedback", "events", events, connection,
                               self.confirm_seconds)
            except HANDOVER_ERRORS as error:
                if connection is not None:
                    connection.collect()
                connection = None
                self.outbox.release(ids)
                self.broker_down.set()
                log.info("feedback outbox: %d events wait for the broker (%s)",
                         len(events), error)
                self._stopping.wait(backoff)
                backoff = min(backoff * 2, DRAIN_BACKOFF_MAX)
                continue
            self.outbox.remove(ids)  # after the confirm: a crash before this ships again
            FEEDBACK_OUTBOX.labels("shipped").inc(len(events))
            backoff = DRAIN_INTERVAL
            self.broker_down.clear()
        if connection is not None:
            connection.collect()
        self.outbox.close()

    def _broker_answers(self) -> bool:
        try:
            with feedback_connection(self.confirm_seconds) as connection:
                connection.ensure_connection(max_retries=0, timeout=self.confirm_seconds)
        except HANDOVER_ERRORS:
            return False
        return True


async def accept_feedback(events: list[FeedbackIn], publisher: FeedbackPublisher,
                          idempotency_key: str | None = None) -> list[str]:
    """Make the events durable (their users' cached lists dropped); their event ids."""
    now = dt.datetime.now(dt.UTC)
    payload = [task_payload(e, now, event_id)
               for e, event_id in zip(events, event_ids(events, idempotency_key), strict=True)]
    await publisher.submit(payload)
    for event in events:
        FEEDBACK.labels(event.type).inc()
    return [p["event_id"] for p in payload]
