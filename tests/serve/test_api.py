"""Each endpoint of serve and its errors, against the real Postgres, RabbitMQ and Redis."""

from __future__ import annotations

from pathlib import Path

import pika
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text

from services.serve.app import create_app
from shared.celery_app import app as celery_app
from shared.db.session import engine_for
from shared.events import pika_parameters
from tests.conftest import wait_for
from tests.serve.conftest import API_KEY, World, celery_worker, genres_of

RECOMMENDATION_FIELDS = {"user_id", "items", "model_version", "variant", "source", "request_id"}
ITEM_FIELDS = {"movie_id", "title", "year", "genres", "score"}


def test_recommendations_shape_and_headers(client: TestClient) -> None:
    response = client.get("/recommendations/1", params={"k": 7})
    assert response.status_code == 200
    body = response.json()
    assert set(body) == RECOMMENDATION_FIELDS
    assert (body["user_id"], body["model_version"], body["variant"], body["source"]) == (
        1, 1, "champion", "model")
    assert len(body["items"]) == 7 and all(set(i) == ITEM_FIELDS for i in body["items"])
    scores = [i["score"] for i in body["items"]]
    assert scores == sorted(scores, reverse=True)
    assert response.headers["x-request-id"] == body["request_id"]
    assert client.get("/recommendations/1").json()["request_id"] != body["request_id"]


@pytest.mark.parametrize(("path", "fragment"), [
    ("/recommendations/0", "greater than or equal to 1"),
    ("/recommendations/abc", "valid integer"),
    ("/recommendations/99999999999", "less than or equal to"),
    ("/recommendations/1?k=0", "greater than or equal to 1"),
    ("/recommendations/1?k=101", "less than or equal to 100"),
    ("/recommendations/1?offset=-1", "greater than or equal to 0"),
    ("/recommendations/1?offset=1001", "less than or equal to 1000"),
    ("/recommendations/1?exclude=1,x", "should match pattern"),
    ("/recommendations/1?genres=Comedy,Opera", "unknown genre 'Opera'"),
    ("/items/0/similar", "greater than or equal to 1"),
    ("/items/50/similar?k=500", "less than or equal to 100"),
    ("/popular?genres=Nope", "unknown genre 'Nope'"),
    ("/popular?k=x", "valid integer"),
])
def test_invalid_reads_are_422_with_a_message(client: TestClient, path: str,
                                              fragment: str) -> None:
    response = client.get(path)
    assert response.status_code == 422, response.text
    assert fragment in response.text


def test_similar_items(client: TestClient, world: World) -> None:
    body = client.get("/items/50/similar", params={"k": 5}).json()  # Star Wars
    assert body["movie_id"] == 50 and body["model_version"] == 1
    ids = [i["movie_id"] for i in body["items"]]
    assert len(ids) == 5 and 50 not in ids
    assert 181 in ids or 172 in ids  # Return of the Jedi or The Empire Strikes Back
    missing = client.get("/items/99999/similar")
    assert missing.status_code == 404
    assert "movie 99999 is not in model version 1" in missing.json()["detail"]


def test_popular_with_and_without_genres(client: TestClient, world: World) -> None:
    plain = client.get("/popular", params={"k": 5}).json()
    assert plain["genres"] == [] and plain["model_version"] == 1
    assert plain["items"][0]["movie_id"] == 50  # Star Wars: most ratings in ml-100k
    counts = [i["score"] for i in plain["items"]]
    assert counts == sorted(counts, reverse=True)
    drama = client.get("/popular", params={"k": 10, "genres": "drama,Film-Noir"}).json()
    assert drama["genres"] == ["Drama", "Film-Noir"]
    assert all(genres_of(world, i["movie_id"]) & {"Drama", "Film-Noir"} for i in drama["items"])
    page2 = client.get("/popular", params={"k": 5, "offset": 5}).json()
    assert [i["movie_id"] for i in page2["items"]] == [
        i["movie_id"] for i in client.get("/popular", params={"k": 10}).json()["items"][5:]]


