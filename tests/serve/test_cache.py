"""The Redis cache: hits, invalidation by feedback, a new version, and Redis going away."""

from __future__ import annotations

import time

import redis
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY

from services.registry import registry
from tests.conftest import wait_for
from tests.serve.conftest import World, app_client
from tests.servers import PrivateRedis, stopped


def cache_count(result: str) -> float:
    return REGISTRY.get_sample_value("recsys_serve_cache_total", {"result": result}) or 0.0


def user_keys(serve_env: dict[str, str], user: int) -> list[bytes]:
    client = redis.Redis.from_url(serve_env["REDIS_URL"])
    try:
        return sorted(client.scan_iter(f"{serve_env['CACHE_PREFIX']}:rec:{{{user}}}:*"))
    finally:
        client.close()


def items(body: dict) -> list[int]:
    return [item["movie_id"] for item in body["items"]]


def test_second_request_is_a_hit(client: TestClient, serve_env: dict[str, str]) -> None:
    hits, misses = cache_count("hit"), cache_count("miss")
    first = client.get("/recommendations/10", params={"k": 8, "genres": "Drama"}).json()
    assert (cache_count("hit"), cache_count("miss")) == (hits, misses + 1)
    second = client.get("/recommendations/10", params={"genres": "drama", "k": 8}).json()
    assert cache_count("hit") == hits + 1
    assert {k: v for k, v in second.items() if k != "request_id"} == \
        {k: v for k, v in first.items() if k != "request_id"}
    assert second["request_id"] != first["request_id"]
    keys = user_keys(serve_env, 10)
    assert len(keys) == 1 and b":v1:champion:k8:o0:" in keys[0]
    client.get("/recommendations/10", params={"k": 8, "offset": 8})  # other page, other key
    assert len(user_keys(serve_env, 10)) == 2


def test_feedback_invalidates_the_users_lists(client: TestClient,
                                              serve_env: dict[str, str]) -> None:
    first = client.get("/recommendations/11", params={"k": 5}).json()
    client.get("/recommendations/11", params={"k": 9})
    client.get("/recommendations/12", params={"k": 5})
    assert len(user_keys(serve_env, 11)) == 2
    posted = client.post("/feedback", json={"user_id": 11, "movie_id": items(first)[0],
                                            "type": "click"})
    assert posted.status_code == 202
    assert user_keys(serve_env, 11) == []
    assert len(user_keys(serve_env, 12)) == 1  # another user's list stays
    misses = cache_count("miss")
    after = client.get("/recommendations/11", params={"k": 5}).json()
    assert cache_count("miss") == misses + 1
    assert items(first)[0] not in items(after) and items(after)[:4] == items(first)[1:]


def test_feedback_invalidates_after_redis_forgot_its_scripts(client: TestClient,
                                                             serve_env: dict[str, str]) -> None:
    """A restarted Redis knows no scripts: the invalidation loads its script and runs."""
    first = client.get("/recommendations/13", params={"k": 5}).json()
    client.get("/recommendations/13", params={"k": 7})
    assert len(user_keys(serve_env, 13)) == 2
    server = redis.Redis.from_url(serve_env["REDIS_URL"])
    try:
        server.script_flush()
    finally:
        server.close()
    errors = cache_count("error")
    posted = client.post("/feedback", json={"user_id": 13, "movie_id": items(first)[0],
                                            "type": "click"})
    assert posted.status_code == 202
    assert user_keys(serve_env, 13) == [] and cache_count("error") == errors
    again = client.get("/recommendations/13", params={"k": 5}).json()
    assert items(first)[0] not in items(again)


def test_a_new_version_never_serves_the_old_versions_lists(
        client: TestClient, serve_env: dict[str, str], world: World) -> None:
    old = client.get("/recommendations/20", params={"k": 10}).json()
    assert old["model_version"] == 1
    assert client.get("/recommendations/20", params={"k": 10}).json()["items"] == old["items"]
    wide = world.versions["als_wide"]
    registry.promote(wide, reason="cache test")  # model.promoted over RabbitMQ
    wait_for(lambda: client.get("/readyz").json()["models"] == {"champion": wide},
             timeout=20, what="the hot swap")
    misses = cache_count("miss")
    new = client.get("/recommendations/20", params={"k": 10}).json()
    assert new["model_version"] == wide and cache_count("miss") == misses + 1
    assert items(new) != items(old)
    assert any(f":v{wide}:".encode() in key for key in user_keys(serve_env, 20))


def test_redis_stopped_mid_test_answers_without_errors(
        private_cache: tuple[dict[str, str], PrivateRedis]) -> None:
    _env, cache = private_cache
    with app_client() as client:
        users = [30, 31, 32, 999_999]
        expected = {u: items(client.get(f"/recommendations/{u}").json()) for u in users}
        errors = cache_count("error")
        with stopped(cache):  # a Redis of this test's own: the shared one is never stopped
            for _ in range(5):
                for user in users:
                    response = client.get(f"/recommendations/{user}")
                    assert response.status_code == 200, response.text
                    assert items(response.json()) == expected[user]
            assert client.get("/popular").status_code == 200
            assert client.get("/items/1/similar").status_code == 200
            posted = client.post("/feedback", json={"user_id": 30, "movie_id": expected[30][0],
                                                    "type": "view"})
            assert posted.status_code == 202  # feedback never depends on Redis
            ready = client.get("/readyz")
            assert ready.status_code == 200 and ready.json()["status"] == "degraded"
            assert not ready.json()["dependencies"]["cache"]["ok"]
            assert cache_count("error") > errors
        assert client.get("/readyz").json()["status"] == "ready"  # the ping closes the breaker
        hits = cache_count("hit")
        client.get("/recommendations/31", params={"k": 4})
        client.get("/recommendations/31", params={"k": 4})
        assert cache_count("hit") == hits + 1  # caching again once Redis is back


def test_slow_redis_costs_a_socket_timeout_not_an_error(client: TestClient,
                                                        serve_env: dict[str, str]) -> None:
    expected = items(client.get("/recommendations/40").json())
    admin = redis.Redis.from_url(serve_env["REDIS_URL"])
    errors = cache_count("error")
    admin.execute_command("CLIENT", "PAUSE", "1500", "ALL")  # every command waits 1.5 s
    try:
        started = time.perf_counter()
        response = client.get("/recommendations/40")
        elapsed = time.perf_counter() - started
    finally:
        admin.execute_command("CLIENT", "UNPAUSE")
        admin.close()
    assert response.status_code == 200 and items(response.json()) == expected
    assert elapsed < 1.0, f"a paused Redis held the request {elapsed:.2f} s"
    assert cache_count("error") > errors
