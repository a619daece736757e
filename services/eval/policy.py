"""The retrain policy: listens to `metrics.online` and `feedback.received`, decides, acts.

Rules: enough new feedback since the champion's snapshot, or the champion's online CTR
below its own baseline by RETRAIN_CTR_MARGIN for RETRAIN_LOW_WINDOWS windows in a row.
Firing takes the one retrain lock (shared/retrain.py, also taken by `POST /retrain` and
`recsys pipeline`), so one retrain runs at a time however many events fire; the chain
gives it back when it ends. Every decision that fires, or is held back by the lock, is
recorded with its reason; held-back ones add to one row per rule and running retrain.
With ROLLBACK_AUTO, a new champion whose CTR falls below the previous champion's by
ROLLBACK_CTR_MARGIN is rolled back. As a consumer (`recsys policy`) it handles each event
once and reconnects with backoff when RabbitMQ or Postgres drops.
"""

from __future__ import annotations

import contextvars
import datetime as dt
import logging
import os
import random
import time
from typing import Any

import pika.exceptions
from celery import chain
from sqlalchemy import delete, func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from shared import retrain
from shared.celery_app import TRANSIENT_ERRORS, app, queue_of
from shared.db import (
    AliasChange,
    Feedback,
    ModelAlias,
    ModelVersion,
    OnlineMetric,
    RetrainDecision,
    Snapshot,
    TaskKey,
    session_scope,
)
from shared.events import Event
from shared.retrain import RetrainRunning, lock_retrain, run_retrain_here, send_retrain
from shared.settings import get_settings

log = logging.getLogger(__name__)
LOCK = retrain.LOCK
MODEL_NAME = "recsys"
RETRAIN_STAGES = ("transform.snapshot", "train.tune", "registry.register", "eval.offline",
                  "registry.promote_if_better")
PATTERNS = ("metrics.online", "feedback.received")
# Handled events are remembered (as idempotency keys) so a redelivered one is not counted
# twice; a redelivery comes within minutes of the first delivery, a day is ample.
EVENT_KEY = "policy.event"
EVENT_KEY_DAYS = 1
# What a lost connection raises: the consumer reconnects on these and on nothing else.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    pika.exceptions.AMQPError, OSError, *TRANSIENT_ERRORS)

_handling: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "policy_event", default=None)
_pruned_at = 0.0


class AlreadyHandled(Exception):
    """The event was handled before (a redelivery): nothing more is written for it."""


def acquire_lock(holder: str, seconds: int, name: str = LOCK) -> bool:
    """Take the lock if it is free or expired; False when someone else holds it."""
    return retrain.acquire_lock(holder, seconds, name)


def release_lock(holder: str, name: str = LOCK) -> bool:
    return retrain.release_lock(holder, name)


def _insert(session: Session) -> Any:
    return postgresql.insert if session.get_bind().dialect.name == "postgresql" \
        else sqlite.insert


def _claim(session: Session, strict: bool = True) -> None:
    """Mark the event being handled as handled, in `session`'s transaction.

    strict: raise AlreadyHandled when another delivery of it got there first."""
    event_id = _handling.get()
    if event_id is None:
        return
    inserted = session.execute(_insert(session)(TaskKey).values(
        key=f"{EVENT_KEY}:{event_id}", task_name=EVENT_KEY, result={})
        .on_conflict_do_nothing(index_elements=["key"])).rowcount
    if strict and not inserted:
        raise AlreadyHandled(event_id)


def _write(session: Session, rule: str, fired: bool, action: str, reason: str,
           task_id: str | None, held_by: str | None, details: dict[str, Any]
           ) -> dict[str, Any]:
    """One decision row; a held-back one adds to its rule's row for the running retrain."""
    now = dt.datetime.now(dt.UTC)
    values = {"rule": rule, "fired": fired, "action": action, "reason": reason,
              "task_id": task_id, "details": details, "held_by": held_by,
              "created_at": now, "last_at": now, "count": 1}
    statement = _insert(session)(RetrainDecision).values(**values)
    if held_by is not None:
        statement = statement.on_conflict_do_update(
            index_elements=["rule", "action", "held_by"],
            index_where=RetrainDecision.held_by.is_not(None),
            set_={"count": RetrainDecision.count + 1, "last_at": now, "reason": reason,
                  "details": details})
    decision_id, count = session.execute(statement.returning(
        RetrainDecision.id, RetrainDecision.count)).one()
    _claim(session)
    return {"id": decision_id, "rule": rule, "fired": fired, "action": action,
            "reason": reason, "task_id": task_id, "count": count, **details}