def test_feedback_accepts_one_or_a_batch(client: TestClient) -> None:
    one = client.post("/feedback", json={"user_id": 3, "movie_id": 50, "type": "click"})
    assert one.status_code == 202 and one.json()["accepted"] == 1
    batch = client.post("/feedback", json=[
        {"user_id": 3, "movie_id": 1, "type": "rating", "value": 4.5,
         "timestamp": "2024-05-01T12:00:00+02:00", "request_id": "abc123"},
        {"user_id": 4, "movie_id": 2, "type": "watch", "value": None}])
    assert batch.status_code == 202
    assert batch.json()["accepted"] == 2 and len(set(batch.json()["event_ids"])) == 2


@pytest.mark.parametrize(("body", "fragment"), [
    ({"user_id": 1, "movie_id": 2, "type": "like"}, "'rating', 'click', 'view' or 'watch'"),
    ({"user_id": 1, "movie_id": 2, "type": "rating"}, "a rating needs a value from 0.5 to 5"),
    ({"user_id": 1, "movie_id": 2, "type": "rating", "value": 9}, "from 0.5 to 5"),
    ({"user_id": 0, "movie_id": 2, "type": "view"}, "greater than or equal to 1"),
    ({"user_id": 1, "movie_id": 2, "type": "view", "colour": "red"}, "Extra inputs"),
    ({"user_id": 1, "movie_id": 2, "type": "view", "request_id": "a\u0000b"}, "pattern"),
    ({"user_id": 1, "movie_id": 2, "type": "view", "timestamp": "yesterday"}, "datetime"),
    ({"user_id": 1, "movie_id": 2, "type": "view", "timestamp": "2999-01-01T00:00:00Z"},
     "more than a day in the future"),
    ([], "at least 1 item"),
    ({"movie_id": 2, "type": "view"}, "Field required"),
])
def test_invalid_feedback_is_422(client: TestClient, body: object, fragment: str) -> None:
    response = client.post("/feedback", json=body)
    assert response.status_code == 422, response.text
    assert fragment in response.text


def test_malformed_json_and_oversized_bodies(client: TestClient) -> None:
    broken = client.post("/feedback", content=b"{not json", headers={
        "Content-Type": "application/json"})
    assert broken.status_code == 422 and "JSON" in broken.text
    big = client.post("/feedback", content=b"[" + b" " * (1 << 20) + b"]",
                      headers={"Content-Type": "application/json"})
    assert big.status_code == 413 and "over 1048576 bytes" in big.json()["detail"]

    def chunks():  # no Content-Length: refused while streaming
        for _ in range(40):
            yield b" " * 32768

    streamed = client.post("/feedback", content=chunks(),
                           headers={"Content-Type": "application/json"})
    assert streamed.status_code == 413


def test_api_key_guards_writes_and_admin(client: TestClient) -> None:
    anonymous = TestClient(client.app)
    for method, path in (("POST", "/feedback"), ("GET", "/models"), ("GET", "/models/1"),
                         ("POST", "/models/1/promote"), ("POST", "/models/rollback"),
                         ("POST", "/retrain")):
        for headers in ({}, {"X-API-Key": "wrong"}, {"X-API-Key": API_KEY[:-1]}):
            response = anonymous.request(method, path, headers=headers,
                                         json={"user_id": 1, "movie_id": 1, "type": "view"}
                                         if path == "/feedback" else None)
            assert response.status_code == 401, (method, path, headers, response.text)
            assert response.json()["detail"] == "missing or wrong X-API-Key header"
    assert anonymous.get("/recommendations/1").status_code == 200  # reads are open


def test_anonymous_feedback_setting_and_no_key_configured(serve_env, use_settings) -> None:  # type: ignore[no-untyped-def]
    use_settings(FEEDBACK_ANONYMOUS="true")
    with TestClient(create_app()) as anonymous:
        accepted = anonymous.post("/feedback", json={"user_id": 1, "movie_id": 1,
                                                     "type": "view"})
        assert accepted.status_code == 202
        assert anonymous.get("/models").status_code == 401  # admin stays guarded
    use_settings(FEEDBACK_ANONYMOUS="false", API_KEY="")
    with TestClient(create_app()) as keyless:
        refused = keyless.get("/models", headers={"X-API-Key": ""})
        assert refused.status_code == 403 and "no API_KEY configured" in refused.text


