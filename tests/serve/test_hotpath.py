"""The plain list path in front of FastAPI: which requests it takes, and that its answers
are the route's answers (same lists, headers, metrics), errors left to FastAPI."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from services.serve.hotpath import plain_request
from services.serve.schemas import MAX_ID, MAX_K, MAX_OFFSET


@pytest.mark.parametrize(("path", "query", "expected"), [
    ("/recommendations/7", b"", (7, 10, 0)),
    ("/recommendations/7", b"k=5", (7, 5, 0)),
    ("/recommendations/7", b"offset=0&k=3", (7, 3, 0)),
    ("/recommendations/12", b"k=20&offset=40", (12, 20, 40)),
    (f"/recommendations/{MAX_ID}", f"k={MAX_K}&offset={MAX_OFFSET}".encode(),
     (MAX_ID, MAX_K, MAX_OFFSET)),
])
def test_plain_requests_are_taken(path: str, query: bytes, expected: tuple[int, int, int]
                                  ) -> None:
    ask = plain_request(path, query)
    assert ask is not None
    assert (ask.user_id, ask.k, ask.offset, ask.exclude, ask.genres) == (*expected, (), ())


@pytest.mark.parametrize(("path", "query"), [
    ("/recommendations/0", b""), ("/recommendations/007", b""), ("/recommendations/-1", b""),
    (f"/recommendations/{MAX_ID + 1}", b""), ("/recommendations/7x", b""),
    ("/recommendations/\u0661\u0662", b""), ("/recommendations/7/", b""),
    ("/recommendations/", b""), ("/recommendations/7", b"k=0"),
    ("/recommendations/7", f"k={MAX_K + 1}".encode()), ("/recommendations/7", b"k=05"),
    ("/recommendations/7", b"k="), ("/recommendations/7", b"k"), ("/recommendations/7", b"k=+5"),
    ("/recommendations/7", b"k=5&k=6"), ("/recommendations/7", b"offset=-1"),
    ("/recommendations/7", f"offset={MAX_OFFSET + 1}".encode()),
    ("/recommendations/7", b"exclude=1,2"), ("/recommendations/7", b"genres=Drama"),
    ("/recommendations/7", b"k=5&"), ("/recommendations/7", b"K=5"),
])
def test_everything_else_goes_to_fastapi(path: str, query: bytes) -> None:
    assert plain_request(path, query) is None


def _list(response) -> tuple:  # type: ignore[no-untyped-def]
    body = response.json()
    return (response.status_code, response.headers["content-type"], body["user_id"],
            body["items"], body["model_version"], body["variant"], body["source"])


@pytest.mark.parametrize("user", [7, 123, 654321])  # trained, trained, unknown (popular)
def test_answers_match_the_route(client: TestClient, user: int) -> None:
    # `k=05` is valid but not plain, so FastAPI's route answers it; `k=5` the plain path.
    # Either may come first (and compute the list the other then reads from the cache).
    for first, second in (("k=5&offset=2", "k=05&offset=2"), ("k=05", "k=5")):
        one = client.get(f"/recommendations/{user}?{first}")
        other = client.get(f"/recommendations/{user}?{second}")
        assert _list(one) == _list(other)
        assert one.json()["request_id"] == one.headers["x-request-id"] != other.headers[
            "x-request-id"]
    assert len(client.get(f"/recommendations/{user}").json()["items"]) == 10


def test_invalid_requests_still_get_fastapis_422(client: TestClient) -> None:
    for query in ("k=0", "k=abc", "offset=-1", f"k={MAX_K + 1}"):
        response = client.get(f"/recommendations/7?{query}")
        assert response.status_code == 422, query
        assert response.json()["detail"][0]["loc"][0] == "query"
    assert client.get("/recommendations/0").status_code == 422


def test_metrics_count_plain_answers_under_the_route(client: TestClient) -> None:
    def served() -> float:
        text = client.get("/metrics").text
        line = next((line for line in text.splitlines() if line.startswith(
            'recsys_serve_requests_total{method="GET",route="/recommendations/{user_id}",'
            'status="200"}')), None)
        return float(line.rsplit(" ", 1)[1]) if line else 0.0

    before = served()
    for _ in range(3):
        assert client.get("/recommendations/7?k=4").status_code == 200
    assert served() == before + 3
