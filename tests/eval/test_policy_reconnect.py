"""`recsys policy` outlives its connections: a real policy process while a RabbitMQ and a
Postgres of the test's own are stopped and started under it.

It stays alive, reconnects with backoff (logged), acts on events published after each
restart, and counts every event once: one published while Postgres is down waits on the
queue and is handled after the restart, none is counted twice.
"""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from shared.db import (
    Feedback,
    ModelAlias,
    ModelVersion,
    RetrainDecision,
    Snapshot,
    migrate,
    session_scope,
)
from shared.events import PikaEventBus
from shared.retrain import acquire_lock, release_lock
from tests.conftest import recsys_command, wait_for
from tests.servers import (
    PrivatePostgres,
    PrivateRabbitMQ,
    private_postgres,
    private_rabbitmq,
)

HOLDER = "api-outage-test"


@pytest.fixture
def servers(tmp_path: Path, use_settings) -> Iterator[tuple[PrivateRabbitMQ, PrivatePostgres]]:  # type: ignore[no-untyped-def]
    with private_rabbitmq() as rabbit, private_postgres() as postgres:
        migrate(postgres.url)
        use_settings(DATABASE_URL=postgres.url, BROKER_URL=rabbit.url)
        yield rabbit, postgres
        from shared.db.session import engine_for

        engine_for(postgres.url).dispose()


def _champion_and_feedback() -> None:
    """A champion whose snapshot is older than six feedback events: the rule would fire."""
    with session_scope() as session:
        session.add(Snapshot(id="s1", ratings_fingerprint="f", protocol="random",
                             artifact_path="snapshots/s1", sha256="0" * 64))
        session.flush()
        session.add(ModelVersion(name="recsys", version=1, algorithm="popular",
                                 snapshot_id="s1", artifact_path="models/1", sha256="0" * 64,
                                 fit_key="k1"))
        session.add(ModelAlias(name="recsys", alias="champion", version=1))
    time.sleep(0.05)  # received strictly after the snapshot
    with session_scope() as session:
        session.add_all(Feedback(event_id=f"r{i}", user_id=i + 1, movie_id=50, type="click",
                                 occurred_at=dt.datetime.now(dt.UTC)) for i in range(6))


def _decisions() -> list[tuple[str | None, bool, int, str | None]]:
    with session_scope() as session:
        return [(d.held_by, d.fired, d.count, d.task_id) for d in session.scalars(
            select(RetrainDecision).order_by(RetrainDecision.id))]


def _held_count() -> int:
    rows = [count for held_by, _fired, count, _task in _decisions() if held_by == HOLDER]
    return rows[0] if rows else 0


@pytest.mark.slow
def test_policy_survives_rabbitmq_and_postgres_restarts(
        servers: tuple[PrivateRabbitMQ, PrivatePostgres], tmp_path: Path) -> None:
    rabbit, postgres = servers
    _champion_and_feedback()
    assert acquire_lock(HOLDER, 3600)  # a running retrain: every event is held back, counted
    env = {**os.environ, "DATABASE_URL": postgres.url, "BROKER_URL": rabbit.url,
           "DATA_PATH": str(tmp_path / "data"), "MODEL_PATH": str(tmp_path / "models"),
           "RETRAIN_MIN_FEEDBACK": "5", "POLICY_RECONNECT_SECONDS": "0.2",
           "POLICY_RECONNECT_MAX_SECONDS": "2"}
    env.pop("REDIS_URL", None)
    log_path = tmp_path / "policy.log"
    bus = PikaEventBus(rabbit.url, "recsys.events")
    with log_path.open("w") as log:
        policy = subprocess.Popen([*recsys_command(), "policy"], env=env, stdout=log,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    try:
        def log_text() -> str:
            return log_path.read_text(errors="replace")

        wait_for(lambda: "listening on eval.policy" in log_text() or policy.poll() is not None,
                 timeout=60, what="the policy to listen")
        assert policy.poll() is None, log_text()[-3000:]
        bus.publish("feedback.received", {"n": 1})
        wait_for(lambda: _held_count() == 1, timeout=60, what="the first event to be counted")

        # RabbitMQ goes away and comes back: the process waits, reconnects and consumes.
        rabbit.stop()
        wait_for(lambda: "reconnecting in" in log_text(), timeout=60,
                 what="the policy to log its reconnect")
        time.sleep(1)
        assert policy.poll() is None, log_text()[-3000:]
        rabbit.start()
        wait_for(lambda: log_text().count("listening on eval.policy") >= 2, timeout=60,
                 what="the policy to consume again after RabbitMQ's restart")
        bus.close()
        bus.publish("feedback.received", {"n": 2})
        bus.publish("feedback.received", {"n": 3})
        wait_for(lambda: _held_count() == 3, timeout=60,
                 what="the events published after RabbitMQ's restart to be counted")

        # Postgres goes away: an event published meanwhile waits on the queue.
        postgres.stop()
        bus.publish("feedback.received", {"n": 4})
        wait_for(lambda: "OperationalError" in log_text(), timeout=60,
                 what="the policy to meet the Postgres outage")
        time.sleep(1)
        assert policy.poll() is None, log_text()[-3000:]
        postgres.start()
        wait_for(lambda: _held_count() == 4, timeout=60,
                 what="the event published during the Postgres outage to be counted")
        bus.publish("feedback.received", {"n": 5})
        wait_for(lambda: _held_count() == 5, timeout=60,
                 what="an event published after Postgres's restart to be counted")

        # The running retrain ends: the next event starts one (queued on the broker).
        assert release_lock(HOLDER)
        bus.publish("feedback.received", {"n": 6})
        wait_for(lambda: any(fired and task for _h, fired, _c, task in _decisions()),
                 timeout=60, what="the policy to fire a retrain after the restarts")
        time.sleep(1)  # any double count would land by now
        assert [(h, f, c) for h, f, c, _t in _decisions()] == [(HOLDER, False, 5),
                                                               (None, True, 1)]
        assert policy.poll() is None, log_text()[-3000:]
    finally:
        bus.close()
        if policy.poll() is None:
            os.killpg(policy.pid, signal.SIGTERM)
            policy.wait(timeout=30)