def test_cors_is_off_unless_configured(serve_env, use_settings) -> None:  # type: ignore[no-untyped-def]
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "GET"}
    with TestClient(create_app()) as closed:
        response = closed.get("/popular", headers={"Origin": "https://app.example"})
        assert "access-control-allow-origin" not in response.headers
    use_settings(CORS_ORIGINS="https://app.example, https://other.example")
    with TestClient(create_app()) as opened:
        response = opened.options("/popular", headers=preflight)
        assert response.headers["access-control-allow-origin"] == "https://app.example"
        denied = opened.options("/popular", headers={**preflight, "Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in denied.headers


def test_models_list_and_show(client: TestClient, world: World) -> None:
    listed = client.get("/models").json()
    assert [m["version"] for m in listed["models"]] == sorted(world.versions.values())
    assert listed["serving"] == {"champion": world.versions["als"]}
    champion = client.get("/models/latest").json()
    assert champion["version"] == world.versions["als"] and champion["aliases"] == ["champion"]
    assert client.get("/models/champion").json() == champion
    assert client.get(f"/models/{world.versions['itemknn']}").json()["algorithm"] == \
        "itemknn_cosine"
    assert client.get("/models/challenger").status_code == 404
    assert client.get("/models/77").status_code == 404
    assert client.get("/models/best").status_code == 422
    assert client.post("/models/77/promote").status_code == 404


def test_health_readiness_and_metrics(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    body = ready.json()
    assert body["status"] == "ready" and body["models"] == {"champion": 1}
    assert {k: v["ok"] for k, v in body["dependencies"].items()} == {
        "cache": True, "database": True, "broker": True}
    assert "subscribed to model.promoted" in body["dependencies"]["broker"]["detail"]
    client.get("/recommendations/2")
    client.get("/recommendations/2")
    client.post("/feedback", json={"user_id": 2, "movie_id": 1, "type": "view"})
    metrics = client.get("/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    text_ = metrics.text
    for line in ('recsys_serve_requests_total{method="GET",route="/recommendations/{user_id}"'
                 ',status="200"}',
                 'recsys_serve_request_duration_seconds_bucket{le="0.005",method="GET",'
                 'route="/recommendations/{user_id}"}',
                 'recsys_serve_cache_total{result="hit"}', 'recsys_serve_cache_total{result='
                 '"miss"}', 'recsys_serve_model_version{variant="champion"} 1.0',
                 'recsys_serve_feedback_accepted_total{type="view"}'):
        assert line in text_, line


def test_readiness_without_a_champion(serve_env, serve_db: str) -> None:  # type: ignore[no-untyped-def]
    with engine_for(serve_db).begin() as conn:
        conn.execute(text("DELETE FROM model_alias"))
    with TestClient(create_app()) as no_model:
        ready = no_model.get("/readyz")
        assert ready.status_code == 503 and ready.json()["status"] == "not-ready"
        assert "has no champion yet" in ready.json()["last_error"]
        response = no_model.get("/recommendations/1")
        assert response.status_code == 503 and "no champion" in response.json()["detail"]
        assert no_model.get("/healthz").status_code == 200


def test_retrain_enqueues_the_chain(client: TestClient) -> None:
    queued = client.post("/retrain", json={"algorithms": ["als"], "trials": 1})
    assert queued.status_code == 202, queued.text
    assert queued.json()["stages"] == ["transform", "train", "register", "evaluate", "promote"]
    assert queued.json()["status"] == "queued" and queued.json()["task_id"]
    connection = pika.BlockingConnection(pika_parameters(celery_app.conf.broker_url))
    try:
        channel = connection.channel()
        waiting = channel.queue_declare("transform", durable=True, passive=True)
        assert waiting.method.message_count >= 1
        channel.queue_purge("transform")  # no transform worker should ever run this chain
    finally:
        connection.close()
    bad = client.post("/retrain", json={"algorithms": ["deep-magic"]})
    assert bad.status_code == 422 and "unknown algorithm 'deep-magic'" in bad.text


def test_promote_and_rollback_through_a_registry_worker(
        client: TestClient, serve_env: dict[str, str], world: World, tmp_path: Path) -> None:
    with celery_worker("registry", serve_env, tmp_path):
        wide = world.versions["als_wide"]
        moved = client.post(f"/models/{wide}/promote", json={"reason": "api test"})
        assert moved.status_code == 200, moved.text
        assert moved.json() == {"status": "done", "task_id": None, "alias": "champion",
                                "version": wide, "previous": 1, "action": "promote",
                                "reason": "api test"}
        wait_for(lambda: client.get("/recommendations/1").json()["model_version"] == wide,
                 timeout=20, what="the hot swap to the promoted version")
        back = client.post("/models/rollback", json={"reason": "worse"})
        assert back.status_code == 200 and back.json()["version"] == 1
        wait_for(lambda: client.get("/recommendations/1").json()["model_version"] == 1,
                 timeout=20, what="the hot swap back")
        refused = client.post("/models/rollback", json={})
        assert refused.status_code == 409
        assert "no earlier version to roll back to" in refused.json()["detail"]


def _purge_transform_queue() -> None:
    connection = pika.BlockingConnection(pika_parameters(celery_app.conf.broker_url))
    try:
        connection.channel().queue_purge("transform")
    finally:
        connection.close()


def test_a_second_retrain_is_refused_while_one_runs(client: TestClient) -> None:
    from shared import retrain

    first = client.post("/retrain", json={"algorithms": ["als"], "trials": 1})
    assert first.status_code == 202, first.text
    task_id = first.json()["task_id"]
    try:
        second = client.post("/retrain", json={"algorithms": ["als"], "trials": 1})
        assert second.status_code == 409, second.text
        body = second.json()
        assert body["running"]["task_id"] == task_id
        assert body["running"]["holder"].startswith("api-") and body["running"]["since"]
        assert task_id in body["detail"] and "already running" in body["detail"]
        # The lock is the same one the policy takes: its retrain is held back too.
        assert not retrain.acquire_lock("new_feedback-x", 60)
    finally:
        _purge_transform_queue()  # no transform worker should ever run these chains
        running = retrain.running_retrain()
        assert running is not None and running.task_id == task_id
        retrain.release_lock(running.holder)  # as the chain's last link would
    third = client.post("/retrain", json={})
    assert third.status_code == 202 and third.json()["task_id"] != task_id
    _purge_transform_queue()


def test_retrain_is_refused_while_the_policy_retrains(client: TestClient) -> None:
    from shared import retrain

    assert retrain.acquire_lock("new_feedback-0123456789ab", 60, task_id="chain-of-the-policy")
    refused = client.post("/retrain", json={})
    assert refused.status_code == 409, refused.text
    assert refused.json()["running"]["holder"] == "new_feedback-0123456789ab"
    assert refused.json()["running"]["task_id"] == "chain-of-the-policy"
    connection = pika.BlockingConnection(pika_parameters(celery_app.conf.broker_url))
    try:
        waiting = connection.channel().queue_declare("transform", durable=True, passive=True)
        assert waiting.method.message_count == 0  # nothing was queued
    finally:
        connection.close()


def test_a_failed_retrain_gives_the_lock_back(client: TestClient, serve_env: dict[str, str],
                                              tmp_path: Path) -> None:
    from shared import retrain

    # A split date after every rating: the chain's first link fails on the worker.
    failing = {**serve_env, "EVAL_SPLIT_DATE": "2030-01-01"}
    with celery_worker("eval", serve_env, tmp_path), \
            celery_worker("transform", failing, tmp_path):
        queued = client.post("/retrain", json={"protocol": "temporal"})
        assert queued.status_code == 202, queued.text
        running = retrain.running_retrain()
        assert running is not None and running.task_id == queued.json()["task_id"]
        wait_for(lambda: retrain.running_retrain() is None, timeout=120,
                 what="the failed chain's error callback to release the lock")
        assert celery_app.AsyncResult(queued.json()["task_id"]).state == "FAILURE"
        again = client.post("/retrain", json={"protocol": "temporal"})
        assert again.status_code == 202, again.text
        wait_for(lambda: retrain.running_retrain() is None, timeout=120,
                 what="the second failed chain to release the lock")
