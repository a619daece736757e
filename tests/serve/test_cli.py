"""`recsys serve` with several uvicorn workers, and serve on the embedded defaults."""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text

from shared.db.session import get_engine
from tests.conftest import purge_service_queues, recsys_command, wait_for
from tests.serve.conftest import API_KEY, free_port


def answers(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.mark.timeout(300)
def test_recsys_serve_runs_workers_that_share_metrics(serve_env: dict[str, str],
                                                      tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen(
        [*recsys_command(), "serve", "--port", str(port), "--workers", "2"],
        env={**env, **serve_env, "DATA_PATH": str(tmp_path / "data")}, stdout=log,
        stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: answers(url), timeout=120, what="recsys serve to be ready")
        with httpx.Client(base_url=url, timeout=10) as http:
            for _ in range(30):
                assert http.get("/recommendations/1", params={"k": 3}).status_code == 200
            # Both workers load the model; /metrics, answered by either, adds them up.
            wait_for(lambda: len(re.findall(r'recsys_serve_model_version\{.*variant="champion"'
                                            r'\} 1\.0', http.get("/metrics").text)) == 2,
                     timeout=60, what="both workers to report the champion")
            metrics = http.get("/metrics").text
        count = re.search(r'recsys_serve_requests_total\{method="GET",route="/recommendations/'
                          r'\{user_id\}",status="200"\} (\d+)\.0', metrics)
        assert count and int(count.group(1)) == 30, metrics
        assert (tmp_path / "data" / "prometheus" / str(port)).is_dir()
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
        log.close()
        purge_service_queues()
    assert server.returncode == 0, (tmp_path / "serve.log").read_text()[-3000:]


@pytest.mark.timeout(600)
def test_embedded_serve(use_settings, tmp_path: Path, ml100k: Path) -> None:  # type: ignore[no-untyped-def]
    """No servers: SQLite, in-process cache and event bus, tasks run here."""
    from services.ingest.ingest import ingest_source
    from services.registry import registry
    from services.serve.app import create_app
    from services.train.training import fit_on_snapshot, load_snapshot
    from services.transform.snapshot import SnapshotParams, build_snapshot
    from shared.db import migrate

    use_settings(API_KEY=API_KEY, IMPRESSION_FLUSH_SECONDS="0.2")
    migrate()
    ingest_source(str(ml100k))
    snapshot = build_snapshot(SnapshotParams.from_settings())
    data = load_snapshot(snapshot)
    versions = []
    for factors in (8, 12):
        fitted = fit_on_snapshot(data, "als", {"factors": factors, "iterations": 3})
        versions.append(registry.register(snapshot["snapshot_id"], "als", fitted["params"],
                                          fitted["artifact_path"], fitted["sha256"])["version"])
    registry.promote(versions[0])

    with TestClient(create_app(), headers={"X-API-Key": API_KEY}) as client:
        ready = client.get("/readyz").json()
        assert ready["status"] == "ready" and ready["models"] == {"champion": versions[0]}
        assert "in-process cache" in ready["dependencies"]["cache"]["detail"]
        first = client.get("/recommendations/1", params={"k": 5}).json()
        assert client.get("/recommendations/1", params={"k": 5}).json()["items"] == \
            first["items"]
        top = first["items"][0]["movie_id"]
        posted = client.post("/feedback", json={"user_id": 1, "movie_id": top, "type": "click"})
        assert posted.status_code == 202
        with get_engine().connect() as conn:  # stored in this process, before the 202
            assert conn.execute(text("SELECT movie_id FROM feedback WHERE event_id = :e"),
                                {"e": posted.json()["event_ids"][0]}).scalar_one() == top
        after = client.get("/recommendations/1", params={"k": 5}).json()
        assert top not in [i["movie_id"] for i in after["items"]]
        moved = client.post(f"/models/{versions[1]}/promote", json={"reason": "embedded"})
        assert moved.status_code == 200 and moved.json()["status"] == "done"
        # The in-process bus ran the swap before the promote call returned.
        assert client.get("/recommendations/1").json()["model_version"] == versions[1]

        def impressions() -> int:
            with get_engine().connect() as conn:
                return int(conn.execute(text(
                    "SELECT count(DISTINCT request_id) FROM impression")).scalar_one())

        wait_for(lambda: impressions() >= 4, timeout=30, what="impressions in SQLite")


def _cache_misses(url: str) -> int:
    metrics = httpx.get(f"{url}/metrics", timeout=10).text
    found = re.search(r'recsys_serve_cache_total\{result="miss"\} (\d+)\.0', metrics)
    return int(found.group(1)) if found else 0


@pytest.mark.timeout(600)
def test_embedded_workers_never_show_a_rated_movie(tmp_path: Path, ml100k: Path) -> None:
    """`recsys serve --workers 2` on embedded defaults, after an embedded pipeline run:
    feedback accepted by one worker is known to the other before the 202, so no list
    from either worker shows the movie again. Every request opens its own connection,
    so the kernel spreads them over both workers."""
    from tests.ingest.test_embedded import embedded_env

    env = embedded_env(tmp_path, DATA_SOURCE=str(ml100k), API_KEY=API_KEY)
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    trained = subprocess.run(
        [*recsys_command(), "pipeline", "--stages", "all", "--algorithms", "als",
         "--trials", "2", "--json"], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=600)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert '"promoted": true' in trained.stdout.splitlines()[-1]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen([*recsys_command(), "serve", "--port", str(port), "--workers", "2"],
                              cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)

    def listed(user: int) -> list[int]:
        answer = httpx.get(f"{url}/recommendations/{user}", timeout=10)
        assert answer.status_code == 200, answer.text
        return [item["movie_id"] for item in answer.json()["items"]]

    users, reads = range(1, 31), 6
    try:
        wait_for(lambda: answers(url), timeout=120, what="recsys serve to be ready")
        wait_for(lambda: len(re.findall(r'recsys_serve_model_version\{.*variant="champion"'
                                        r'\} 1\.0', httpx.get(f"{url}/metrics").text)) == 2,
                 timeout=60, what="both workers to load the champion")
        tops = {user: [listed(user) for _ in range(reads)][-1][0] for user in users}
        # Each worker misses a user's first list once: more misses than users means lists
        # were cached by both workers, the case where one worker's feedback must reach the
        # other's cache.
        assert _cache_misses(url) > len(users)
        shown_again: list[tuple[int, int]] = []
        for _round in range(3):
            for user in users:
                movie = tops[user]
                posted = httpx.post(f"{url}/feedback", headers={"X-API-Key": API_KEY},
                                    json={"user_id": user, "movie_id": movie, "type": "rating",
                                          "value": 1}, timeout=10)
                assert posted.status_code == 202, posted.text
                lists = [listed(user) for _ in range(reads)]
                shown_again += [(user, movie) for items in lists if movie in items]
                tops[user] = lists[-1][0]
        assert shown_again == []
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
        log.close()
    assert server.returncode == 0, (tmp_path / "serve.log").read_text()[-3000:]
