"""Batch recommendations on ml-100k against serve's own lists, on the real Postgres and Redis.

The registry is serve's test world (ALS champion on an ml-100k snapshot); feedback rows
give a user the model lacks (fold-in) and a user with only a view (popular list).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import uuid
from pathlib import Path

import numpy as np
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text

from services.eval.batch import BatchError, recommend_batch
from services.eval.versions import UnknownVersionError
from tests.conftest import recsys_command

FOLD_IN_USER, VIEW_ONLY_USER = 5001, 5002


def add_feedback(url: str, events: list[tuple[int, int, str, float | None]]) -> None:
    engine = create_engine(url)
    now = dt.datetime.now(dt.UTC)
    with engine.begin() as conn:
        for offset, (user, movie, kind, value) in enumerate(events):
            conn.execute(text(
                "INSERT INTO feedback (event_id, user_id, movie_id, type, value, occurred_at, "
                "received_at) VALUES (:e, :u, :m, :t, :v, :at, :at)"),
                {"e": uuid.uuid4().hex, "u": user, "m": movie, "t": kind, "v": value,
                 "at": now + dt.timedelta(seconds=offset)})
    engine.dispose()


def seen_by_user(url: str) -> dict[int, set[int]]:
    engine = create_engine(url)
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT user_id, movie_id FROM rating UNION "
                                 "SELECT user_id, movie_id FROM feedback")).all()
    engine.dispose()
    seen: dict[int, set[int]] = {}
    for user, movie in rows:
        seen.setdefault(int(user), set()).add(int(movie))
    return seen


def lists_of(path: Path) -> dict[int, list[int]]:
    table = pq.read_table(path).to_pydict()
    lists: dict[int, list[int]] = {}
    for user, rank, movie in zip(table["user_id"], table["rank"], table["movie_id"],
                                 strict=True):
        lists.setdefault(user, []).append(movie)
        assert rank == len(lists[user])
    return lists


@pytest.fixture
def feedback_world(serve_env: dict[str, str], use_settings) -> dict[str, str]:  # type: ignore[no-untyped-def]
    """Feedback of a new user (fold-in), a view-only user (popular) and a view of user 1."""
    add_feedback(serve_env["DATABASE_URL"], [
        (FOLD_IN_USER, 50, "click", None), (FOLD_IN_USER, 100, "rating", 5.0),
        (FOLD_IN_USER, 181, "watch", None), (VIEW_ONLY_USER, 50, "view", None),
        (1, 1500, "view", None), (2, 1, "click", None)])
    use_settings(BATCH_CHUNK_USERS="200")
    return serve_env


def test_batch_lists_equal_serve_lists(feedback_world: dict[str, str], client: TestClient,
                                       tmp_path: Path) -> None:
    summary = recommend_batch("all", 10, tmp_path / "all.parquet")
    assert summary["users"] == 945 and summary["chunks"] == 5 and summary["resumed_chunks"] == 0
    assert summary["model_version"] == client.get("/models/champion").json()["version"]
    lists = lists_of(tmp_path / "all.parquet")
    assert summary["rows"] == sum(len(v) for v in lists.values()) == 945 * 10
    rng = np.random.default_rng(7)
    sample = [1, 2, FOLD_IN_USER, VIEW_ONLY_USER,
              *rng.choice(np.arange(3, 944), size=20, replace=False).tolist()]
    sources = set()
    for user in sample:
        served = client.get(f"/recommendations/{user}", params={"k": 10}).json()
        sources.add(served["source"])
        assert lists[user] == [item["movie_id"] for item in served["items"]], user
    assert sources == {"model", "fold-in", "popular"}
    seen = seen_by_user(feedback_world["DATABASE_URL"])
    assert all(not set(items) & seen.get(user, set()) for user, items in lists.items())
    assert 1500 not in lists[1] and 50 not in lists[VIEW_ONLY_USER]

    # A genre filter keeps the lists serve gives with the same filter.
    recommend_batch("1,5001,5002", 5, tmp_path / "comedy.parquet", genres=["comedy"])
    comedy = lists_of(tmp_path / "comedy.parquet")
    for user in (1, FOLD_IN_USER, VIEW_ONLY_USER):
        served = client.get(f"/recommendations/{user}", params={"k": 5, "genres": "Comedy"})
        assert comedy[user] == [item["movie_id"] for item in served.json()["items"]]


def test_every_format_and_include_seen(feedback_world: dict[str, str], tmp_path: Path) -> None:
    base = recommend_batch("1,2,3,5001", 7, tmp_path / "lists.parquet")
    table = pq.read_table(tmp_path / "lists.parquet")
    assert table.column_names == ["user_id", "rank", "movie_id", "score", "model_version"]
    recommend_batch("1,2,3,5001", 7, tmp_path / "lists.csv")
    assert pacsv.read_csv(tmp_path / "lists.csv").to_pydict() == table.to_pydict()
    recommend_batch("1,2,3,5001", 7, tmp_path / "lists.jsonl")
    rows = [json.loads(line) for line in (tmp_path / "lists.jsonl").read_text().splitlines()]
    assert rows == table.to_pylist() and len(rows) == base["rows"] == 28
    scores = table.column("score").to_pylist()
    assert all(a >= b for a, b in zip(scores[:7], scores[1:7], strict=False))
    included = recommend_batch("1", 50, tmp_path / "with-seen.parquet", exclude_seen=False)
    rated = seen_by_user(feedback_world["DATABASE_URL"])[1]
    assert included["rows"] == 50
    assert set(pq.read_table(tmp_path / "with-seen.parquet").column("movie_id").to_pylist()
               ) & rated


def test_interrupted_run_resumes_to_the_same_file(feedback_world: dict[str, str],
                                                  tmp_path: Path) -> None:
    whole = recommend_batch("all", 10, tmp_path / "whole.csv")
    calls = []

    def interrupt(done: int, total: int) -> None:
        calls.append(done)
        if len(calls) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        recommend_batch("all", 10, tmp_path / "resumed.csv", progress=interrupt)
    parts = tmp_path / "resumed.csv.parts"
    assert json.loads((parts / "manifest.json").read_text())["chunks"].keys() == {"0", "1"}
    assert not (tmp_path / "resumed.csv").exists()
    resumed = recommend_batch("all", 10, tmp_path / "resumed.csv")
    assert resumed["resumed_chunks"] == 2 and resumed["rows"] == whole["rows"]
    assert (tmp_path / "resumed.csv").read_bytes() == (tmp_path / "whole.csv").read_bytes()
    assert not parts.exists()

    # Other arguments over an unfinished run start over, and say so.
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        recommend_batch("all", 10, tmp_path / "again.csv", progress=interrupt)
    changed = recommend_batch("all", 5, tmp_path / "again.csv")
    assert changed["resumed_chunks"] == 0 and "(k)" in changed["restarted"]
    assert changed["rows"] == 945 * 5


def test_clear_errors(feedback_world: dict[str, str], tmp_path: Path) -> None:
    bad = tmp_path / "users.txt"
    bad.write_text("user_id\n1\n2\nthree\n")
    with pytest.raises(BatchError, match=r"users\.txt, line 4: 'three' is not a user id"):
        recommend_batch(str(bad), 10, tmp_path / "out.parquet")
    with pytest.raises(BatchError, match="not 'all', a comma-separated list"):
        recommend_batch(str(tmp_path / "missing.txt"), 10, tmp_path / "out.parquet")
    with pytest.raises(UnknownVersionError, match="has no version 999; versions are 1, 2, 3"):
        recommend_batch("all", 10, tmp_path / "out.parquet", model="999")
    with pytest.raises(BatchError, match=r"unknown extension '\.xlsx'; use \.parquet, \.csv"):
        recommend_batch("all", 10, tmp_path / "out.xlsx")
    with pytest.raises(BatchError, match="unknown genre 'Polka'"):
        recommend_batch("1", 10, tmp_path / "out.parquet", genres=["Polka"])
    good = tmp_path / "good.txt"
    good.write_text("user_id\n3\n\n1\n3\n")
    assert recommend_batch(str(good), 4, tmp_path / "good.parquet")["users"] == 2


def test_command_line(feedback_world: dict[str, str], tmp_path: Path) -> None:
    env = {**os.environ, **feedback_world}
    done = subprocess.run([*recsys_command(), "recommend", "--users", "1,5001", "--k", "3",
                           "--output", str(tmp_path / "cli.jsonl"), "--json"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert {"users", "rows", "output", "model_version", "seconds", "resumed_chunks"} <= set(
        summary)
    assert (summary["users"], summary["rows"]) == (2, 6)
    assert len((tmp_path / "cli.jsonl").read_text().splitlines()) == 6
    failed = subprocess.run([*recsys_command(), "recommend", "--users", "all", "--model", "999",
                             "--output", str(tmp_path / "x.parquet")],
                            env=env, capture_output=True, text=True, timeout=300)
    assert failed.returncode == 1 and "has no version 999" in failed.stderr
