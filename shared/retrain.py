"""One retrain at a time, whoever starts it: a named lock in Postgres with an expiry.

Every entry point that starts the retrain chain (`POST /retrain`, the retrain policy,
`recsys pipeline` with a train stage) takes the lock first; a second one is refused with
`RetrainRunning`, naming the retrain that runs. The chain itself gives the lock back: its
last link (`eval.release_lock`) on success, the same task as every link's error callback
on failure; embedded, the process running the chain releases it. The expiry
(RETRAIN_LOCK_SECONDS) frees a lock whose chain was lost altogether. The lock is a row,
so any number of serve replicas and policy processes share it.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from celery import chain
from celery.canvas import _chain
from celery.result import AsyncResult
from sqlalchemy import delete, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from shared.celery_app import app
from shared.db import PolicyLock, session_scope
from shared.errors import RecsysError
from shared.settings import get_settings

LOCK = "retrain"
RELEASE_TASK = "eval.release_lock"

Record = Callable[[Session, str, str | None], None]


@dataclass(frozen=True)
class RunningRetrain:
    """The retrain holding the lock: its chain's last task, holder and times."""

    task_id: str | None
    holder: str
    since: dt.datetime
    expires_at: dt.datetime

    def as_dict(self) -> dict[str, Any]:
        return {"task_id": self.task_id, "holder": self.holder,
                "since": _utc(self.since).isoformat(),
                "expires_at": _utc(self.expires_at).isoformat()}


class RetrainRunning(RecsysError):
    """A retrain was asked for while another one holds the lock."""

    def __init__(self, running: RunningRetrain) -> None:
        self.running = running
        super().__init__(
            f"a retrain is already running: task {running.task_id or 'in-process'} "
            f"(lock held by {running.holder} since {_utc(running.since):%Y-%m-%d %H:%M:%S} "
            f"UTC, expires {_utc(running.expires_at):%H:%M:%S})")


@dataclass(frozen=True)
class LockedRetrain:
    """A chain whose lock is taken: `workflow` carries the lock's release when queued."""

    holder: str
    task_id: str | None
    workflow: Any


def _utc(moment: dt.datetime) -> dt.datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)


def new_holder(origin: str) -> str:
    """A holder name that says who started the retrain: `api-3f2a...`, `new_feedback-...`."""
    return f"{origin}-{uuid.uuid4().hex[:12]}"


def _as_running(row: PolicyLock) -> RunningRetrain:
    return RunningRetrain(row.task_id, row.holder, row.acquired_at, row.expires_at)


def acquire(session: Session, holder: str, seconds: int, task_id: str | None = None,
            name: str = LOCK) -> RunningRetrain | None:
    """Take the lock in `session`'s transaction; the holder that has it when it is taken.

    Returns None when taken. Safe under concurrency: an expired row is taken by one
    conditional UPDATE, an absent one by one INSERT ... ON CONFLICT DO NOTHING."""
    now = dt.datetime.now(dt.UTC)
    values = {"holder": holder, "acquired_at": now, "task_id": task_id,
              "expires_at": now + dt.timedelta(seconds=seconds)}
    taken = session.execute(update(PolicyLock).where(
        PolicyLock.name == name, PolicyLock.expires_at < now).values(**values)).rowcount
    if not taken:
        dialect = postgresql if session.get_bind().dialect.name == "postgresql" else sqlite
        taken = session.execute(dialect.insert(PolicyLock).values(name=name, **values)
                                .on_conflict_do_nothing(index_elements=["name"])).rowcount
    if taken:
        return None
    row = session.get(PolicyLock, name, populate_existing=True)
    if row is None:  # released between the two statements: say so rather than guess
        return RunningRetrain(None, "a retrain that just ended", now, now)
    return _as_running(row)


def acquire_lock(holder: str, seconds: int, name: str = LOCK,
                 task_id: str | None = None) -> bool:
    """Take the lock if it is free or expired; False when someone else holds it."""
    with session_scope() as session:
        return acquire(session, holder, seconds, task_id, name) is None


def release_lock(holder: str, name: str = LOCK) -> bool:
    """Give the lock back if `holder` still has it; False when it had moved on."""
    with session_scope() as session:
        return bool(session.execute(delete(PolicyLock).where(
            PolicyLock.name == name, PolicyLock.holder == holder)).rowcount)


def running_retrain(name: str = LOCK) -> RunningRetrain | None:
    """The retrain holding the lock now, if any (an expired lock holds nothing)."""
    with session_scope() as session:
        row = session.get(PolicyLock, name)
        if row is None or _utc(row.expires_at) < dt.datetime.now(dt.UTC):
            return None
        return _as_running(row)


def releasing(workflow: Any, holder: str) -> Any:
    """The chain with the lock's release as its last link and as every link's errback."""
    release = app.signature(RELEASE_TASK, kwargs={"holder": holder}, queue="eval",
                            immutable=True)
    workflow = (workflow if isinstance(workflow, _chain) else chain(workflow)) | release
    workflow.link_error(release.clone())
    return workflow


def lock_retrain(workflow: Any, origin: str, record: Record | None = None) -> LockedRetrain:
    """Take the lock for `workflow`, or raise RetrainRunning naming the retrain that runs.

    `record(session, holder, task_id)` runs in the lock's transaction, so what it writes
    exists exactly when the lock was taken. With a broker the chain's task ids are fixed
    here (the lock names the last one) and the release links are attached."""
    holder = new_holder(origin)
    task_id = None
    if not app.conf.task_always_eager:
        workflow = releasing(workflow, holder)
        task_id = str(workflow.freeze().id)
    with session_scope() as session:
        running = acquire(session, holder, get_settings().retrain_lock_seconds, task_id)
        if running is not None:
            raise RetrainRunning(running)
        if record is not None:
            record(session, holder, task_id)
    return LockedRetrain(holder, task_id, workflow)


def send_retrain(locked: LockedRetrain) -> AsyncResult:
    """Queue a locked chain on the broker; the lock is given back if it cannot be sent."""
    try:
        return locked.workflow.apply_async()
    except BaseException:
        release_lock(locked.holder)
        raise


def run_retrain_here(locked: LockedRetrain) -> Any:
    """Embedded: run a locked chain in this process, giving the lock back however it ends."""
    try:
        return locked.workflow.apply()
    finally:
        release_lock(locked.holder)
