"""POST /feedback group commit on the real RabbitMQ: concurrent requests share confirmed
messages, every accepted event is in exactly one of them; when the broker cannot be
reached the events wait in the outbox (and only when that fails too, a 503 says they may
be stored and a retry with their ids is safe). Event ids come from the client, the
Idempotency-Key header, or serve."""

from __future__ import annotations

import json
import sqlite3
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing
from pathlib import Path
from typing import Any

import httpx
import pytest

from services.serve.app import create_app
from services.serve.outbox import OUTBOX_FILE
from shared.celery_app import ServiceQueue, app, purge_queues
from shared.settings import get_settings
from tests.serve.conftest import API_KEY, free_port, live_server

REQUESTS = 48


def post_concurrently(base: str, bodies: list[Any]) -> list[httpx.Response]:
    with httpx.Client(base_url=base, headers={"X-API-Key": API_KEY}, timeout=60) as http:
        with ThreadPoolExecutor(16) as pool:
            return list(pool.map(lambda body: http.post("/feedback", json=body), bodies))


def feedback_messages() -> list[list[dict[str, Any]]]:
    """The event lists of every `ingest.feedback` message waiting on the ingest queue
    (taken off it); other tasks on the queue (impressions) are dropped."""
    found = []
    with app.connection_for_read() as connection:
        queue = next(q for q in app.conf.task_queues if q.name == ServiceQueue.INGEST.value)
        bound = queue.bind(connection.default_channel)
        while (message := bound.get(no_ack=True)) is not None:
            if message.headers.get("task") == "ingest.feedback":
                args, _kwargs, _embed = json.loads(message.body)
                found.append(args[0])
    return found


def test_concurrent_requests_share_confirmed_messages(serve_env: dict[str, str]) -> None:
    purge_queues(ServiceQueue.INGEST)
    bodies = [{"user_id": 1 + i % 7, "movie_id": 1 + i, "type": "click"}
              for i in range(REQUESTS)]
    bodies.append([{"user_id": 99, "movie_id": 5, "type": "view"},
                   {"user_id": 99, "movie_id": 6, "type": "rating", "value": 3.5}])
    with live_server(create_app()) as base:
        responses = post_concurrently(base, bodies)
    assert [r.status_code for r in responses] == [202] * len(bodies), responses[0].text
    accepted = [event_id for r in responses for event_id in r.json()["event_ids"]]
    messages = feedback_messages()
    published = [event for events in messages for event in events]
    # Each accepted event is in exactly one confirmed message, with what was posted.
    assert sorted(e["event_id"] for e in published) == sorted(accepted)
    assert len(accepted) == REQUESTS + 2
    by_id = {e["event_id"]: e for e in published}
    batch = responses[-1].json()["event_ids"]
    assert [(by_id[i]["user_id"], by_id[i]["movie_id"], by_id[i]["type"], by_id[i]["value"])
            for i in batch] == [(99, 5, "view", None), (99, 6, "rating", 3.5)]
    # A request's events travel together, and concurrent requests shared messages.
    assert any(set(batch) <= {e["event_id"] for e in events} for events in messages)
    assert len(messages) < len(bodies), [len(events) for events in messages]


def outbox_events(data_path: Path) -> list[dict[str, Any]]:
    """Every event the replica's outbox file holds (read beside serve, as any process)."""
    with closing(sqlite3.connect(data_path / OUTBOX_FILE)) as connection:
        return [event for (events,) in connection.execute("SELECT events FROM outbox")
                for event in json.loads(events)]


