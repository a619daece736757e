"""Accepted feedback survives outages, of servers of the test's own (tests/servers.py).
Postgres down (a private cluster, stopped and started): it waits on RabbitMQ for a real
ingest worker, which stores it once Postgres is back; serve keeps answering meanwhile.
RabbitMQ down (a private node, stopped and started): it waits in serve's outbox, shipped
when the broker is back, also by a restarted serve. Either way each event is stored once,
and a client's retry with the same event id stores nothing twice."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY
from sqlalchemy import text

from services.serve.app import create_app
from services.serve.outbox import OUTBOX_FILE
from shared.db.session import engine_for
from shared.settings import get_settings
from tests.conftest import ROOT, wait_for
from tests.serve.conftest import (
    API_KEY,
    app_client,
    celery_worker,
    live_server,
    serve_process,
    worker_log,
)
from tests.servers import PrivatePostgres, PrivateRabbitMQ, stopped

if str(ROOT) not in sys.path:  # `bench` is a folder of scripts, not an installed package
    sys.path.insert(0, str(ROOT))

from bench.feedback_outage import (  # noqa: E402
    FeedbackSender,
    outage_figures,
    run_outage,
    wait_drained,
)


@pytest.fixture
def ingest_worker(serve_env: dict[str, str], tmp_path: Path) -> Iterator[subprocess.Popen]:
    with celery_worker("ingest", serve_env, tmp_path) as worker:
        yield worker


def wait_or_show_log(worker: subprocess.Popen, predicate, what: str, timeout: float):  # type: ignore[no-untyped-def]
    """wait_for, failing with the worker's last log lines (what it did with the task)."""
    try:
        return wait_for(predicate, timeout=timeout, what=what)
    except pytest.fail.Exception:
        pytest.fail(f"timed out waiting for {what}; worker log:\n{worker_log(worker)}")


def degraded_reads() -> float:
    return REGISTRY.get_sample_value("recsys_serve_degraded_total",
                                     {"dependency": "postgres"}) or 0.0


def stored(url: str, sql: str, **params: object) -> list[tuple]:
    try:
        with engine_for(url).connect() as conn:
            return [tuple(row) for row in conn.execute(text(sql), params)]
    except Exception:  # Postgres still starting: nothing stored yet, ask again
        engine_for(url).dispose()
        return []


@pytest.mark.timeout(400)
def test_feedback_accepted_while_postgres_is_down(
        private_database: tuple[dict[str, str], PrivatePostgres], tmp_path: Path) -> None:
    env, postgres = private_database
    serve_db = env["DATABASE_URL"]
    with app_client() as client, celery_worker("ingest", env, tmp_path) as ingest_worker:
        before = client.get("/recommendations/7", params={"k": 5}).json()
        with stopped(postgres):  # the test's own cluster, never the shared one
            # Answered from the model's snapshot (its test-split ratings are not known then).
            during = client.get("/recommendations/7", params={"k": 5, "offset": 1})
            assert during.status_code == 200 and len(during.json()["items"]) == 5
            assert during.json()["source"] == "model"
            cold = client.get("/recommendations/654321")
            assert cold.status_code == 200 and cold.json()["source"] == "popular"
            ready = client.get("/readyz").json()
            assert ready["status"] == "degraded" and not ready["dependencies"]["database"]["ok"]
            posted = client.post("/feedback", json=[
                {"user_id": 7, "movie_id": 1, "type": "rating", "value": 4.0,
                 "request_id": before["request_id"]},
                {"user_id": 654321, "movie_id": 50, "type": "watch"}])
            assert posted.status_code == 202, posted.text
            event_ids = posted.json()["event_ids"]
        rows = wait_or_show_log(ingest_worker, lambda: stored(
            serve_db, "SELECT event_id, user_id, movie_id, type, value, request_id FROM feedback "
            "ORDER BY user_id"), "the feedback to reach Postgres", timeout=180)
        assert rows == [(event_ids[0], 7, 1, "rating", 4.0, before["request_id"]),
                        (event_ids[1], 654321, 50, "watch", None, None)]
        # Postgres is back: misses read histories again (new connections in serve's pool).
        offsets = iter(range(3, 1000))  # a new list each time: a miss, so a history read

        def reads_history_again() -> bool:
            count = degraded_reads()
            response = client.get("/recommendations/7", params={"k": 5, "offset": next(offsets)})
            return response.status_code == 200 and degraded_reads() == count

        wait_for(reads_history_again, timeout=60, what="history reads to succeed again")
        # The impressions of the lists served (before, during and after the outage) land too.
        impressions = wait_or_show_log(ingest_worker, lambda: stored(
            serve_db, "SELECT request_id, user_id, movie_id, position, model_version, variant, "
            "source FROM impression WHERE request_id = :r ORDER BY position",
            r=before["request_id"]), "the impressions to reach Postgres", timeout=60)
        assert impressions == [(before["request_id"], 7, item["movie_id"], position, 1, "champion",
                                "model") for position, item in enumerate(before["items"], 1)]
        wait_or_show_log(ingest_worker, lambda: stored(
            serve_db, "SELECT count(DISTINCT request_id) FROM impression WHERE user_id = 654321")
            == [(1,)], "the impression served during the outage", timeout=60)


def task_runs(worker: subprocess.Popen, task: str) -> int:
    """How many runs of `task` the worker has finished (its log's success lines)."""
    return sum(1 for line in worker_log(worker, 10_000).splitlines()
               if f"Task {task}[" in line and "succeeded" in line)