def _record(rule: str, fired: bool, action: str, reason: str, task_id: str | None = None,
            held_by: str | None = None, **details: Any) -> dict[str, Any]:
    with session_scope() as session:
        decision = _write(session, rule, fired, action, reason, task_id, held_by, details)
    if fired or decision["count"] == 1:
        log.info("policy %s: %s (%s)", rule, action if fired else "held back", reason)
    return decision


def retrain_chain(protocol: str | None = None) -> Any:
    """transform -> train -> register -> eval -> promote-if-better, across the queues."""
    settings = get_settings()
    options = {
        "transform.snapshot": {"protocol": protocol},
        "train.tune": {"algorithms": [a.strip() for a in settings.retrain_algorithms.split(",")
                                      if a.strip()] or None,
                       "n_trials": settings.retrain_trials or None},
    }
    return chain(*[app.signature(name, queue=queue_of(name), kwargs=options.get(name, {}))
                   for name in RETRAIN_STAGES])


def enqueue_retrain(holder: str, protocol: str | None = None) -> str:
    """The retrain chain for a lock `holder` already took; its last link releases it."""
    if app.conf.task_always_eager:
        try:
            return str(retrain_chain(protocol).apply().id)
        finally:
            release_lock(holder)
    return str(retrain.releasing(retrain_chain(protocol), holder).apply_async().id)


def fire(rule: str, reason: str, **details: Any) -> dict[str, Any]:
    """Start a retrain under the lock, or record that one already running held it back."""
    decision: dict[str, Any] = {}

    def record(session: Session, holder: str, task_id: str | None) -> None:
        decision.update(_write(session, rule, True, "retrain", reason, task_id, None,
                               {"holder": holder, **details}))

    try:
        locked = lock_retrain(retrain_chain(), rule, record)
    except RetrainRunning as refused:
        running = refused.running
        return _record(rule, False, "retrain", f"{reason}; a retrain is already running "
                       f"(lock held by {running.holder} until {running.expires_at:%H:%M:%S}, "
                       f"task {running.task_id or 'in-process'})", held_by=running.holder,
                       **details)
    log.info("policy %s: retrain (%s)", rule, reason)
    if app.conf.task_always_eager:
        task_id = str(run_retrain_here(locked).id)
        with session_scope() as session:
            session.execute(update(RetrainDecision).where(RetrainDecision.id == decision["id"])
                            .values(task_id=task_id))
        return {**decision, "task_id": task_id}
    try:
        send_retrain(locked)
    except BaseException as error:
        _unfire(decision["id"], error)
        raise
    return decision


def _unfire(decision_id: int, error: BaseException) -> None:
    """The chain could not be queued: the decision says so and the event is handled again
    on redelivery (the lock was given back already)."""
    with session_scope() as session:
        row = session.get(RetrainDecision, decision_id)
        if row is not None:
            row.fired = False
            row.reason = (f"{row.reason}; the retrain chain could not be queued "
                          f"({type(error).__name__}: {error})")
        event_id = _handling.get()
        if event_id is not None:
            session.execute(delete(TaskKey).where(TaskKey.key == f"{EVENT_KEY}:{event_id}"))


def _last_fired(rule: str) -> dt.datetime | None:
    """When `rule` last started a retrain: evidence before that has been acted on."""
    with session_scope() as session:
        return session.scalar(select(func.max(RetrainDecision.created_at)).where(
            RetrainDecision.rule == rule, RetrainDecision.fired.is_(True)))


def _later(*moments: dt.datetime | None) -> dt.datetime | None:
    known = [m if m.tzinfo else m.replace(tzinfo=dt.UTC) for m in moments if m is not None]
    return max(known) if known else None


def _champion() -> tuple[int, dt.datetime] | None:
    """The champion's version and when it became champion."""
    with session_scope() as session:
        alias = session.get(ModelAlias, (MODEL_NAME, "champion"))
        if alias is None:
            return None
        since = session.scalar(select(func.max(AliasChange.created_at)).where(
            AliasChange.name == MODEL_NAME, AliasChange.alias == "champion",
            AliasChange.to_version == alias.version))
        return alias.version, since or alias.updated_at


