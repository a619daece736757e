"""Fixtures for the real services: Postgres, RabbitMQ, Redis, and the MovieLens data.

Addresses come from the environment (TEST_POSTGRES_URL, TEST_BROKER_URL, TEST_REDIS_URL),
defaulting to the standard local ports. Where a service is unreachable and a Docker
engine is present, testcontainers starts it; otherwise the test fails (never skips).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import psycopg2
import pytest
from sqlalchemy.engine import make_url

from tests.servers import (
    PrivateRabbitMQ,
    PrivateSeaweedFS,
    private_rabbitmq,
    private_seaweedfs,
    rabbitmq_available,
)

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
SERVICE_URLS = {
    "postgres": os.environ.get(
        "TEST_POSTGRES_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"
    ),
    "rabbitmq": os.environ.get("TEST_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//"),
    "redis": os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/15"),
}
CONTAINERS = {
    "postgres": ("testcontainers.postgres", "PostgresContainer", "postgres:16", 5432),
    "rabbitmq": ("testcontainers.rabbitmq", "RabbitMqContainer", "rabbitmq:3-management", 5672),
    "redis": ("testcontainers.redis", "RedisContainer", "redis:7", 6379),
}


def _rabbitmqctl(*args: str) -> bool:
    try:
        done = subprocess.run(["rabbitmqctl", "-q", *args], capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def pytest_configure(config: pytest.Config) -> None:
    """A RabbitMQ virtual host of this run's own, where rabbitmqctl can make one: the
    service queues have fixed names, and another run's workers on the same broker must
    not take this run's tasks. Without rabbitmqctl the default virtual host serves."""
    url = urlparse(SERVICE_URLS["rabbitmq"])
    if url.hostname not in ("127.0.0.1", "localhost") or shutil.which("rabbitmqctl") is None:
        return
    vhost = f"recsys_test_{uuid.uuid4().hex[:10]}"
    user = url.username or "guest"
    if _rabbitmqctl("add_vhost", vhost) and _rabbitmqctl(
            "set_permissions", "-p", vhost, user, ".*", ".*", ".*"):
        SERVICE_URLS["rabbitmq"] = url._replace(path=f"/{vhost}").geturl()
        config._recsys_vhost = vhost  # type: ignore[attr-defined]


def pytest_unconfigure(config: pytest.Config) -> None:
    vhost = getattr(config, "_recsys_vhost", None)
    if vhost:
        _rabbitmqctl("delete_vhost", vhost)


