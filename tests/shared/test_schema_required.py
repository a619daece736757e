"""Every command that needs the schema says, in one line, to run `recsys db upgrade` when a
server database has none (or an older one), instead of failing inside a query."""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg2
import pytest
from alembic.script import ScriptDirectory
from sqlalchemy.engine import make_url

from shared.db.session import (
    DatabaseUnavailable,
    SchemaNotReady,
    alembic_config,
    migrate,
    require_schema,
)
from tests.conftest import FIXTURES, _admin_dsn, recsys_command

NO_SCHEMA = "has no recsys schema; run `recsys db upgrade` first"
# Every command that reads or writes the schema; the last three are long-running services.
COMMANDS = [
    ["ingest", "--source", str(FIXTURES / "ml-latest-small")],
    ["pipeline", "--stages", "all", "--source", str(FIXTURES / "ml-latest-small")],
    ["models", "list"],
    ["models", "show", "latest"],
    ["models", "promote", "1"],
    ["models", "rollback"],
    ["eval", "--model", "latest"],
    ["report", "--output", "report.html"],
    ["ab", "status"],
    ["ab", "promote"],
    ["serve", "--port", "1"],
    ["worker", "ingest"],
    ["policy"],
]


@pytest.fixture
def empty_pg_url(service_urls: dict[str, str]) -> Iterator[str]:
    """A Postgres database nobody migrated; dropped afterwards."""
    admin = psycopg2.connect(_admin_dsn(service_urls["postgres"]))
    admin.autocommit = True
    name = f"recsys_test_empty_{uuid.uuid4().hex[:12]}"
    with admin.cursor() as cursor:
        cursor.execute(f'CREATE DATABASE "{name}"')
    yield make_url(service_urls["postgres"]).set(database=name).render_as_string(
        hide_password=False)
    with admin.cursor() as cursor:
        cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.close()


def run(args: list[str], tmp_path: Path, database_url: str, broker_url: str
        ) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL",)}
    env.update(DATABASE_URL=database_url, DATA_PATH=str(tmp_path / "data"),
               MODEL_PATH=str(tmp_path / "models"), COLUMNS="80")
    if args[0] in ("worker", "policy"):  # they need a broker before anything else
        env["BROKER_URL"] = broker_url
    else:
        env.pop("BROKER_URL", None)
    return subprocess.run([*recsys_command(), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)


def test_every_command_asks_for_db_upgrade(empty_pg_url: str, broker_url: str,
                                           tmp_path: Path) -> None:
    for args in COMMANDS:
        done = run(args, tmp_path, empty_pg_url, broker_url)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 1, (args, done.stderr)
        assert len(lines) == 1 and NO_SCHEMA in lines[0], (args, done.stderr)
        assert f"/{make_url(empty_pg_url).database} " in lines[0]  # names the database
    # Nothing was made behind the user's back: the database is still empty.
    with psycopg2.connect(_admin_dsn(empty_pg_url)) as connection, connection.cursor() as cur:
        cur.execute("SELECT count(*) FROM information_schema.tables "
                    "WHERE table_schema = 'public'")
        assert cur.fetchone() == (0,)


def test_an_older_schema_names_both_revisions_and_upgrade_fixes_it(
        empty_pg_url: str, broker_url: str, tmp_path: Path) -> None:
    migrate(empty_pg_url, "0002")
    behind = run(["ingest", "--source", str(FIXTURES / "ml-latest-small")], tmp_path,
                 empty_pg_url, broker_url)
    assert behind.returncode == 1
    head = ScriptDirectory.from_config(alembic_config(empty_pg_url)).get_current_head()
    assert f"is at revision 0002, this recsys needs {head}; run `recsys db upgrade`" in \
        behind.stderr
    upgraded = run(["db", "upgrade"], tmp_path, empty_pg_url, broker_url)
    assert upgraded.returncode == 0, upgraded.stderr
    loaded = run(["ingest", "--source", str(FIXTURES / "ml-latest-small"), "--json"], tmp_path,
                 empty_pg_url, broker_url)
    assert loaded.returncode == 0, loaded.stderr
    assert json.loads(loaded.stdout.strip().splitlines()[-1])["status"] == "loaded"
    require_schema(empty_pg_url)  # at head: returns


def test_a_database_that_does_not_answer(broker_url: str, tmp_path: Path) -> None:
    """One-shot commands stop with one line; require_schema names the database."""
    url = "postgresql+psycopg2://recsys:secret@127.0.0.1:1/recsys"
    with pytest.raises(DatabaseUnavailable, match=r"127\.0\.0\.1:1/recsys did not answer"):
        require_schema(url)
    done = run(["models", "list"], tmp_path, url, broker_url)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and len(lines) == 1 and "did not answer" in lines[0]
    assert "secret" not in done.stderr


def test_a_revision_from_a_newer_release(empty_pg_url: str) -> None:
    migrate(empty_pg_url)
    with psycopg2.connect(_admin_dsn(empty_pg_url)) as connection, connection.cursor() as cur:
        cur.execute("UPDATE alembic_version SET version_num = '9999'")
    with pytest.raises(SchemaNotReady, match="revision 9999, which this recsys does not know"):
        require_schema(empty_pg_url)


def test_serve_starts_while_the_database_does_not_answer(broker_url: str,
                                                         tmp_path: Path) -> None:
    """Serve rides out a database outage (it answers from its snapshot once a model is
    loaded), so an unreachable database at start-up is a warning, not a stop."""
    import signal

    import httpx

    from tests.conftest import wait_for
    from tests.serve.conftest import free_port

    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "BROKER_URL")}
    env.update(DATABASE_URL="postgresql+psycopg2://recsys@127.0.0.1:1/recsys",
               DATA_PATH=str(tmp_path / "data"), MODEL_PATH=str(tmp_path / "models"))
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        server = subprocess.Popen([*recsys_command(), "serve", "--port", str(port),
                                   "--workers", "1"], cwd=tmp_path, env=env, stdout=out,
                                  stderr=subprocess.STDOUT, start_new_session=True)

    def alive() -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return server.poll() is not None
    try:
        wait_for(alive, timeout=120, what="recsys serve to answer /healthz")
        assert server.poll() is None, log.read_text()
        ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5)
        assert ready.status_code == 503 and not ready.json()["dependencies"]["database"]["ok"]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
    assert "warning: database postgresql+psycopg2://recsys@127.0.0.1:1/recsys did not answer" \
        in log.read_text()