@pytest.mark.timeout(120)
def test_an_unreachable_broker_leaves_feedback_in_the_outbox(serve_env: dict[str, str],
                                                             use_settings) -> None:  # type: ignore[no-untyped-def]
    """Without a broker, every waiting request is answered 202 from the outbox; when the
    outbox cannot take them either, 503 says they may be stored and gives their ids."""
    use_settings(**{**serve_env, "BROKER_URL": f"amqp://guest:guest@127.0.0.1:{free_port()}//"})
    data_path = get_settings().data_path
    bodies = [{"event_id": f"down-{i}", "user_id": 3, "movie_id": 1 + i, "type": "click"}
              for i in range(8)]
    with live_server(create_app()) as base:
        responses = post_concurrently(base, bodies)
        assert [r.status_code for r in responses] == [202] * len(bodies), responses[0].text
        kept = outbox_events(data_path)
        assert sorted(e["event_id"] for e in kept) == sorted(b["event_id"] for b in bodies)
        assert {(e["user_id"], e["movie_id"], e["type"]) for e in kept} == {
            (3, 1 + i, "click") for i in range(8)}
        # The outbox broken too: nothing is accepted, and nothing is promised either way.
        with closing(sqlite3.connect(data_path / OUTBOX_FILE)) as connection:
            connection.execute("DROP TABLE outbox")
        refused = post_concurrently(base, [{**b, "event_id": f"lost-{i}"}
                                           for i, b in enumerate(bodies[:3])])
    assert [r.status_code for r in refused] == [503] * 3
    for i, response in enumerate(refused):
        assert "may have been stored" in response.json()["detail"], response.text
        assert "same event ids is safe" in response.json()["detail"]
        assert "nothing was stored" not in response.json()["detail"]
        assert response.json()["event_ids"] == [f"lost-{i}"]


def test_event_ids_are_the_clients_or_derived_from_the_idempotency_key(
        serve_env: dict[str, str]) -> None:
    purge_queues(ServiceQueue.INGEST)
    event = {"user_id": 4, "movie_id": 9, "type": "view"}
    with live_server(create_app()) as base, httpx.Client(
            base_url=base, headers={"X-API-Key": API_KEY}, timeout=30) as http:
        own = http.post("/feedback", json={**event, "event_id": "client-id-1"})
        keyed = [http.post("/feedback", json=[event, {**event, "movie_id": 10}],
                           headers={"Idempotency-Key": "order-77"}) for _ in range(2)]
        other_key = http.post("/feedback", json=[event], headers={"Idempotency-Key": "order-78"})
        plain = [http.post("/feedback", json=event) for _ in range(2)]
        twice = http.post("/feedback", json=[{**event, "event_id": "same"},
                                             {**event, "movie_id": 10, "event_id": "same"}])
        bad_id = http.post("/feedback", json={**event, "event_id": "no spaces"})
        bad_key = http.post("/feedback", json=event, headers={"Idempotency-Key": "a b"})
    assert own.status_code == 202 and own.json()["event_ids"] == ["client-id-1"]
    assert [r.status_code for r in keyed] == [202, 202]
    assert keyed[0].json()["event_ids"] == keyed[1].json()["event_ids"]
    assert len(set(keyed[0].json()["event_ids"])) == 2
    assert other_key.json()["event_ids"][0] not in keyed[0].json()["event_ids"]
    assert plain[0].json()["event_ids"] != plain[1].json()["event_ids"]
    assert twice.status_code == 422 and "'same' appears more than once" in twice.text
    assert bad_id.status_code == 422 and "event_id" in bad_id.text
    assert bad_key.status_code == 422 and "Idempotency-Key" in bad_key.text
    published = [e["event_id"] for events in feedback_messages() for e in events]
    assert sorted(published) == sorted(
        ["client-id-1", *keyed[0].json()["event_ids"], *keyed[1].json()["event_ids"],
         *other_key.json()["event_ids"], *plain[0].json()["event_ids"],
         *plain[1].json()["event_ids"]])


def test_a_request_gone_before_its_group_formed_is_not_published(serve_env: dict[str, str]
                                                                 ) -> None:
    """A client that went away (its request cancelled) before the publisher took its events
    never got a 202: its events are dropped, the others in the queue go out."""
    from services.serve.cache import make_cache
    from services.serve.feedback import FeedbackPublisher
    from shared.settings import get_settings

    purge_queues(ServiceQueue.INGEST)
    publisher = FeedbackPublisher(make_cache(get_settings()), 4.0)
    gone: Future[None] = Future()
    gone.cancel()
    kept: Future[None] = Future()
    publisher._queue.put(([{"event_id": "gone", "user_id": 1, "movie_id": 1, "type": "click",
                            "value": None, "timestamp": "2026-01-01T00:00:00+00:00",
                            "request_id": None}], gone))
    publisher._queue.put(([{"event_id": "kept", "user_id": 1, "movie_id": 2, "type": "click",
                            "value": None, "timestamp": "2026-01-01T00:00:00+00:00",
                            "request_id": None}], kept))
    publisher.start()  # takes both queued requests as one group
    try:
        kept.result(timeout=30)
    finally:
        publisher.close()
    published = [event["event_id"] for events in feedback_messages() for event in events]
    assert published == ["kept"]