@pytest.mark.timeout(300)
def test_a_retried_post_stores_each_event_once(client: TestClient,
                                              ingest_worker: subprocess.Popen,
                                              serve_db: str) -> None:
    """The same events posted again (the client did not see the 202) are stored once:
    by their own event_id, or by the Idempotency-Key of the request."""
    body = [{"event_id": "retry-a", "user_id": 7, "movie_id": 3, "type": "click"},
            {"event_id": "retry-b", "user_id": 7, "movie_id": 4, "type": "rating", "value": 2.0}]
    keyed = [{"user_id": 8, "movie_id": 5, "type": "watch"}]
    posts = [client.post("/feedback", json=body) for _ in range(3)]
    posts += [client.post("/feedback", json=keyed, headers={"Idempotency-Key": "order-1"})
              for _ in range(2)]
    assert [p.status_code for p in posts] == [202] * 5, posts[0].text
    assert [p.json()["event_ids"] for p in posts[:3]] == [["retry-a", "retry-b"]] * 3
    assert posts[3].json()["event_ids"] == posts[4].json()["event_ids"]
    # Every message ran (five, one per request) before the rows are counted.
    wait_or_show_log(ingest_worker, lambda: task_runs(ingest_worker, "ingest.feedback") >= 5,
                     "the five feedback messages to be stored", timeout=120)
    rows = stored(serve_db, "SELECT event_id, user_id, movie_id, type FROM feedback "
                  "ORDER BY event_id")
    assert rows == sorted([("retry-a", 7, 3, "click"), ("retry-b", 7, 4, "rating"),
                           (posts[3].json()["event_ids"][0], 8, 5, "watch")])


def outbox_size(data_path: Path) -> int:
    with closing(sqlite3.connect(data_path / OUTBOX_FILE)) as connection:
        return int(connection.execute("SELECT coalesce(sum(size), 0) FROM outbox").fetchone()[0])


@pytest.mark.timeout(300)
def test_a_restarted_serve_ships_what_its_outbox_holds(serve_env: dict[str, str],
                                                      use_settings,  # type: ignore[no-untyped-def]
                                                      private_broker: PrivateRabbitMQ,
                                                      serve_db: str, tmp_path: Path) -> None:
    """Feedback accepted while the broker is down waits in the outbox, already excluded
    from the user's lists; serve stops; the broker returns; the next serve ships it."""
    env = {**serve_env, "BROKER_URL": private_broker.url}
    use_settings(**env)
    data_path = get_settings().data_path
    private_broker.stop()
    with live_server(create_app()) as base, httpx.Client(
            base_url=base, headers={"X-API-Key": API_KEY}, timeout=30) as http:
        top = http.get("/recommendations/7", params={"k": 5}).json()["items"][0]["movie_id"]
        posted = http.post("/feedback", json=[
            {"event_id": "kept-1", "user_id": 7, "movie_id": top, "type": "rating",
             "value": 1.0},
            {"event_id": "kept-2", "user_id": 654321, "movie_id": 50, "type": "watch"}])
        assert posted.status_code == 202, posted.text
        # Only in the outbox (and in the cache's recent feedback), already excluded.
        after = http.get("/recommendations/7", params={"k": 5}).json()["items"]
        assert top not in [item["movie_id"] for item in after]
        ready = http.get("/readyz").json()["dependencies"]["broker"]
        assert not ready["ok"] and "2 feedback events wait in the outbox" in ready["detail"]
    assert outbox_size(data_path) == 2  # serve stopped: the events are on disk, not lost
    private_broker.start()
    with celery_worker("ingest", env, tmp_path) as worker, live_server(create_app()):
        rows = wait_or_show_log(worker, lambda: stored(
            serve_db, "SELECT event_id, user_id, movie_id, type, value FROM feedback "
            "ORDER BY event_id"), "the outbox's events to reach Postgres", timeout=120)
        wait_for(lambda: outbox_size(data_path) == 0, timeout=30,
                 what="the outbox to be emptied after the confirm")
    assert rows == [("kept-1", 7, top, "rating", 1.0), ("kept-2", 654321, 50, "watch", None)]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_feedback_accepted_through_a_broker_outage(serve_env: dict[str, str],
                                                  use_settings,  # type: ignore[no-untyped-def]
                                                  private_broker: PrivateRabbitMQ,
                                                  serve_db: str, tmp_path: Path) -> None:
    """Clients post continuously to a two-worker serve while its RabbitMQ is stopped and
    started: every request is answered 202, and every event is stored exactly once."""
    env = {**serve_env, "BROKER_URL": private_broker.url,
           "DATA_PATH": str(tmp_path / "serve-data")}
    use_settings(**env)
    tag = f"outage-{uuid.uuid4().hex[:8]}"
    with celery_worker("ingest", env, tmp_path) as worker, \
            serve_process(env, tmp_path, workers=2) as base:
        sender = FeedbackSender(base, API_KEY, tag, connections=6, events=2,
                                max_requests=20_000)
        attempts, outage = run_outage(sender, private_broker, before=2, outage=6, after=4)
        accepted = len({i for a in attempts if a.status == 202 for i in a.event_ids})
        rows = wait_drained(serve_db, tag, accepted, timeout=240)
        figures = outage_figures(attempts, rows, outage)
        print(figures)  # the latencies are reported, not asserted (shared machine)
        assert figures["lost"] == 0, worker_log(worker)
    assert figures["requests_outage"] > 0  # clients were sending while the broker was down
    assert figures["errors_5xx"] == 0 and figures["no_answer"] == 0, figures
    assert figures["accepted"] == figures["sent"] == figures["persisted"], figures
    assert figures["duplicated"] == 0 and len(rows) == figures["accepted"], figures
