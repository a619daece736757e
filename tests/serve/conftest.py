"""Fixtures for serve: a registry with trained ml-100k models, the app, a live server, and
private Redis and Postgres servers a test may stop and start (tests/servers.py; the
shared servers are never stopped).

The models are built once per session into a template database; each test gets its own
copy (CREATE DATABASE ... TEMPLATE, or a dump restored into a private cluster), so tests
may promote, post feedback and stop servers without seeing each other. Artifacts are
content-addressed and read-only, so shared.
"""

from __future__ import annotations

import socket
import subprocess
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg2
import pytest
import uvicorn
from fastapi.testclient import TestClient
from sqlalchemy.engine import make_url

from tests.conftest import (
    _admin_dsn,
    _reset_settings,
    purge_service_queues,
    recsys_command,
    wait_for,
)
from tests.servers import PrivatePostgres, PrivateRedis, private_postgres, private_redis

API_KEY = "serve-test-key"


@dataclass(frozen=True)
class World:
    """The session's registry: versions by name, in the template database."""

    template: str
    model_path: Path
    versions: dict[str, int]  # als, als_wide, itemknn, sparse_ease
    movies: dict[int, tuple[str, str]]  # movie id -> (title, genres)


def _drop_or_create(url: str, statement: str) -> None:
    """Run CREATE/DROP DATABASE on a fresh connection (a test may have restarted Postgres)."""
    connection = psycopg2.connect(_admin_dsn(url))
    connection.autocommit = True
    try:
        with connection.cursor() as cursor:
            cursor.execute(statement)
    finally:
        connection.close()


