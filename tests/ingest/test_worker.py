"""ml-100k through a real `recsys worker ingest` process, over RabbitMQ, into Postgres."""

from __future__ import annotations

import os
import signal
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

from services.ingest.errors import IngestError
from shared.celery_app import app, run_task
from shared.db.session import engine_for
from shared.events import Event, PikaEventBus
from shared.settings import get_settings
from tests.conftest import purge_service_queues, recsys_command, wait_for


@pytest.fixture
def ingest_worker(
    pg_url: str,
    broker_url: str,
    redis_url: str,
    use_settings,  # type: ignore[no-untyped-def]
    tmp_path: Path,
) -> Iterator[subprocess.Popen]:
    use_settings(DATABASE_URL=pg_url, BROKER_URL=broker_url, REDIS_URL=redis_url)
    purge_service_queues()
    env = {
        **os.environ,
        "DATABASE_URL": pg_url,
        "BROKER_URL": broker_url,
        "REDIS_URL": redis_url,
        "DATA_PATH": str(tmp_path / "data"),
    }
    log = (tmp_path / "worker.log").open("w")
    worker = subprocess.Popen(
        [*recsys_command(), "worker", "ingest"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    name = f"ingest@{os.uname().nodename}"
    wait_for(
        lambda: any(name in reply for reply in app.control.ping(timeout=1.0)),
        timeout=60,
        what="the ingest worker to answer a ping",
    )
    yield worker
    os.killpg(worker.pid, signal.SIGTERM)
    worker.wait(timeout=30)
    log.close()


def test_ml100k_through_worker_and_event(
    ingest_worker: subprocess.Popen, pg_url: str, ml100k: Path
) -> None:
    bus = PikaEventBus(get_settings().broker_url, get_settings().event_exchange)
    queue = f"test.ingested.{uuid.uuid4().hex[:8]}"
    bus.declare_queue(queue, ["ratings.ingested"])
    try:
        result = run_task("ingest.load", {"source": str(ml100k)}, timeout=300)
        assert (result["status"], result["ratings"], result["users"], result["movies"]) == (
            "loaded",
            100_000,
            943,
            1682,
        )
        with engine_for(pg_url).connect() as conn:
            counts = conn.execute(
                text(
                    "SELECT count(*), count(DISTINCT user_id), (SELECT count(*) FROM movie) "
                    "FROM rating"
                )
            ).one()
        assert tuple(counts) == (100_000, 943, 1682)
        received: list[Event] = []
        bus.consume(
            queue, ["ratings.ingested"], received.append, max_events=1, inactivity_timeout=10
        )
        assert received and received[0].payload["batch_id"] == result["batch_id"]
        again = run_task("ingest.load", {"source": str(ml100k)}, timeout=300)
        assert (again["status"], again["batch_id"]) == ("unchanged", result["batch_id"])
    finally:
        bus._channel().queue_delete(queue)
        bus.close()


def test_worker_reports_bad_input(ingest_worker: subprocess.Popen, tmp_path: Path) -> None:
    with pytest.raises(IngestError, match="no such file or directory"):
        run_task("ingest.load", {"source": str(tmp_path / "missing")}, timeout=60)
