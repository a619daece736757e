"""Bad requests to a live serve: each a 4xx with a JSON message saying where and what, a
bounded body whatever the request's size, and the connection still usable after it."""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

from services.serve.app import create_app
from services.serve.validation import MAX_ERRORS, MAX_INPUT_CHARS
from tests.serve.conftest import API_KEY, live_server

BOUND = 8192  # bytes of a 422 body: MAX_ERRORS bounded errors fit well within it
EVENT = {"user_id": 1, "movie_id": 2, "type": "view"}
NON_FINITE = ("NaN", "Infinity", "-Infinity", "1e400", "-1e400")


class Connection:
    """One keep-alive HTTP/1.1 connection to the server, raw bytes in and out."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.http = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
        self.http.connect()
        self.socket = self.http.sock

    def send(self, method: str, path: str, body: bytes | None = None
             ) -> tuple[int, dict[str, str], bytes]:
        headers = {"X-API-Key": API_KEY}
        if body is not None:
            headers["Content-Type"] = "application/json"
        self.http.request(method, path, body=body, headers=headers)
        response = self.http.getresponse()
        return (response.status, {k.lower(): v for k, v in response.getheaders()},
                response.read())

    def still_open(self) -> bool:
        """The next request goes over the same socket and is answered."""
        status, _, _ = self.send("GET", "/healthz")
        return status == 200 and self.http.sock is self.socket

    def close(self) -> None:
        self.http.close()


@contextmanager
def connection() -> Iterator[Connection]:
    with live_server(create_app()) as url:
        opened = Connection(url)
        try:
            yield opened
        finally:
            opened.close()


def refused(conn: Connection, method: str, path: str, body: bytes | None = None,
            status: int = 422) -> dict[str, Any]:
    """Send one bad request; check status, JSON, size and the connection; the parsed body."""
    got, headers, raw = conn.send(method, path, body)
    assert got == status, (method, path, body and body[:200], got, raw[:500])
    assert headers["content-type"] == "application/json", raw[:500]
    assert len(raw) <= BOUND, (path, len(raw))
    assert headers.get("connection", "").lower() != "close"
    assert conn.still_open(), f"{method} {path}: the connection was dropped"
    return json.loads(raw)  # type: ignore[no-any-return]


def messages(answer: dict[str, Any]) -> list[str]:
    return [error["msg"] for error in answer["detail"]]


def with_number(template: dict[str, Any], field: str, literal: str) -> bytes:
    """`template` as JSON with `field` set to a number literal JSON parsers read as
    non-finite (NaN, Infinity) or that overflows a double (1e400)."""
    text = json.dumps({**template, field: "@number@"})
    return text.replace('"@number@"', literal).encode()


def test_non_finite_numbers_in_bodies_are_422_and_keep_the_connection(
        serve_env: dict[str, str]) -> None:
    rating = {**EVENT, "type": "rating", "value": 4}
    with connection() as conn:
        for literal in NON_FINITE:
            non_finite_bodies(conn, literal, rating)


def non_finite_bodies(conn: Connection, literal: str, rating: dict[str, Any]) -> None:
    for path, template, field, fragment in (
        ("/feedback", rating, "value", "body.value: Input should be a finite number"),
        ("/feedback", EVENT, "user_id", "body.user_id: Input should be a finite number"),
        ("/feedback", EVENT, "movie_id", "body.movie_id: Input should be a finite"),
        ("/retrain", {}, "trials", "body.trials: Input should be a finite number"),
        ("/models/1/promote", {}, "alias",
         "body.alias: Input should be 'champion' or 'challenger'"),
        ("/models/rollback", {}, "reason", "body.reason: Input should be a valid string"),
    ):
        answer = refused(conn, "POST", path, with_number(template, field, literal))
        assert any(fragment in m for m in messages(answer)), (literal, path, field, answer)
        assert answer["detail"][0]["loc"] == ["body", field]
        assert answer["detail"][0]["input"] in ("NaN", "Infinity", "-Infinity")
        assert answer["error_count"] == 1
    # In a batch, and as the whole body.
    batch = json.dumps([EVENT, EVENT, {**EVENT, "value": "@n@"}]).replace('"@n@"', literal)
    answer = refused(conn, "POST", "/feedback", batch.encode())
    assert messages(answer) == ["body[2].value: Input should be a finite number"]
    answer = refused(conn, "POST", "/feedback", literal.encode())
    assert "body: Input should be one feedback event (a JSON object)" in messages(answer)[0]


def test_feedback_batch_errors_name_the_index_and_the_field(serve_env: dict[str, str]) -> None:
    with connection() as conn:
        bad = [EVENT, EVENT, EVENT, {**EVENT, "movie_id": 0}, EVENT, {**EVENT, "type": "like"}]
        answer = refused(conn, "POST", "/feedback", json.dumps(bad).encode())
        assert messages(answer) == [
            "body[3].movie_id: Input should be greater than or equal to 1",
            "body[5].type: Input should be 'rating', 'click', 'view' or 'watch'"]
        assert [e["loc"] for e in answer["detail"]] == [["body", 3, "movie_id"],
                                                        ["body", 5, "type"]]
        assert answer["error_count"] == 2
        assert "dictionary" not in json.dumps(answer)

        answer = refused(conn, "POST", "/feedback", json.dumps([EVENT, 5]).encode())
        assert messages(answer) == [
            "body[1]: Input should be a valid dictionary or object to extract fields from"]
        answer = refused(conn, "POST", "/feedback", json.dumps(
            [EVENT, {**EVENT, "type": "rating"}]).encode())
        assert messages(answer) == ["body[1]: Value error, a rating needs a value from 0.5 to 5"]
        # One event (not an array): the field alone.
        answer = refused(conn, "POST", "/feedback", json.dumps({**EVENT, "user_id": 0}).encode())
        assert messages(answer) == ["body.user_id: Input should be greater than or equal to 1"]
        assert answer["detail"][0]["loc"] == ["body", "user_id"]
        assert answer["detail"][0]["input"] == 0 and answer["detail"][0]["ctx"] == {"ge": 1}
        # The body that would have been accepted still is, on the same connection.
        status, _, raw = conn.send("POST", "/feedback", json.dumps([EVENT]).encode())
        assert status == 202 and json.loads(raw)["accepted"] == 1


def test_422_bodies_stay_small_whatever_the_request_size(serve_env: dict[str, str]) -> None:
    with connection() as conn:
        # 1,001 events: one error, its input (the whole array) cut and marked.
        answer = refused(conn, "POST", "/feedback", json.dumps([EVENT] * 1001).encode())
        assert messages(answer) == [
            "body: List should have at most 1000 items after validation, not 1001"]
        error = answer["detail"][0]
        assert error["input_truncated"] is True
        assert error["input"].startswith('[{"user_id": 1, "movie_id": 2, "type": "view"}')
        assert len(error["input"]) <= MAX_INPUT_CHARS + 1

        # 1,000 events, each wrong: the first MAX_ERRORS listed, all counted.
        answer = refused(conn, "POST", "/feedback", json.dumps(
            [{**EVENT, "movie_id": 0}] * 1000).encode())
        assert answer["error_count"] == 1000 and len(answer["detail"]) == MAX_ERRORS
        assert messages(answer)[-1] == (f"body[{MAX_ERRORS - 1}].movie_id: Input should be "
                                        "greater than or equal to 1")

        # A 50 KB unknown key, a 50 KB refused value, a 50 KB unknown algorithm name.
        huge = "x" * 50_000
        answer = refused(conn, "POST", "/feedback", json.dumps({**EVENT, huge: 1}).encode())
        assert messages(answer)[0].startswith("body.xxxx") and "Extra inputs" in \
            messages(answer)[0]
        answer = refused(conn, "POST", "/feedback", json.dumps(
            {**EVENT, "request_id": huge}).encode())
        assert answer["detail"][0]["input_truncated"] is True
        assert "body.request_id: String should match pattern" in messages(answer)[0]
        answer = refused(conn, "POST", "/retrain", json.dumps({"algorithms": [huge]}).encode())
        assert messages(answer)[0].startswith("body.algorithms: Value error, unknown algorithm")

        # GET /recommendations with a long exclude list (about 49 KB): a bounded echo.
        exclude = ",".join(str(i) for i in range(1, 9000))
        answer = refused(conn, "GET", f"/recommendations/1?exclude={exclude}")
        assert messages(answer) == ["query.exclude: String should match pattern "
                                    "'^ *[0-9]{1,10}( *, *[0-9]{1,10}){0,999} *$'"]
        assert answer["detail"][0]["input"].startswith('"1,2,3,4,5')
        answer = refused(conn, "GET", f"/popular?genres={'Drama,' * 5000}")
        assert messages(answer) == ["query.genres: String should have at most 400 characters"]

        # Malformed JSON: where it broke, without the body.
        answer = refused(conn, "POST", "/feedback", b'{"user_id": 1, ' + b" " * 60_000 + b"x")
        assert messages(answer) == [
            "body: invalid JSON at character 60015: Expecting property name enclosed in "
            "double quotes"]


QUERIES = [
    ("/recommendations/1?k=1e400", "query.k: Input should be a valid integer"),
    ("/recommendations/1?k=NaN", "query.k: Input should be a valid integer"),
    ("/recommendations/1?k=Infinity", "query.k: Input should be a valid integer"),
    ("/recommendations/1?k=" + "9" * 5000, "query.k: Unable to parse input string as an integer"),
    ("/recommendations/1?offset=-1e400", "query.offset: Input should be a valid integer"),
    ("/recommendations/1?k=5&offset=1e400", "query.offset: Input should be a valid integer"),
    ("/recommendations/1e400", "path.user_id: Input should be a valid integer"),
    ("/recommendations/" + "9" * 5000, "path.user_id: Unable to parse input string as an"),
    ("/recommendations/NaN?k=5", "path.user_id: Input should be a valid integer"),
    ("/recommendations/1?exclude=1e400", "query.exclude: String should match pattern"),
    ("/recommendations/1?exclude=99999999999", "query.exclude: String should match pattern"),
    ("/items/Infinity/similar", "path.movie_id: Input should be a valid integer"),
    ("/items/50/similar?k=1e400", "query.k: Input should be a valid integer"),
    ("/popular?k=NaN&offset=1e400", "query.k: Input should be a valid integer"),
    ("/metrics/online?windows=1e400", "query.windows: Input should be a valid integer"),
    ("/models/1e400", "path.version: String should match pattern"),
]


def test_queries_with_huge_or_non_finite_values_are_422(serve_env: dict[str, str]) -> None:
    with connection() as conn:
        for path, fragment in QUERIES:
            answer = refused(conn, "GET", path)
            assert fragment in messages(answer)[0], (path, answer)


def test_bodies_with_numbers_past_every_limit_are_422(serve_env: dict[str, str]) -> None:
    with connection() as conn:
        # Integers too long for Python to convert count as infinite, like 1e400.
        for literal in ("1" + "0" * 5000, "-" + "9" * 5000):
            for field in ("user_id", "value"):
                answer = refused(conn, "POST", "/feedback", with_number(EVENT, field, literal))
                assert messages(answer) == [f"body.{field}: Input should be a finite number"]
        answer = refused(conn, "POST", "/feedback", with_number(EVENT, "user_id", "1e-400"))
        assert messages(answer) == ["body.user_id: Input should be greater than or equal to 1"]
        # Nested past the parser's recursion limit: invalid JSON, located.
        deep = b'[{"user_id": ' + b"[" * 100_000 + b"]" * 100_000 + b"}]"
        answer = refused(conn, "POST", "/feedback", deep)
        assert messages(answer) == ["body: invalid JSON at character 110: arrays and objects "
                                    "nested too deeply to read"]
        answer = refused(conn, "POST", "/retrain", with_number({}, "trials", "2.5e3"))
        assert messages(answer) == ["body.trials: Input should be less than or equal to 1000"]