def new_feedback_rule() -> dict[str, Any] | None:
    """Fire when enough feedback arrived since the champion's snapshot was taken."""
    settings = get_settings()
    with session_scope() as session:
        alias = session.get(ModelAlias, (MODEL_NAME, "champion"))
        if alias is None:
            return None
        snapshot_at = session.scalar(
            select(Snapshot.created_at).join(ModelVersion, ModelVersion.snapshot_id == Snapshot.id)
            .where(ModelVersion.name == MODEL_NAME, ModelVersion.version == alias.version))
        since = _later(snapshot_at, _last_fired("new_feedback"))
        count = session.scalar(select(func.count()).select_from(Feedback).where(
            Feedback.received_at > since)) or 0
    if count < settings.retrain_min_feedback:
        return None
    return fire("new_feedback", f"{count} feedback events since the champion's snapshot or "
                "the last retrain "
                f"(threshold {settings.retrain_min_feedback})", new_feedback=count)


def _ctr_by_window(version: int, since: dt.datetime | None = None,
                   before: dt.datetime | None = None) -> list[float]:
    with session_scope() as session:
        query = select(OnlineMetric.ctr).where(OnlineMetric.model_version == version,
                                               OnlineMetric.variant == "champion",
                                               OnlineMetric.impressions > 0)
        if since is not None:
            query = query.where(OnlineMetric.window_end > since)
        if before is not None:
            query = query.where(OnlineMetric.window_end <= before)
        return list(session.scalars(query.order_by(OnlineMetric.window_end)))


def ctr_drop_rule() -> dict[str, Any] | None:
    """Fire when the champion's CTR stays below its baseline (its first windows) too long."""
    settings = get_settings()
    champion = _champion()
    if champion is None:
        return None
    version, since = champion
    ctrs = _ctr_by_window(version, _later(since, _last_fired("ctr_drop")))
    n = settings.retrain_low_windows
    if len(ctrs) < 2 * n:
        return None  # the baseline and the recent run must not overlap
    baseline = sum(ctrs[:n]) / n
    recent = ctrs[-n:]
    bar = baseline * (1 - settings.retrain_ctr_margin)
    if not all(c < bar for c in recent):
        return None
    return fire("ctr_drop", f"champion v{version} CTR {recent[-1]:.4f} below {bar:.4f} "
                f"(baseline {baseline:.4f} less {settings.retrain_ctr_margin:.0%}) for {n} "
                "windows", baseline=baseline, recent=recent)


def rollback_rule() -> dict[str, Any] | None:
    """With ROLLBACK_AUTO: a new champion doing worse online than the one it replaced."""
    settings = get_settings()
    champion = _champion()
    if not settings.rollback_auto or champion is None:
        return None
    version, since = champion
    with session_scope() as session:
        previous = session.scalar(
            select(AliasChange.from_version).where(
                AliasChange.name == MODEL_NAME, AliasChange.alias == "champion",
                AliasChange.to_version == version, AliasChange.action == "promote")
            .order_by(AliasChange.id.desc()))
    if previous is None:
        return None
    n = settings.retrain_low_windows
    before, after = _ctr_by_window(previous, before=since), _ctr_by_window(version, since)
    if len(before) < n or len(after) < n:
        return None
    old, new = sum(before[-n:]) / n, sum(after[-n:]) / n
    if new >= old * (1 - settings.rollback_ctr_margin):
        return None
    reason = (f"champion v{version} CTR {new:.4f} below previous v{previous} {old:.4f} by more "
              f"than {settings.rollback_ctr_margin:.0%}")
    result = app.send_task("registry.rollback", kwargs={"alias": "champion", "reason": reason},
                           queue="registry") if not app.conf.task_always_eager else \
        app.tasks["registry.rollback"].apply(kwargs={"alias": "champion", "reason": reason})
    return _record("rollback", True, "rollback", reason, task_id=str(result.id),
                   version=version, previous=previous)


