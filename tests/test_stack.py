"""`recsys stack`: compose's app services as local processes, against the real servers."""

from __future__ import annotations

import json
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg2
import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from recsys.cli import app as cli_app
from recsys.stack import (
    StackError,
    down,
    interpolate,
    local_command,
    local_environment,
    localize,
    pid_alive,
    start_order,
    status,
    up,
)
from shared.celery_app import app as celery_app
from shared.celery_app import configure_app
from shared.settings import Settings
from tests.conftest import SERVICE_URLS, purge_service_queues, wait_for
from tests.dashboard.conftest import log_in
from tests.serve.conftest import free_port

# The machine's own servers (in compose they are the postgres/rabbitmq/redis services).
POSTGRES_ADMIN = {"host": "127.0.0.1", "port": 5432, "user": "postgres", "dbname": "postgres"}
BROKER_URL = SERVICE_URLS["rabbitmq"]  # this run's own virtual host (tests/conftest.py)
REDIS_URL = SERVICE_URLS["redis"]


# --- pure parts: interpolation, rewriting, ordering -----------------------------------

def test_interpolation_follows_compose() -> None:
    env = {"SET": "x", "EMPTY": ""}
    assert interpolate("${SET:-d}|${UNSET:-d}|${EMPTY:-d}|${EMPTY-d}", env) == "x|d|d|"
    assert interpolate("${UNSET:-${SET}}-$SET-$$SET-${SET:+alt}-${EMPTY:+alt}", env) == \
        "x-x-$SET-alt-"
    with pytest.raises(StackError, match="NEEDED is required by the compose file: say so"):
        interpolate("${NEEDED:?say so}", env)
    with pytest.raises(StackError, match="unclosed"):
        interpolate("${OPEN", env)


def test_localize_rewrites_hosts_to_published_ports_and_mounts_to_host_dirs() -> None:
    hosts = {"postgres": {5432: 15432}, "rabbitmq": {}}
    mounts = [("/models", Path("/srv/models")), ("/data", Path("/srv/data"))]
    assert localize("postgresql+psycopg2://u:p@postgres:5432/db", hosts, mounts) == \
        "postgresql+psycopg2://u:p@127.0.0.1:15432/db"
    assert localize("amqp://u:p@rabbitmq:5672//", hosts, mounts) == "amqp://u:p@127.0.0.1:5672//"
    assert localize("redis://elsewhere:6379/0", hosts, mounts) == "redis://elsewhere:6379/0"
    assert localize("/data/ml-100k.zip", hosts, mounts) == "/srv/data/ml-100k.zip"
    assert localize("/models", hosts, mounts) == "/srv/models"
    assert localize("/datasets", hosts, mounts) == "/datasets"


def test_caller_connection_settings_win(tmp_path: Path) -> None:
    spec = {"environment": {"DATABASE_URL": "postgresql://u@postgres:5432/recsys",
                            "REDIS_URL": "redis://redis:6379/0", "ENVIRONMENT": "development"},
            "volumes": ["models:/models"]}
    caller = {"DATABASE_URL": "postgresql://me@127.0.0.1:5432/scratch", "ENVIRONMENT": "x",
              "PATH": "/bin"}
    env = local_environment(spec, caller, {"postgres": {}, "redis": {}}, tmp_path)
    assert env["DATABASE_URL"] == caller["DATABASE_URL"]
    assert env["REDIS_URL"] == "redis://127.0.0.1:6379/0"
    assert env["ENVIRONMENT"] == "development"  # not a connection: compose's value wins
    assert env["PATH"] == "/bin"


def test_start_order_puts_dependencies_and_one_shots_first() -> None:
    apps = {
        "serve": {"depends_on": ["migrate"]},
        "ingest": {"depends_on": {"migrate": {"condition": "service_completed_successfully"},
                                  "rabbitmq": {"condition": "service_healthy"}}},
        "migrate": {"restart": "no", "depends_on": {"postgres": {}}},
        "seed": {"restart": False},
    }
    assert start_order(apps, ["ingest"]) == ["migrate", "ingest"]
    assert start_order(apps, apps) == ["migrate", "seed", "ingest", "serve"]
    with pytest.raises(StackError, match="dependency cycle"):
        start_order({"a": {"depends_on": ["b"]}, "b": {"depends_on": ["a"]}}, ["a"])


def test_a_published_service_listens_where_compose_publishes_it() -> None:
    spec = {"command": ["dashboard", "--host", "0.0.0.0", "--port", "8050"],
            "ports": ["127.0.0.1:18050:8050"]}
    assert local_command(spec) == ["dashboard", "--host", "127.0.0.1", "--port", "18050"]
    spec = {"command": "serve --host 0.0.0.0 --port 8000 --workers 2",
            "ports": [{"target": 8000, "published": 8001}]}
    assert local_command(spec) == ["serve", "--host", "127.0.0.1", "--port", "8001",
                                   "--workers", "2"]
    assert local_command({"command": ["worker", "ingest"]}) == ["worker", "ingest"]