@pytest.fixture(scope="session")
def world(service_urls: dict[str, str], ml100k: Path,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """ml-100k ingested, snapshotted, five models registered, v1 (ALS) the champion."""
    from services.ingest.ingest import ingest_source
    from services.registry import registry
    from services.train.training import fit_on_snapshot, load_snapshot
    from services.transform.snapshot import SnapshotParams, build_snapshot
    from shared.db.session import engine_for, migrate

    root = tmp_path_factory.mktemp("serve-world")
    name = f"recsys_serve_tpl_{uuid.uuid4().hex[:10]}"
    _drop_or_create(service_urls["postgres"], f'CREATE DATABASE "{name}"')
    url = make_url(service_urls["postgres"]).set(database=name).render_as_string(
        hide_password=False)
    with pytest.MonkeyPatch.context() as patch:
        for variable in ("BROKER_URL", "REDIS_URL", "API_KEY", "MODEL_VERSION", "ENVIRONMENT"):
            patch.delenv(variable, raising=False)
        patch.setenv("DATABASE_URL", url)
        patch.setenv("MODEL_PATH", str(root / "models"))
        patch.setenv("DATA_PATH", str(root / "data"))
        _reset_settings()
        migrate(url)
        ingest_source(str(ml100k))
        snapshot = build_snapshot(SnapshotParams.from_settings())
        data = load_snapshot(snapshot)
        versions = {}
        for label, algorithm, params in (
                ("als", "als", {"factors": 16, "iterations": 6}),
                ("als_wide", "als", {"factors": 32, "iterations": 6}),
                ("itemknn", "itemknn_cosine", {}),
                ("sparse_ease", "sparse_ease", {}),
                ("ease_als", "ease_als", {})):
            fitted = fit_on_snapshot(data, algorithm, params)
            versions[label] = registry.register(
                snapshot["snapshot_id"], algorithm, fitted["params"], fitted["artifact_path"],
                fitted["sha256"])["version"]
        registry.promote(versions["als"], reason="serve tests")
        with engine_for(url).connect() as conn:
            movies = {row[0]: (row[1], row[2]) for row in conn.exec_driver_sql(
                "SELECT id, title, genres FROM movie")}
        engine_for(url).dispose()
        from shared.db.session import get_engine

        get_engine().dispose()
    _reset_settings()
    yield World(name, root / "models", versions, movies)
    _drop_or_create(service_urls["postgres"], f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def serve_db(world: World, service_urls: dict[str, str]) -> Iterator[str]:
    """A private copy of the world's database for one test."""
    name = f"recsys_serve_{uuid.uuid4().hex[:12]}"
    _drop_or_create(service_urls["postgres"],
                    f'CREATE DATABASE "{name}" TEMPLATE "{world.template}"')
    url = make_url(service_urls["postgres"]).set(database=name).render_as_string(
        hide_password=False)
    yield url
    from shared.db.session import engine_for

    engine_for(url).dispose()
    _drop_or_create(service_urls["postgres"], f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def serve_env(use_settings, serve_db: str, broker_url: str, redis_url: str,  # type: ignore[no-untyped-def]
              world: World) -> dict[str, str]:
    """Settings of a serve process on the real servers, with its own cache namespace."""
    env = {"DATABASE_URL": serve_db, "BROKER_URL": broker_url, "REDIS_URL": redis_url,
           "MODEL_PATH": str(world.model_path), "API_KEY": API_KEY,
           "CACHE_PREFIX": f"t{uuid.uuid4().hex[:10]}", "IMPRESSION_FLUSH_SECONDS": "0.2",
           "MODEL_POLL_SECONDS": "0"}
    use_settings(**env)
    return env


@contextmanager
def app_client() -> Iterator[TestClient]:
    """The app in-process on the settings in force (its lifespan runs: model loaded,
    listener subscribed)."""
    from services.serve.app import create_app

    with TestClient(create_app(), headers={"X-API-Key": API_KEY}) as test_client:
        wait_for(lambda: test_client.app.state.runtime.listener.subscribed.is_set(),
                 timeout=20, what="the model.promoted listener to subscribe")
        yield test_client


@pytest.fixture
def client(serve_env: dict[str, str]) -> Iterator[TestClient]:
    """The app in-process (its lifespan runs: model loaded, listener subscribed)."""
    with app_client() as test_client:
        yield test_client


@pytest.fixture
def private_cache(serve_env: dict[str, str], use_settings  # type: ignore[no-untyped-def]
                  ) -> Iterator[tuple[dict[str, str], PrivateRedis]]:
    """serve_env on a Redis of this test's own, which the test may stop and start."""
    with private_redis() as cache:
        env = {**serve_env, "REDIS_URL": cache.url}
        use_settings(**env)
        yield env, cache


@pytest.fixture
def private_database(serve_env: dict[str, str], world: World, service_urls: dict[str, str],
                     use_settings  # type: ignore[no-untyped-def]
                     ) -> Iterator[tuple[dict[str, str], PrivatePostgres]]:
    """serve_env on a Postgres cluster of this test's own holding a copy of the world's
    database (pg_dump of the template, restored), which the test may stop and start."""
    from shared.db.session import engine_for

    with private_postgres() as postgres:
        source = make_url(service_urls["postgres"])
        dump = subprocess.run(
            ["pg_dump", "--no-owner", "-h", source.host or "127.0.0.1",
             "-p", str(source.port or 5432), "-U", source.username or "postgres",
             "-d", world.template], capture_output=True, check=True, timeout=300)
        subprocess.run(["psql", "-q", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1",
                        "-p", str(postgres.port), "-U", "postgres", "-d", "postgres"],
                       input=dump.stdout, capture_output=True, check=True, timeout=300)
        env = {**serve_env, "DATABASE_URL": postgres.url}
        use_settings(**env)
        yield env, postgres
        engine_for(postgres.url).dispose()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def live_server(app: Any) -> Iterator[str]:
    """The app under a real uvicorn on a free loopback port, in a thread."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                           log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started, timeout=60, what="uvicorn to start")
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


def genres_of(world: World, movie_id: int) -> set[str]:
    return {g for g in world.movies[movie_id][1].split("|") if g}


def worker_pids(service: str) -> set[int]:
    """Pids of the `<service>@...` Celery workers answering on this broker (any test run's)."""
    from shared.celery_app import app

    replies = app.control.broadcast("stats", reply=True, timeout=1.0)
    return {int(stats["pid"]) for reply in replies for node, stats in reply.items()
            if node.startswith(f"{service}@")}


def worker_log(worker: subprocess.Popen, lines: int = 80) -> str:
    text = Path(worker.log_path).read_text(errors="replace")  # type: ignore[attr-defined]
    return "\n".join(text.splitlines()[-lines:])


@contextmanager
def celery_worker(service: str, env: dict[str, str], folder: Path
                  ) -> Iterator[subprocess.Popen]:
    """A real `recsys worker <service>` process, answering on the broker, stopped after.

    Another test run sharing this broker may run a worker of the same node name, which
    would stop ours starting and take our messages: wait for it to finish first."""
    import os
    import signal

    wait_for(lambda: not worker_pids(service), timeout=300,
             what=f"another {service} worker on this broker to stop")
    purge_service_queues()
    log_path = folder / f"{service}-worker.log"
    with log_path.open("w") as log:
        worker = subprocess.Popen([*recsys_command(), "worker", service],
                                  env={**os.environ, **env, "DATA_PATH": str(folder)},
                                  stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        worker.log_path = log_path  # type: ignore[attr-defined]
        try:
            wait_for(lambda: worker.pid in worker_pids(service) or worker.poll() is not None,
                     timeout=60, what=f"our {service} worker to answer")
            assert worker.poll() is None, f"the {service} worker exited:\n{worker_log(worker)}"
            yield worker
        finally:
            if worker.poll() is None:
                os.killpg(worker.pid, signal.SIGTERM)
                worker.wait(timeout=30)


@contextmanager
def serve_process(env: dict[str, str], folder: Path, workers: int = 2) -> Iterator[str]:
    """`recsys serve --workers N` as a real process on a free loopback port, ready (a model
    loaded), stopped after; yields its base URL."""
    import os
    import signal

    import httpx

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    environment = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    log_path = folder / "serve.log"

    def ready() -> bool:
        try:
            return httpx.get(f"{base}/readyz", timeout=2).json().get("ready") is True
        except (httpx.HTTPError, ValueError):
            return False

    with log_path.open("w") as log:
        server = subprocess.Popen(
            [*recsys_command(), "serve", "--port", str(port), "--workers", str(workers),
             "--log-level", "warning"], env={**environment, **env}, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_for(lambda: ready() or server.poll() is not None, timeout=120,
                     what="recsys serve to be ready")
            assert server.poll() is None, log_path.read_text()[-3000:]
            yield base
        finally:
            if server.poll() is None:
                os.killpg(server.pid, signal.SIGTERM)
                try:
                    server.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    os.killpg(server.pid, signal.SIGKILL)
                    server.wait(timeout=10)
