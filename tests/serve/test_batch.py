"""POST /recommendations/batch through real serve and a real eval worker."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from fastapi.testclient import TestClient

from tests.serve.conftest import World, celery_worker


def wait_done(client: TestClient, task_id: str, timeout: float = 240) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.get(f"/recommendations/batch/{task_id}").json()
        if status["state"] in ("SUCCESS", "FAILURE"):
            return status
        time.sleep(0.3)
    raise AssertionError(f"batch {task_id} still {status['state']} after {timeout} s")


def test_batch_endpoint_through_the_eval_worker(client: TestClient, serve_env: dict[str, str],
                                                world: World, tmp_path: Path) -> None:
    assert client.post("/recommendations/batch", json={"users": [1]},
                       headers={"X-API-Key": "wrong"}).status_code in (401, 403)
    refused = client.post("/recommendations/batch", json={"output": str(tmp_path / "a.xlsx")})
    assert refused.status_code == 422 and "output" in refused.text
    with celery_worker("eval", serve_env, tmp_path):
        queued = client.post("/recommendations/batch", json={
            "users": [1, 2, 3], "k": 8, "output": str(tmp_path / "lists.csv")})
        assert queued.status_code == 202 and queued.json()["status"] == "queued"
        status = wait_done(client, queued.json()["task_id"])
        assert status["state"] == "SUCCESS", status
        assert status["output"] == str((tmp_path / "lists.csv").resolve())
        assert status["summary"]["users"] == 3 and status["summary"]["rows"] == 24
        table = pacsv.read_csv(tmp_path / "lists.csv").to_pydict()
        for user in (1, 2, 3):
            served = client.get(f"/recommendations/{user}", params={"k": 8}).json()
            assert [m for u, m in zip(table["user_id"], table["movie_id"], strict=True)
                    if u == user] == [item["movie_id"] for item in served["items"]]

        default = client.post("/recommendations/batch", json={"users": [4], "k": 5})
        task_id = default.json()["task_id"]
        done = wait_done(client, task_id)
        path = Path(done["output"])
        try:
            assert path == (world.model_path / "batches" / f"{task_id}.parquet").resolve()
            assert pq.read_table(path).num_rows == 5
        finally:
            path.unlink(missing_ok=True)

        failed = wait_done(client, client.post("/recommendations/batch", json={
            "users": [1], "model": "999"}).json()["task_id"])
        assert failed["state"] == "FAILURE" and "has no version 999" in failed["error"]
    assert client.get("/recommendations/batch/never-issued").json()["state"] == "PENDING"