# --- against the real Postgres, RabbitMQ and Redis -------------------------------------

def admin_connection() -> Any:
    try:
        connection = psycopg2.connect(connect_timeout=5, **POSTGRES_ADMIN)
    except psycopg2.OperationalError as error:
        pytest.fail(f"Postgres at {POSTGRES_ADMIN['host']}:{POSTGRES_ADMIN['port']} is not "
                    f"reachable (the stack tests need it): {error}")
    connection.autocommit = True
    return connection


@pytest.fixture
def scratch_database() -> Iterator[str]:
    """A fresh Postgres database for one test, dropped afterwards; yields its URL."""
    name = f"recsys_stack_{uuid.uuid4().hex[:10]}"
    connection = admin_connection()
    with connection.cursor() as cursor:
        cursor.execute(f'CREATE DATABASE "{name}"')
    try:
        yield (f"postgresql+psycopg2://{POSTGRES_ADMIN['user']}@{POSTGRES_ADMIN['host']}:"
               f"{POSTGRES_ADMIN['port']}/{name}")
    finally:
        with connection.cursor() as cursor:
            cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        connection.close()


def stack_env(database_url: str, tmp_path: Path) -> dict[str, str]:
    return {"DATABASE_URL": database_url, "BROKER_URL": BROKER_URL, "REDIS_URL": REDIS_URL,
            "DATA_PATH": str(tmp_path / "data"), "MODEL_PATH": str(tmp_path / "models")}


def answering_workers(prefix: str, pid: int, timeout: float) -> dict[str, int]:
    """Pids of the `<prefix>@...` workers answering on the broker, polled until `pid` is
    among them or `timeout` passes."""
    configure_app(Settings(broker_url=BROKER_URL, redis_url=REDIS_URL))
    deadline = time.monotonic() + timeout
    found: dict[str, int] = {}
    while time.monotonic() < deadline and pid not in found.values():
        # ping first (what operators run), then stats for the pid: other workers on this
        # shared broker may carry the same node name, and only the pid says which is ours.
        pongs = celery_app.control.ping(timeout=1.0)
        if any(node.startswith(f"{prefix}@") for reply in pongs for node in reply):
            for reply in celery_app.control.broadcast("stats", reply=True, timeout=1.0):
                for node, stats in reply.items():
                    if node.startswith(f"{prefix}@"):
                        found[f"{node} pid {stats['pid']}"] = int(stats["pid"])
    return found


@pytest.mark.timeout(180)
def test_up_migrates_starts_the_ingest_worker_and_down_stops_it(
    scratch_database: str, tmp_path: Path
) -> None:
    state = tmp_path / "stack"
    env = stack_env(scratch_database, tmp_path)
    configure_app(Settings(broker_url=BROKER_URL, redis_url=REDIS_URL))
    purge_service_queues()  # leftovers of other tests must not reach this worker
    try:
        rows = up(["ingest"], state_dir=state, env=env)
        assert [(r["name"], r["state"]) for r in rows] == [("migrate", "completed"),
                                                            ("ingest", "started")]

        engine = sa.create_engine(scratch_database, poolclass=sa.pool.NullPool)
        try:
            tables = set(sa.inspect(engine).get_table_names())
        finally:
            engine.dispose()
        assert {"alembic_version", "movie", "rating", "ingest_batch"} <= tables

        running = {r["name"]: r for r in status(state)}
        assert running["ingest"]["running"] is True
        assert running["ingest"]["command"] == "recsys worker ingest"
        assert running["migrate"]["state"] == "completed"
        assert Path(running["ingest"]["log"]).is_file()
        assert (state / "ingest.pid").read_text().strip() == str(running["ingest"]["pid"])

        pids = answering_workers("ingest", running["ingest"]["pid"], timeout=60)
        assert running["ingest"]["pid"] in pids.values(), (
            f"no ingest@ worker with pid {running['ingest']['pid']} answered; got {pids}; log:\n"
            + Path(running["ingest"]["log"]).read_text())

        cli = CliRunner().invoke(cli_app, ["stack", "status", "--json", "--state-dir",
                                           str(state)])
        assert cli.exit_code == 0, cli.output
        listed = json.loads(cli.output.strip().splitlines()[-1])["services"]
        assert {r["name"]: r["running"] for r in listed} == {"migrate": False, "ingest": True}

        # A second `up` leaves the running worker alone.
        again = {r["name"]: r for r in up(["ingest"], state_dir=state, env=env)}
        assert again["ingest"]["state"] == "already running"
        assert again["ingest"]["pid"] == running["ingest"]["pid"]
    finally:
        stopped = down(state, timeout=20)
        configure_app()

    assert [(r["name"], r["running"]) for r in stopped] == [("ingest", False)]
    after = {r["name"]: r for r in status(state)}
    assert after["ingest"]["running"] is False
    assert after["ingest"]["state"] == "stopped"
    assert not pid_alive(after["ingest"]["pid"])
    assert not (state / "ingest.pid").exists()
    assert down(state) == []


