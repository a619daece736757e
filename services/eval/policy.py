"""The retrain policy: listens to `metrics.online` and `feedback.received`, decides, acts.

Rules: enough new feedback since the champion's snapshot, or the champion's online CTR
below its own baseline by RETRAIN_CTR_MARGIN for RETRAIN_LOW_WINDOWS windows in a row.
Firing takes a lock in Postgres with an expiry, so one retrain runs at a time however
many events fire; the chain's last link releases it. Every decision that fires, or is
held back by the lock, is recorded with its reason. With ROLLBACK_AUTO, a new champion
whose CTR falls below the previous champion's by ROLLBACK_CTR_MARGIN is rolled back.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import uuid
from typing import Any

import sqlalchemy.exc
from celery import chain
from sqlalchemy import delete, func, select, update

from shared.celery_app import app, queue_of
from shared.db import (
    AliasChange,
    Feedback,
    ModelAlias,
    ModelVersion,
    OnlineMetric,
    PolicyLock,
    RetrainDecision,
    Snapshot,
    session_scope,
)
from shared.events import Event
from shared.settings import get_settings

log = logging.getLogger(__name__)
LOCK = "retrain"
MODEL_NAME = "recsys"
RETRAIN_STAGES = ("transform.snapshot", "train.tune", "registry.register", "eval.offline",
                  "registry.promote_if_better")


def acquire_lock(holder: str, seconds: int, name: str = LOCK) -> bool:
    """Take the lock if it is free or expired; False when someone else holds it."""
    now = dt.datetime.now(dt.UTC)
    with session_scope() as session:
        taken = session.execute(
            update(PolicyLock).where(PolicyLock.name == name, PolicyLock.expires_at < now)
            .values(holder=holder, acquired_at=now,
                    expires_at=now + dt.timedelta(seconds=seconds))).rowcount
        if taken:
            return True
        if session.get(PolicyLock, name) is not None:
            return False
    try:
        with session_scope() as session:
            session.add(PolicyLock(name=name, holder=holder, acquired_at=now,
                                   expires_at=now + dt.timedelta(seconds=seconds)))
        return True
    except sqlalchemy.exc.IntegrityError:  # a concurrent first holder inserted the row
        return False


def release_lock(holder: str, name: str = LOCK) -> bool:
    with session_scope() as session:
        return bool(session.execute(delete(PolicyLock).where(
            PolicyLock.name == name, PolicyLock.holder == holder)).rowcount)


def _record(rule: str, fired: bool, action: str, reason: str, task_id: str | None = None,
            **details: Any) -> dict[str, Any]:
    row = RetrainDecision(rule=rule, fired=fired, action=action, reason=reason,
                          task_id=task_id, details=details)
    with session_scope() as session:
        session.add(row)
        session.flush()
        decision_id = row.id
    log.info("policy %s: %s (%s)", rule, action if fired else "held back", reason)
    return {"id": decision_id, "rule": rule, "fired": fired, "action": action,
            "reason": reason, "task_id": task_id, **details}


def enqueue_retrain(holder: str, protocol: str | None = None) -> str:
    """The retrain chain across the service queues; its last link releases the lock."""
    settings = get_settings()
    options = {
        "transform.snapshot": {"protocol": protocol},
        "train.tune": {"algorithms": [a.strip() for a in settings.retrain_algorithms.split(",")
                                      if a.strip()] or None,
                       "n_trials": settings.retrain_trials or None},
    }
    signatures = [app.signature(name, queue=queue_of(name), kwargs=options.get(name, {}))
                  for name in RETRAIN_STAGES]
    signatures.append(app.signature("eval.release_lock", kwargs={"holder": holder},
                                    queue="eval", immutable=True))
    workflow = chain(*signatures)
    # A failed stage must not keep the lock until it expires.
    workflow.link_error(app.signature("eval.release_lock", kwargs={"holder": holder},
                                      queue="eval", immutable=True))
    result = workflow.apply() if app.conf.task_always_eager else workflow.apply_async()
    return str(result.id)


def fire(rule: str, reason: str, **details: Any) -> dict[str, Any]:
    settings = get_settings()
    holder = f"{rule}-{uuid.uuid4().hex[:12]}"
    if not acquire_lock(holder, settings.retrain_lock_seconds):
        with session_scope() as session:
            lock = session.get(PolicyLock, LOCK)
            held = f"{lock.holder} until {lock.expires_at:%H:%M:%S}" if lock else "another run"
        return _record(rule, False, "retrain", f"{reason}; a retrain is already running "
                       f"(lock held by {held})", **details)
    decision = _record(rule, True, "retrain", reason, task_id=None, holder=holder, **details)
    try:
        task_id = enqueue_retrain(holder)
    except Exception:
        release_lock(holder)
        raise
    with session_scope() as session:
        session.execute(update(RetrainDecision).where(RetrainDecision.id == decision["id"])
                        .values(task_id=task_id))
    return {**decision, "task_id": task_id}


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


def handle(event: Event) -> list[dict[str, Any]]:
    """Apply the rules an event can change; returns the decisions that were taken."""
    if event.type == "feedback.received":
        rules = [new_feedback_rule]
    elif event.type == "metrics.online":
        # The feedback count is checked here too: whichever event arrives first may fire.
        rules = [rollback_rule, ab_rule, ctr_drop_rule, new_feedback_rule]
    else:
        return []
    decisions = []
    for rule in rules:
        decision = rule()
        if decision is not None:
            decisions.append(decision)
            break  # one action per event: a rollback makes a retrain decision moot
    return decisions


def consume_forever(queue: str = "eval.policy") -> None:
    """Run the policy as a consumer of the event bus (`recsys policy`)."""
    from shared.events import PikaEventBus

    settings = get_settings()
    bus = PikaEventBus(settings.broker_url, settings.event_exchange)
    log.info("retrain policy listening on %s (pid %s)", queue, os.getpid())
    while True:
        bus.consume(queue, ["metrics.online", "feedback.received"], handle)
