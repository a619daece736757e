"""The retrain policy on the real Postgres: rules, the lock, decisions, automatic rollback."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from sqlalchemy import func, select

from services.eval import policy
from services.eval.online import store_window
from shared.db import Feedback, ModelVersion, RetrainDecision, session_scope
from shared.events import Event
from shared.pipeline import run_pipeline


@pytest.fixture
def champion(pg_url: str, use_settings, tmp_path: Path, ml100k: Path) -> str:  # type: ignore[no-untyped-def]
    use_settings(DATABASE_URL=pg_url, MODEL_PATH=str(tmp_path / "models"),
                 RETRAIN_ALGORITHMS="popular,ease", RETRAIN_TRIALS="2",
                 RETRAIN_MIN_FEEDBACK="5", RETRAIN_LOW_WINDOWS="2")
    run_pipeline("all", source=str(ml100k), algorithms=["popular", "ease"], trials=2)
    return pg_url


def versions() -> int:
    with session_scope() as session:
        return session.scalar(select(func.count()).select_from(ModelVersion)) or 0


def decisions() -> list[RetrainDecision]:
    with session_scope() as session:
        return list(session.scalars(select(RetrainDecision).order_by(RetrainDecision.id)))


def add_feedback(n: int, start: int = 0) -> None:
    now = dt.datetime.now(dt.UTC)
    with session_scope() as session:
        session.add_all(Feedback(event_id=f"p{start + i}", user_id=1 + i, movie_id=50,
                                 type="click", occurred_at=now) for i in range(n))


def test_lock_is_exclusive_and_expires(champion: str) -> None:
    assert policy.acquire_lock("a", 60)
    assert not policy.acquire_lock("b", 60)
    assert not policy.release_lock("b") and policy.release_lock("a")
    assert policy.acquire_lock("c", -1)  # already expired
    assert policy.acquire_lock("d", 60)


def test_feedback_rule_retrains_once_and_the_lock_holds_back_the_rest(champion: str) -> None:
    before = versions()
    add_feedback(3)
    assert policy.handle(Event(type="feedback.received")) == []  # below the threshold
    add_feedback(3, start=3)
    policy.acquire_lock("someone-else", 60)
    held = policy.handle(Event(type="feedback.received"))
    assert held[0]["fired"] is False and "already running" in held[0]["reason"]
    assert versions() == before
    policy.release_lock("someone-else")
    fired = policy.handle(Event(type="feedback.received"))
    assert fired[0]["fired"] and fired[0]["rule"] == "new_feedback" and fired[0]["task_id"]
    assert versions() > before  # the feedback made a new snapshot and new versions
    assert policy.acquire_lock("next", 60)  # the chain's last link released the lock
    policy.release_lock("next")
    assert policy.handle(Event(type="feedback.received")) == []  # acted on already
    assert [d.fired for d in decisions()] == [False, True]


def windows(version: int, ctrs: list[float], start: dt.datetime) -> None:
    for i, ctr in enumerate(ctrs):
        end = start + dt.timedelta(minutes=5 * (i + 1))
        store_window(end - dt.timedelta(hours=1), end, [{
            "model_version": version, "variant": "champion", "k": 10, "lists": 100,
            "impressions": 1000, "clicks": int(ctr * 1000), "ctr": ctr, "hit_rate": 0.5,
            "mean_click_position": 3.0, "feedback": 10, "satisfaction": 4.0}])


def test_ctr_drop_rule(champion: str) -> None:
    version = policy._champion()[0]
    start = dt.datetime.now(dt.UTC)
    windows(version, [0.10, 0.10, 0.09], start)
    assert policy.handle(Event(type="metrics.online")) == []  # one low window is not a trend
    windows(version, [0.10, 0.10, 0.07, 0.07], start)
    fired = policy.handle(Event(type="metrics.online"))
    assert fired and fired[0]["rule"] == "ctr_drop" and fired[0]["fired"]
    assert "below 0.0800" in fired[0]["reason"]


def test_automatic_rollback(champion: str, use_settings) -> None:  # type: ignore[no-untyped-def]
    use_settings(ROLLBACK_AUTO="true")
    old = policy._champion()[0]
    windows(old, [0.12, 0.12], dt.datetime.now(dt.UTC) - dt.timedelta(hours=2))
    from services.registry.registry import promote

    new = 1 if old != 1 else 2
    promote(new, reason="test")
    windows(new, [0.05, 0.05], dt.datetime.now(dt.UTC))
    decided = policy.handle(Event(type="metrics.online"))
    assert decided[0]["action"] == "rollback"
    assert policy._champion()[0] == old


def test_ab_winner_is_promoted_when_the_policy_allows(champion: str, use_settings) -> None:  # type: ignore[no-untyped-def]
    from services.registry.registry import promote
    from shared.db import Impression

    use_settings(AB_AUTO_PROMOTE="true", AB_MIN_EFFECT="1.0", ONLINE_K="1")
    old = policy._champion()[0]
    challenger = 1 if old != 1 else 2
    promote(challenger, alias="challenger", reason="test")
    served = dt.datetime.now(dt.UTC)
    with session_scope() as session:
        for n in range(400):
            variant = "challenger" if n % 2 else "champion"
            session.add(Impression(request_id=f"ab{n}", user_id=n + 1, movie_id=9, position=1,
                                   model_version=challenger if n % 2 else old,
                                   variant=variant, source="model", served_at=served))
            if (n % 2 and n % 4 == 1) or (not n % 2 and n % 20 == 0):
                session.add(Feedback(event_id=f"ab{n}", user_id=n + 1, movie_id=9,
                                     type="click", request_id=f"ab{n}", occurred_at=served))
    decided = policy.handle(Event(type="metrics.online"))
    assert decided and decided[0]["rule"] == "ab_winner"
    assert policy._champion()[0] == challenger


def test_held_back_decisions_are_one_row_per_rule_and_running_retrain(champion: str) -> None:
    add_feedback(6)
    assert policy.acquire_lock("api-first", 60)
    for _ in range(5):
        held = policy.handle(Event(type="feedback.received"))
        assert held[0]["fired"] is False and "already running" in held[0]["reason"]
    assert held[0]["count"] == 5
    rows = decisions()
    assert len(rows) == 1
    row = rows[0]
    assert (row.rule, row.fired, row.count, row.held_by) == ("new_feedback", False, 5, "api-first")
    assert row.last_at > row.created_at and row.details == {"new_feedback": 6}
    policy.release_lock("api-first")
    # Another running retrain is another window: a row of its own.
    assert policy.acquire_lock("pipeline-second", 60)
    policy.handle(Event(type="feedback.received"))
    policy.release_lock("pipeline-second")
    assert [(d.held_by, d.count) for d in decisions()] == [("api-first", 5),
                                                            ("pipeline-second", 1)]


def test_a_redelivered_event_is_handled_once(champion: str) -> None:
    add_feedback(6)
    assert policy.acquire_lock("someone-else", 60)
    event = Event(type="feedback.received")
    assert policy.handle(event)[0]["count"] == 1
    assert policy.handle(event) == []  # the same event again: nothing counted twice
    assert policy.handle(Event(type="feedback.received"))[0]["count"] == 2
    policy.release_lock("someone-else")
    fired = Event(type="feedback.received")
    assert policy.handle(fired)[0]["fired"]
    assert policy.handle(fired) == []
    assert [(d.fired, d.count) for d in decisions()] == [(False, 2), (True, 1)]


def test_the_policy_is_held_back_by_a_retrain_the_api_started(champion: str) -> None:
    from celery import chain

    from shared import retrain
    from shared.celery_app import app

    locked = retrain.lock_retrain(chain(app.signature("transform.snapshot")), "api")
    add_feedback(6)
    held = policy.handle(Event(type="feedback.received"))
    assert held[0]["fired"] is False and locked.holder in held[0]["reason"]
    with pytest.raises(retrain.RetrainRunning, match=locked.holder):
        retrain.lock_retrain(chain(app.signature("transform.snapshot")), "api")
    assert retrain.release_lock(locked.holder)
