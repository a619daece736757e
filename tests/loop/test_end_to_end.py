"""The closed loop end to end, every service a real process started from docker-compose.yml.

Stack up; `recsys pipeline --stages all` on ml-100k (a weak champion: most-popular); real
users get lists over HTTP and click some items and not others; the online window runs and
`metrics.online` arrives on the bus; the policy fires a retrain; a new version is
registered, passes the gate, is promoted, and serve hot-swaps to it. Then the train
worker's pool process is killed with SIGKILL in the middle of a retrain: the task is
redelivered and exactly one new version is registered.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from recsys.stack import down, up
from shared.celery_app import ServiceQueue, app
from shared.db import (
    Feedback,
    Impression,
    ModelAlias,
    ModelVersion,
    PolicyLock,
    RetrainDecision,
    session_scope,
)
from shared.events import Event, PikaEventBus
from tests.conftest import port_open, purge_service_queues, recsys_command, wait_for

API_KEY = "loop-test-key"
SERVE = "http://127.0.0.1:8000"  # compose's serve command binds port 8000
SERVICES = {"migrate", "ingest", "transform", "train", "registry", "eval", "serve", "flower",
            "policy", "beat"}


@pytest.fixture
def loop_stack(pg_url: str, broker_url: str, redis_url: str, use_settings,  # type: ignore[no-untyped-def]
               tmp_path: Path, ml100k: Path) -> Iterator[dict[str, str]]:
    env = {"DATABASE_URL": pg_url, "BROKER_URL": broker_url, "REDIS_URL": redis_url,
           "DATA_PATH": str(tmp_path / "data"), "MODEL_PATH": str(tmp_path / "models"),
           "DATA_SOURCE": str(ml100k), "API_KEY": API_KEY,
           "CACHE_PREFIX": f"loop{uuid.uuid4().hex[:8]}",
           # EASE with enough trials that a retrain lasts several seconds, so the kill -9
           # below lands while train.tune runs, not after it.
           "RETRAIN_MIN_FEEDBACK": "20", "RETRAIN_ALGORITHMS": "ease", "RETRAIN_TRIALS": "30",
           # Only the new-feedback rule here: a CTR drop needs many windows.
           "RETRAIN_LOW_WINDOWS": "1000",
           "ONLINE_INTERVAL_SECONDS": "10", "IMPRESSION_FLUSH_SECONDS": "0.2"}
    use_settings(**env)
    purge_service_queues()
    wait_for(lambda: not port_open(8000), timeout=300,
             what="port 8000 (serve) to be free of another run's serve")
    state = tmp_path / "stack"
    started = up(None, state_dir=state, env=env, without=("bootstrap",))
    assert SERVICES <= {row["name"] for row in started}
    wanted = {q.value for q in ServiceQueue}

    def answering() -> bool:
        names = {node.split("@")[0] for reply in app.control.ping(timeout=1.0) for node in reply}
        return wanted <= names

    try:
        wait_for(answering, timeout=120, what=f"workers {sorted(wanted)} to answer")
        wait_for(lambda: _get("/healthz") is not None, timeout=90, what="serve to answer")
        yield {**env, "STATE": str(state)}
    finally:
        down(state_dir=state)


def _get(path: str) -> dict[str, Any] | None:
    try:
        response = httpx.get(SERVE + path, timeout=10)
    except httpx.HTTPError:
        return None
    return response.json() if response.status_code == 200 else None


def _recommend(user: int) -> dict[str, Any] | None:
    return _get(f"/recommendations/{user}?k=10")


def _versions() -> list[tuple[int, str]]:
    with session_scope() as session:
        return [(row.version, row.algorithm) for row in session.scalars(
            select(ModelVersion).order_by(ModelVersion.version))]


def _champion() -> int | None:
    with session_scope() as session:
        alias = session.get(ModelAlias, ("recsys", "champion"))
        return alias.version if alias else None


def _fired() -> list[dict[str, Any]]:
    with session_scope() as session:
        return [{"id": d.id, "rule": d.rule, "task_id": d.task_id, "reason": d.reason}
                for d in session.scalars(select(RetrainDecision).where(
                    RetrainDecision.fired.is_(True)).order_by(RetrainDecision.id))]


def _lock_free() -> bool:
    with session_scope() as session:
        return session.get(PolicyLock, "retrain") is None


def _count(model: Any, *where: Any) -> int:
    with session_scope() as session:
        return session.scalar(select(func.count()).select_from(model).where(*where)) or 0


def _serve_and_click(users: range, clicks: int) -> tuple[list[dict[str, Any]], int]:
    """Lists for real users over HTTP, and a click on the first `clicks` items of each."""
    lists, events = [], []
    for user in users:
        body = _recommend(user)
        assert body is not None and len(body["items"]) == 10, body
        lists.append(body)
        events += [{"user_id": user, "movie_id": item["movie_id"], "type": "click",
                    "request_id": body["request_id"]} for item in body["items"][:clicks]]
    response = httpx.post(SERVE + "/feedback", json=events, headers={"X-API-Key": API_KEY},
                          timeout=30)
    assert response.status_code == 202, response.text
    assert response.json()["accepted"] == len(events)
    return lists, len(events)


def _train_tune_active() -> dict[str, Any] | None:
    replies = app.control.inspect(timeout=1.0).active() or {}
    for node, tasks in replies.items():
        for task in tasks or []:
            if node.startswith("train@") and task.get("name") == "train.tune":
                return task
    return None


def _chain_done(decision: dict[str, Any]) -> bool:
    return bool(decision["task_id"]) and \
        app.AsyncResult(decision["task_id"]).state == "SUCCESS" and _lock_free()


@pytest.mark.slow
def test_feedback_retrains_promotes_hot_swaps_and_survives_kill_9(
        loop_stack: dict[str, str]) -> None:
    env = {**os.environ, **loop_stack}

    # 1. The model side on ml-100k, through the CLI against the workers: a weak champion.
    done = subprocess.run([*recsys_command(), "pipeline", "--stages", "all", "--algorithms",
                           "popular", "--trials", "2", "--json"], env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["ingest"]["ratings"] == 100_000
    assert summary["promoted"] and summary["champion"]["algorithm"] == "popular"
    first = _champion()
    assert first is not None and _versions() == [(first, "popular")]
    wait_for(lambda: (_recommend(1) or {}).get("model_version") == first, timeout=120,
             what=f"serve to answer with the first champion v{first}")

    # A queue of the test's own on the bus, declared before any window runs.
    bus = PikaEventBus(loop_stack["BROKER_URL"], "recsys.events")
    queue = f"test.loop.metrics.{uuid.uuid4().hex[:8]}"
    bus.declare_queue(queue, ["metrics.online"])
    try:
        # 2. Real users get lists and click some items, not others.
        lists, clicks = _serve_and_click(range(1, 11), clicks=3)
        assert all(body["model_version"] == first and body["variant"] == "champion"
                   for body in lists)
        request_ids = [body["request_id"] for body in lists]
        wait_for(lambda: _count(Impression, Impression.request_id.in_(request_ids))
                 == 10 * len(lists), timeout=60, what="the impressions to land")
        wait_for(lambda: _count(Feedback, Feedback.request_id.in_(request_ids)) == clicks,
                 timeout=60, what="the feedback to land")

        # 3. The online window, on demand (beat runs it too), and metrics.online on the bus.
        app.send_task("eval.online", queue="eval").get(timeout=120)
        seen: list[Event] = []

        def ours_counted() -> bool:
            bus.consume(queue, ["metrics.online"], seen.append, max_events=1,
                        inactivity_timeout=5)
            return any(f["model_version"] == first and f["variant"] == "champion"
                       and f["impressions"] >= 10 * len(lists) and f["clicks"] >= clicks
                       for event in seen for f in event.payload["figures"])

        wait_for(ours_counted, timeout=120, interval=0,
                 what="a metrics.online event counting our impressions and clicks")
        figures = [f for event in seen for f in event.payload["figures"]
                   if f["model_version"] == first][-1]
        assert 0 < figures["ctr"] < 1 and figures["hit_rate"] > 0

        # 4. The policy fired a retrain; a new version is registered and promoted.
        # The decision is recorded before its chain is enqueued, then given its task id.
        decisions = wait_for(lambda: [d for d in _fired() if d["task_id"]], timeout=120,
                             what="the policy to fire a retrain")
        assert decisions[0]["rule"] == "new_feedback" and decisions[0]["task_id"]
        wait_for(lambda: _chain_done(_fired()[0]), timeout=600,
                 what="the retrain chain to finish")
        assert len(_fired()) == 1, _fired()
        versions = _versions()
        assert len(versions) == 2 and versions[-1][1] == "ease", versions
        second = versions[-1][0]
        assert _champion() == second, "EASE should pass the gate against most-popular"

        # 5. Serve hot-swaps: a recommendation now names the new version.
        wait_for(lambda: all((_recommend(u) or {}).get("model_version") == second
                             for u in range(1, 6)), timeout=120,
                 what=f"serve to answer with the new champion v{second}")
    finally:
        try:
            bus._channel().queue_delete(queue)
        finally:
            bus.close()

    # 6. kill -9 the train worker's pool process in the middle of a retrain.
    before = _versions()
    _serve_and_click(range(11, 21), clicks=3)  # 30 more clicks: the policy fires again
    active = wait_for(_train_tune_active, timeout=300, interval=0.05,
                      what="the train worker to be busy with the retrain's train.tune")
    os.kill(int(active["worker_pid"]), signal.SIGKILL)
    wait_for(lambda: len(_fired()) == 2, timeout=60, what="the second retrain decision")
    decision = _fired()[1]
    wait_for(lambda: _chain_done(decision), timeout=600,
             what="the retrain chain to finish after the kill")
    assert app.AsyncResult(active["id"]).state == "SUCCESS"  # redelivered, and done
    log = Path(loop_stack["STATE"], "train.log").read_text(errors="replace")
    assert "SIGKILL" in log or "WorkerLostError" in log or "signal 9" in log, log[-3000:]
    after = _versions()
    new = [v for v in after if v not in before]
    assert len(new) == 1 and new[0][1] == "ease", (before, after)
    assert len({version for version, _ in after}) == len(after)
