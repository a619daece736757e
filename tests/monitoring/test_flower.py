"""Flower: `recsys flower` behind basic auth, showing a real worker's tasks over RabbitMQ."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest

from shared.celery_app import app
from shared.settings import SettingsError, get_settings
from tests.conftest import purge_service_queues, recsys_command, wait_for
from tests.monitoring.helpers import free_port, recsys_process, wait_for_worker

USER, PASSWORD = "monitor", "flower-test-secret"
MONITORING_ENV = ("FLOWER_USER", "FLOWER_PASSWORD", "FLOWER_PORT", "FLOWER_BASIC_AUTH",
                  "WORKER_METRICS_PORT")


@pytest.fixture
def monitoring_env(settings_env: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in MONITORING_ENV:
        settings_env.delenv(name, raising=False)
    return settings_env


# --- settings and start-up checks ---------------------------------------------------------

@pytest.mark.parametrize("password", ["", "  ", "changeme", "recsys-dev"])
def test_production_refuses_a_missing_or_placeholder_password(
    monitoring_env: pytest.MonkeyPatch, use_settings, password: str  # type: ignore[no-untyped-def]
) -> None:
    with pytest.raises(SettingsError, match="FLOWER_PASSWORD must be set to a real secret"):
        use_settings(ENVIRONMENT="production", API_KEY="a-real-api-key",
                     FLOWER_PASSWORD=password)


def test_credentials_in_production_and_development(
    monitoring_env: pytest.MonkeyPatch, use_settings  # type: ignore[no-untyped-def]
) -> None:
    use_settings(ENVIRONMENT="production", API_KEY="a-real-api-key", FLOWER_PASSWORD=PASSWORD,
                 DASHBOARD_PASSWORD="a-real-dashboard-secret")
    assert get_settings().flower_basic_auth == f"admin:{PASSWORD}"
    monitoring_env.delenv("FLOWER_PASSWORD")
    use_settings(ENVIRONMENT="development", FLOWER_USER="ops")
    assert get_settings().flower_basic_auth == "ops:recsys-dev"


@pytest.mark.parametrize(("name", "value"), [
    ("FLOWER_USER", "a:b"), ("FLOWER_USER", ""), ("FLOWER_PASSWORD", "top,secret"),
    ("FLOWER_PORT", "0"), ("WORKER_METRICS_PORT", "-1"),
])
def test_unusable_flower_settings_name_the_variable(
    monitoring_env: pytest.MonkeyPatch, use_settings, name: str, value: str  # type: ignore[no-untyped-def]
) -> None:
    with pytest.raises(SettingsError, match=name) as caught:
        use_settings(**{name: value})
    if name == "FLOWER_PASSWORD":
        assert value not in str(caught.value)  # never echo a password


def run_recsys(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*recsys_command(), *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=60)


def test_flower_command_refuses_without_broker_or_production_password(tmp_path: Path) -> None:
    base = {k: v for k, v in os.environ.items()
            if k not in {"BROKER_URL", "ENVIRONMENT", "API_KEY", *MONITORING_ENV}}
    done = run_recsys(["flower"], base, tmp_path)
    assert done.returncode == 2, done.stderr
    assert "BROKER_URL is not set" in " ".join(done.stderr.split())  # rich wraps lines

    production = {**base, "BROKER_URL": "amqp://guest:guest@127.0.0.1:5672//",
                  "ENVIRONMENT": "production", "API_KEY": "a-real-api-key"}
    done = run_recsys(["flower"], production, tmp_path)
    assert done.returncode == 2, done.stderr
    assert "FLOWER_PASSWORD must be set to a real secret" in " ".join(done.stderr.split())


# --- against RabbitMQ, Redis and Postgres ------------------------------------------------

def flower_get(port: int, path: str, auth: tuple[str, str] | None = (USER, PASSWORD),
               **params: Any) -> httpx.Response:
    return httpx.get(f"http://127.0.0.1:{port}{path}", auth=auth, params=params, timeout=10)


def answers(port: int) -> bool:
    try:
        flower_get(port, "/", auth=None)
    except httpx.TransportError:
        return False
    return True


@pytest.mark.timeout(240)
def test_flower_needs_auth_and_lists_a_workers_tasks(
    monitoring_env: pytest.MonkeyPatch, use_settings, pg_url: str,  # type: ignore[no-untyped-def]
    broker_url: str, redis_url: str, tmp_path: Path,
) -> None:
    use_settings(DATABASE_URL=pg_url, BROKER_URL=broker_url, REDIS_URL=redis_url)
    purge_service_queues()
    port = free_port()
    env = {**os.environ, "DATABASE_URL": pg_url, "BROKER_URL": broker_url,
           "REDIS_URL": redis_url, "DATA_PATH": str(tmp_path / "data"),
           "ENVIRONMENT": "development"}
    flower_env = {**env, "FLOWER_USER": USER, "FLOWER_PASSWORD": PASSWORD,
                  "FLOWER_PORT": str(port)}
    flower_log, worker_log = tmp_path / "flower.log", tmp_path / "worker.log"

    with recsys_process(["flower"], flower_env, flower_log) as flower:
        wait_for(lambda: flower.poll() is not None or answers(port), timeout=60,
                 what=f"Flower to listen on port {port}")
        assert flower.poll() is None, flower_log.read_text(errors="replace")

        anonymous = flower_get(port, "/", auth=None)
        assert anonymous.status_code == 401
        assert anonymous.headers["WWW-Authenticate"].startswith("Basic")
        assert flower_get(port, "/", auth=(USER, "wrong")).status_code == 401
        assert flower_get(port, "/api/tasks", auth=None).status_code == 401
        assert flower_get(port, "/").status_code == 200
        assert PASSWORD not in " ".join(Path(f"/proc/{flower.pid}/cmdline").read_text()
                                        .split("\0"))  # not on the command line

        with recsys_process(["worker", "ingest"], env, worker_log) as worker:
            wait_for_worker("ingest", worker, worker_log)
            # The worker's heartbeat events reach Flower: its event receiver is listening.
            wait_for(lambda: any(name.startswith("ingest@") for name in
                                 flower_get(port, "/api/workers", status="true").json()),
                     timeout=60, what="Flower to see the ingest worker's events")

            failed = app.send_task("ingest.load", kwargs={"source": str(tmp_path / "missing")},
                                   queue="ingest")
            succeeded = app.send_task("ingest.feedback", kwargs={"events": []}, queue="ingest")
            failed.get(timeout=60, propagate=False)
            assert failed.state == "FAILURE", failed.result
            assert succeeded.get(timeout=60)["received"] == 0

            def listed() -> dict[str, Any] | None:
                tasks = flower_get(port, "/api/tasks", limit="1000").json()
                ours = {key: tasks.get(key) for key in (failed.id, succeeded.id)}
                done = all(task and task.get("state") in {"FAILURE", "SUCCESS"}
                           for task in ours.values())
                return ours if done else None

            tasks = wait_for(listed, timeout=60, interval=0.5,
                             what="Flower's /api/tasks to list both tasks as finished")

    assert tasks[failed.id]["name"] == "ingest.load"
    assert tasks[failed.id]["state"] == "FAILURE"
    assert "no such file or directory" in tasks[failed.id]["exception"]
    assert tasks[succeeded.id]["name"] == "ingest.feedback"
    assert tasks[succeeded.id]["state"] == "SUCCESS"
    assert all(task["worker"].startswith("ingest@") for task in tasks.values())