def ab_rule() -> dict[str, Any] | None:
    """With AB_AUTO_PROMOTE: promote a challenger that won the A/B test on CTR."""
    from services.eval.ab import ab_status, promote_winner

    if not get_settings().ab_auto_promote:
        return None
    status = ab_status()
    moved = promote_winner(status)
    if moved is None:
        return None
    return _record("ab_winner", True, "promote", moved.get("reason", "challenger won"),
                   version=moved["version"], previous=moved["previous"],
                   p_value=status["p_value"])


def _handled_before(event_id: str) -> bool:
    with session_scope() as session:
        return session.get(TaskKey, f"{EVENT_KEY}:{event_id}") is not None


def _prune_event_keys() -> None:
    """Forget handled events older than EVENT_KEY_DAYS, at most once an hour per process."""
    global _pruned_at
    if time.monotonic() - _pruned_at < 3600:
        return
    before = dt.datetime.now(dt.UTC) - dt.timedelta(days=EVENT_KEY_DAYS)
    with session_scope() as session:
        session.execute(delete(TaskKey).where(TaskKey.task_name == EVENT_KEY,
                                              TaskKey.created_at < before))
    _pruned_at = time.monotonic()


def handle(event: Event) -> list[dict[str, Any]]:
    """Apply the rules an event can change; returns the decisions that were taken.

    An event is handled once: a redelivery of one already handled (the connection dropped
    before its ack) changes nothing, so no decision or held-back count is doubled."""
    if event.type == "feedback.received":
        rules = [new_feedback_rule]
    elif event.type == "metrics.online":
        # The feedback count is checked here too: whichever event arrives first may fire.
        rules = [rollback_rule, ab_rule, ctr_drop_rule, new_feedback_rule]
    else:
        return []
    if _handled_before(event.id):
        log.info("policy: event %s (%s) was handled already; skipped", event.id, event.type)
        return []
    token = _handling.set(event.id)
    decisions = []
    try:
        for rule in rules:
            decision = rule()
            if decision is not None:
                decisions.append(decision)
                break  # one action per event: a rollback makes a retrain decision moot
        with session_scope() as session:
            _claim(session, strict=False)  # a decision written above claimed it already
    except AlreadyHandled:
        log.info("policy: event %s (%s) was handled by another delivery; skipped",
                 event.id, event.type)
        return []
    finally:
        _handling.reset(token)
    _prune_event_keys()
    return decisions


class Backoff:
    """Bounded exponential delays with seeded jitter: base, 2 base, 4 base, ... up to cap,
    each drawn from its upper half so that several processes do not retry in step."""

    def __init__(self, base: float, cap: float, seed: int) -> None:
        self.base, self.cap = base, cap
        self.attempt = 0
        self._random = random.Random(seed)

    def next(self) -> float:
        ceiling = min(self.cap, self.base * 2 ** self.attempt)
        self.attempt += 1
        return ceiling / 2 + self._random.uniform(0, ceiling / 2)

    def reset(self) -> None:
        self.attempt = 0


def consume_forever(queue: str = "eval.policy") -> None:
    """Run the policy as a consumer of the event bus (`recsys policy`).

    A lost RabbitMQ or Postgres connection does not end it: it closes the connection,
    waits (POLICY_RECONNECT_SECONDS doubling up to POLICY_RECONNECT_MAX_SECONDS, jittered
    with SEED and the pid) and consumes again. Events are acked only once handled, so one
    in flight is redelivered, and `handle` skips one it has handled already."""
    from shared.events import PikaEventBus

    settings = get_settings()
    bus = PikaEventBus(settings.broker_url, settings.event_exchange)
    backoff = Backoff(settings.policy_reconnect_seconds, settings.policy_reconnect_max_seconds,
                      seed=settings.seed + os.getpid())

    def handle_and_settle(event: Event) -> None:
        handle(event)
        backoff.reset()  # a handled event: the next failure starts the delays afresh

    while True:
        try:
            bus.declare_queue(queue, PATTERNS)
            log.info("retrain policy listening on %s (pid %s)%s", queue, os.getpid(),
                     f" after {backoff.attempt} reconnect attempts" if backoff.attempt else "")
            bus.consume(queue, PATTERNS, handle_and_settle)
        except CONNECTION_ERRORS as error:
            bus.close()
            delay = backoff.next()
            log.warning("retrain policy lost a connection (%s: %s); reconnecting in %.1f s "
                        "(attempt %d)", type(error).__name__, str(error).strip()[:300],
                        delay, backoff.attempt)
            time.sleep(delay)