def port_open(port: int, host: str = "127.0.0.1", timeout: float = 0.5) -> bool:
    """Whether something accepts TCP connections there (a service up, or not yet down)."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _reachable(url: str, timeout: float = 2.0) -> bool:
    parsed = urlparse(url.replace("postgresql+psycopg2", "postgresql"))
    return port_open(parsed.port, parsed.hostname, timeout)  # type: ignore[arg-type]


def _docker_available() -> bool:
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "info"], capture_output=True).returncode == 0


@pytest.fixture(scope="session")
def service_urls() -> Iterator[dict[str, str]]:
    """URLs of the three services, started in containers only where absent and possible."""
    urls, started = dict(SERVICE_URLS), []
    for name, url in SERVICE_URLS.items():
        if _reachable(url):
            continue
        if not _docker_available():
            pytest.fail(
                f"{name} is unreachable at {url} and no Docker engine can start it; "
                "start the service (see README) or set TEST_*_URL",
                pytrace=False,
            )
        module, cls, image, port = CONTAINERS[name]
        container = getattr(__import__(module, fromlist=[cls]), cls)(image)
        container.start()
        started.append(container)
        host, mapped = container.get_container_host_ip(), container.get_exposed_port(port)
        urls[name] = {
            "postgres": f"postgresql+psycopg2://test:test@{host}:{mapped}/test",
            "rabbitmq": f"amqp://guest:guest@{host}:{mapped}//",
            "redis": f"redis://{host}:{mapped}/15",
        }[name]
    yield urls
    for container in started:
        container.stop()


def _admin_dsn(url: str) -> str:
    parsed = make_url(url)
    return (
        f"host={parsed.host} port={parsed.port or 5432} user={parsed.username or 'postgres'}"
        f" dbname={parsed.database or 'postgres'}"
        + (f" password={parsed.password}" if parsed.password else "")
    )


@pytest.fixture
def pg_url(service_urls: dict[str, str]) -> Iterator[str]:
    """A fresh, migrated Postgres database for one test; dropped afterwards."""
    from shared.db.session import migrate

    admin = psycopg2.connect(_admin_dsn(service_urls["postgres"]))
    admin.autocommit = True
    name = f"recsys_test_{uuid.uuid4().hex[:12]}"
    with admin.cursor() as cursor:
        cursor.execute(f'CREATE DATABASE "{name}"')
    url = (
        make_url(service_urls["postgres"]).set(database=name).render_as_string(hide_password=False)
    )
    migrate(url)
    yield url
    from shared.db.session import engine_for

    engine_for(url).dispose()
    with admin.cursor() as cursor:
        cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.close()


@pytest.fixture
def broker_url(service_urls: dict[str, str]) -> str:
    return service_urls["rabbitmq"]


@pytest.fixture
def redis_url(service_urls: dict[str, str]) -> str:
    return service_urls["redis"]


@pytest.fixture
def settings_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[pytest.MonkeyPatch]:
    """Environment for settings: embedded defaults under a temp DATA_PATH; tests add URLs.

    Call `apply()` (returned by `use_settings`) after setting variables.
    """
    for name in (
        "DATABASE_URL",
        "BROKER_URL",
        "REDIS_URL",
        "API_KEY",
        "MODEL_VERSION",
        "EVAL_K_VALUES",
        "EVAL_SPLIT_DATE",
        "ENVIRONMENT",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DATA_PATH", str(tmp_path / "data"))
    monkeypatch.setenv("MODEL_PATH", str(tmp_path / "models"))
    monkeypatch.chdir(tmp_path)  # no stray .env from the checkout
    yield monkeypatch
    monkeypatch.undo()
    _reset_settings()


def _reset_settings() -> None:
    from shared.celery_app import configure_app
    from shared.settings import get_settings

    get_settings.cache_clear()
    configure_app()


@pytest.fixture
def use_settings(settings_env: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """Set environment variables and make them the settings in force."""

    def apply(**env: str) -> None:
        for key, value in env.items():
            settings_env.setenv(key, value)
        _reset_settings()

    return apply


@pytest.fixture(scope="session")
def ml100k() -> Path:
    """The real MovieLens 100K, from DATA_SOURCE or ../shared beside the checkout."""
    path = Path(os.environ.get("ML100K_PATH", ROOT.parent / "shared" / "datasets" / "ml-100k"))
    if not (path / "u.data").exists():
        pytest.fail(f"MovieLens 100K not found at {path}; set ML100K_PATH", pytrace=False)
    return path


def recsys_command() -> list[str]:
    """The installed `recsys` entry point of this interpreter's environment."""
    candidate = Path(sys.executable).parent / "recsys"
    return [str(candidate)] if candidate.exists() else [sys.executable, "-m", "recsys.cli"]


def wait_for(predicate, timeout: float = 60.0, interval: float = 0.2, what: str = "condition"):  # type: ignore[no-untyped-def]
    """Poll until `predicate()` is truthy; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


def purge_service_queues() -> None:
    """Declare every service queue as the workers do and empty it, so a worker started
    by a test sees only that test's tasks."""
    from shared.celery_app import purge_queues

    purge_queues()


@pytest.fixture
def private_broker() -> Iterator[PrivateRabbitMQ]:
    """A RabbitMQ node of this test's own (see tests/servers.py), started, yielded as the
    `PrivateRabbitMQ` (`.url`, `.stop()`, `.start()`), shut down and removed after."""
    if not rabbitmq_available():
        pytest.fail("rabbitmq-server is not installed; outage tests need one of their own",
                    pytrace=False)
    with private_rabbitmq() as broker:
        yield broker


@pytest.fixture(scope="session")
def s3_server() -> Iterator[PrivateSeaweedFS]:
    """A SeaweedFS S3 gateway of this run's own (see tests/servers.py), for the session."""
    with private_seaweedfs() as server:
        yield server


@pytest.fixture
def s3_bucket(s3_server: PrivateSeaweedFS) -> str:
    """A fresh, empty bucket on the session's S3 server."""
    name = f"recsys-{uuid.uuid4().hex[:12]}"
    s3_server.create_bucket(name)
    return name
