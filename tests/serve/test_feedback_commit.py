"""POST /feedback group commit on the real RabbitMQ: concurrent requests share confirmed
messages, every accepted event is in exactly one of them, and when the broker cannot be
reached every waiting request gets a 503 that says to retry."""

from __future__ import annotations

import json
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from services.serve.app import create_app
from shared.celery_app import ServiceQueue, app, purge_queues
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


@pytest.mark.timeout(120)
def test_an_unreachable_broker_fails_every_waiting_request(serve_env: dict[str, str],
                                                          use_settings) -> None:  # type: ignore[no-untyped-def]
    use_settings(**{**serve_env, "BROKER_URL": f"amqp://guest:guest@127.0.0.1:{free_port()}//"})
    bodies = [{"user_id": 3, "movie_id": 1 + i, "type": "click"} for i in range(8)]
    with live_server(create_app()) as base:
        responses = post_concurrently(base, bodies)
    assert [r.status_code for r in responses] == [503] * len(bodies)
    assert all("retry" in r.json()["detail"] for r in responses), responses[0].text


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