def test_up_names_the_server_it_cannot_reach(tmp_path: Path) -> None:
    env = stack_env("postgresql+psycopg2://postgres@127.0.0.1:5432/postgres", tmp_path)
    env["BROKER_URL"] = "amqp://guest:secret@127.0.0.1:1//"
    with pytest.raises(StackError) as caught:
        up(["ingest"], state_dir=tmp_path / "stack", env=env)
    message = str(caught.value)
    assert "RabbitMQ (BROKER_URL=amqp://guest:***@127.0.0.1:1//) is not reachable" in message
    assert "secret" not in message
    assert "Postgres" not in message and "Redis" not in message  # those two are fine
    assert status(tmp_path / "stack") == []


def test_a_failing_one_shot_stops_up(tmp_path: Path) -> None:
    compose = tmp_path / "docker-compose.yml"
    compose.write_text(
        "services:\n"
        "  migrate:\n"
        "    build: .\n"
        "    command: [db, upgrade, no-such-revision]\n"
        "    restart: 'no'\n"
        "  ingest:\n"
        "    build: .\n"
        "    command: [worker, ingest]\n"
        "    depends_on:\n"
        "      migrate: {condition: service_completed_successfully}\n"
    )
    env = stack_env(f"sqlite:///{tmp_path / 'recsys.sqlite3'}", tmp_path)
    state = tmp_path / "stack"
    with pytest.raises(StackError, match=r"one-shot service migrate \(recsys db upgrade "
                                         r"no-such-revision\) failed with exit code \d+"):
        up(state_dir=state, env=env, compose_file=compose)
    assert [(r["name"], r["running"]) for r in status(state)] == [("migrate", False)]


def test_a_failing_one_shot_stops_what_up_had_started(tmp_path: Path) -> None:

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    compose = tmp_path / "docker-compose.yml"
    compose.write_text(
        "services:\n"
        "  serve:\n"
        "    build: .\n"
        f"    command: [serve, --host, 127.0.0.1, --port, '{port}', --workers, '1']\n"
        "  bootstrap:\n"
        "    build: .\n"
        "    command: [db, upgrade, no-such-revision]\n"
        "    restart: 'no'\n"
        "    depends_on:\n"
        "      serve: {condition: service_started}\n"
    )
    env = stack_env(f"sqlite:///{tmp_path / 'recsys.sqlite3'}", tmp_path)
    state = tmp_path / "stack"
    with pytest.raises(StackError, match=r"one-shot service bootstrap"):
        up(state_dir=state, env=env, compose_file=compose)
    rows = {r["name"]: r for r in status(state)}
    assert rows["serve"]["running"] is False and rows["serve"]["state"] == "stopped"
    with socket.socket() as probe:  # nothing listens there any more
        assert probe.connect_ex(("127.0.0.1", port)) != 0


@pytest.mark.timeout(240)
def test_up_starts_the_dashboard_on_its_published_port(scratch_database: str,
                                                       tmp_path: Path) -> None:
    port = free_port()
    env = {**stack_env(scratch_database, tmp_path), "DASHBOARD_PORT": str(port),
           "DASHBOARD_USER": "operator", "DASHBOARD_PASSWORD": "stack-test-password"}
    state = tmp_path / "stack"
    try:
        rows = up(["dashboard"], state_dir=state, env=env)
        assert [(r["name"], r["state"]) for r in rows] == [("migrate", "completed"),
                                                            ("dashboard", "started")]
        assert rows[1]["command"] == f"recsys dashboard --host 127.0.0.1 --port {port}"
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            def answers() -> bool:
                try:
                    return client.get("/login").status_code == 200
                except httpx.TransportError:
                    return False

            wait_for(answers, timeout=120, what="the stack's dashboard to answer")
            assert client.get("/").status_code == 303  # behind the login
            assert log_in(client, "stack-test-password", "operator").status_code == 303
            overview = client.get("/")
            assert overview.status_code == 200 and 'data-count="ratings"' in overview.text
    finally:
        stopped = down(state, timeout=20)
    assert [(r["name"], r["running"]) for r in stopped] == [("dashboard", False)]
