"""The pipeline as a Celery chain across real worker processes, one per service queue.

The workers are started by `recsys stack up` from docker-compose.yml, so this also checks
that the compose services run the whole model side.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select

from recsys.stack import down, up
from shared.celery_app import ServiceQueue, app, run_task
from shared.db import ModelVersion, session_scope
from shared.errors import RecsysError
from shared.pipeline import latest_snapshot, run_pipeline
from shared.settings import get_settings
from tests.conftest import purge_service_queues, wait_for


@pytest.fixture
def stack(pg_url: str, broker_url: str, redis_url: str, use_settings,  # type: ignore[no-untyped-def]
          tmp_path: Path) -> Iterator[dict[str, str]]:
    env = {"DATABASE_URL": pg_url, "BROKER_URL": broker_url, "REDIS_URL": redis_url,
           "DATA_PATH": str(tmp_path / "data"), "MODEL_PATH": str(tmp_path / "models")}
    use_settings(**env)
    purge_service_queues()
    state = tmp_path / "stack"
    up(None, state_dir=state, env=env, without=("bootstrap",))
    wanted = {q.value for q in ServiceQueue}

    def answering() -> bool:
        names = {node.split("@")[0] for reply in app.control.ping(timeout=1.0) for node in reply}
        return wanted <= names

    try:
        wait_for(answering, timeout=90, what=f"workers {sorted(wanted)} to answer")
        yield env
    finally:
        down(state_dir=state)


def test_chain_across_workers_redelivery_and_tampering(stack: dict[str, str],
                                                       ml100k: Path) -> None:
    summary = run_pipeline("all", source=str(ml100k), algorithms=["popular", "ease"], trials=2,
                           timeout=900)
    assert summary["stages"] == ["ingest", "transform", "train", "register", "evaluate",
                                 "promote"]
    assert summary["ingest"]["ratings"] == 100_000
    assert {m["algorithm"] for m in summary["models"]} == {"popular", "ease"}
    assert summary["promoted"] and summary["champion"]["algorithm"] == "ease"
    by_algorithm = {m["algorithm"]: m["metrics"]["ndcg@10"] for m in summary["models"]}
    assert by_algorithm["ease"] > by_algorithm["popular"]  # (the quality bar: test_embedded)

    # A redelivered train.fit (same task id twice) still registers one version.
    snapshot = latest_snapshot("random")
    task_id = f"train-fit-{os.getpid()}"
    first = app.send_task("train.fit", args=[snapshot], kwargs={"algorithm": "als",
                          "params": {"factors": 8, "iterations": 3}}, task_id=task_id,
                          queue="train").get(timeout=300)
    second = app.send_task("train.fit", args=[snapshot], kwargs={"algorithm": "als",
                           "params": {"factors": 8, "iterations": 3}}, task_id=task_id,
                           queue="train").get(timeout=300)
    assert first["task_id"] == second["task_id"] == task_id
    registered = [run_task("registry.register", {"trained": r}, timeout=120)[0]
                  for r in (first, second)]
    assert registered[0]["version"] == registered[1]["version"] == 3
    assert [r["created"] for r in registered] == [True, False]
    with session_scope() as session:
        assert session.scalar(select(func.count()).select_from(ModelVersion)) == 3

    # A tampered artifact is refused by the worker that loads it.
    path = Path(get_settings().model_path) / registered[0]["artifact_path"] / "arrays.npz"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(RecsysError, match="checksum mismatch.*refusing to load"):
        run_task("eval.offline", {"registered": [registered[0]]}, timeout=120)
