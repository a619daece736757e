"""Accepted feedback survives a Postgres outage: it waits on RabbitMQ for a real ingest
worker, which stores it once Postgres is back; serve keeps answering meanwhile."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY
from sqlalchemy import text

from shared.db.session import engine_for
from tests.conftest import wait_for
from tests.serve.conftest import celery_worker, postgres_stopped, worker_log


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
def test_feedback_accepted_while_postgres_is_down(client: TestClient,
                                                 ingest_worker: subprocess.Popen,
                                                 serve_db: str) -> None:
    before = client.get("/recommendations/7", params={"k": 5}).json()
    with postgres_stopped():
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
