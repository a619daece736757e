"""Worker metrics: a real `recsys worker ingest` (prefork pool) serving Prometheus counts."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.ingest.errors import IngestError
from shared.celery_app import ServiceQueue, run_task
from shared.settings import SettingsError
from shared.worker_metrics import metrics_port
from tests.conftest import purge_service_queues, wait_for
from tests.monitoring.helpers import free_port, recsys_process, wait_for_worker

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def test_each_queue_has_its_own_port() -> None:
    ports = {queue: metrics_port(9100, queue) for queue in ServiceQueue}
    assert ports[ServiceQueue.INGEST] == 9100
    assert ports[ServiceQueue.EVAL] == 9100 + len(ServiceQueue) - 1
    assert len(set(ports.values())) == len(ServiceQueue)
    with pytest.raises(SettingsError, match="WORKER_METRICS_PORT"):
        metrics_port(65535, ServiceQueue.EVAL)


def scrape(port: int) -> Samples | None:
    """Every sample of the worker's /metrics, or None while it does not answer."""
    try:
        response = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
    except httpx.TransportError:
        return None
    response.raise_for_status()
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(response.text)
            for sample in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


@pytest.fixture
def worker_env(use_settings, pg_url: str, broker_url: str, redis_url: str,  # type: ignore[no-untyped-def]
               tmp_path: Path) -> dict[str, str]:
    use_settings(DATABASE_URL=pg_url, BROKER_URL=broker_url, REDIS_URL=redis_url)
    purge_service_queues()
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    return {**env, "DATABASE_URL": pg_url, "BROKER_URL": broker_url, "REDIS_URL": redis_url,
            "DATA_PATH": str(tmp_path / "data"), "ENVIRONMENT": "development"}


@pytest.mark.timeout(240)
def test_worker_counts_tasks_by_name_and_state(worker_env: dict[str, str],
                                               tmp_path: Path) -> None:
    base = free_port()
    port = metrics_port(base, ServiceQueue.INGEST)
    log = tmp_path / "worker.log"
    with recsys_process(["worker", "ingest"], {**worker_env, "WORKER_METRICS_PORT": str(base)},
                        log) as worker:
        wait_for_worker("ingest", worker, log)
        assert scrape(port) is not None, log.read_text(errors="replace")

        assert run_task("ingest.feedback", {"events": []}, timeout=60)["received"] == 0
        with pytest.raises(IngestError, match="no such file or directory"):
            run_task("ingest.load", {"source": str(tmp_path / "missing")}, timeout=60)

        # The result is stored before task_postrun fires: poll until both runs are counted.
        def counted() -> Samples | None:
            samples = scrape(port) or {}
            done = (value(samples, "recsys_worker_task_seconds_count", task="ingest.feedback")
                    and value(samples, "recsys_worker_task_seconds_count", task="ingest.load"))
            return samples if done else None

        samples = wait_for(counted, timeout=30, what=f"both tasks in :{port}/metrics")

    tasks = "recsys_worker_tasks_total"
    assert value(samples, tasks, task="ingest.feedback", state="SUCCESS") == 1
    assert value(samples, tasks, task="ingest.load", state="FAILURE") == 1
    assert value(samples, tasks, task="ingest.feedback", state="FAILURE") == 0
    assert value(samples, tasks, task="ingest.load", state="SUCCESS") == 0
    assert value(samples, "recsys_worker_task_failures_total", task="ingest.load") == 1
    assert value(samples, "recsys_worker_task_failures_total", task="ingest.feedback") == 0
    for task in ("ingest.feedback", "ingest.load"):
        assert value(samples, "recsys_worker_task_seconds_count", task=task) == 1
        assert value(samples, "recsys_worker_task_seconds_bucket", task=task, le="+Inf") == 1
        assert 0 < value(samples, "recsys_worker_task_seconds_sum", task=task) < 60


@pytest.mark.timeout(180)
def test_a_taken_metrics_port_does_not_stop_the_worker(worker_env: dict[str, str],
                                                       tmp_path: Path) -> None:
    log = tmp_path / "worker.log"
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        base = taken.getsockname()[1]
        with recsys_process(["worker", "ingest"],
                            {**worker_env, "WORKER_METRICS_PORT": str(base)}, log) as worker:
            wait_for_worker("ingest", worker, log)
            assert run_task("ingest.feedback", {"events": []}, timeout=60)["received"] == 0
    text = log.read_text(errors="replace")
    assert f"worker metrics are off: cannot listen on port {base}" in text
    assert "WORKER_METRICS_PORT" in text
