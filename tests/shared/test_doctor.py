"""`recsys doctor` against the real services, and against private ones each stopped in turn."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import recsys_command
from tests.ingest.test_embedded import embedded_env
from tests.servers import private_postgres, private_rabbitmq, private_redis, stopped


def doctor(env: dict[str, str], cwd: Path) -> tuple[int, dict[str, Any], str]:
    done = subprocess.run([*recsys_command(), "doctor", "--json"], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=120)
    report = json.loads(done.stdout.strip().splitlines()[-1])
    return done.returncode, report, done.stdout + done.stderr


def status(report: dict[str, Any]) -> dict[str, bool | None]:
    return {c["name"]: c["ok"] for c in report["checks"]}


@pytest.fixture
def served(pg_url: str, broker_url: str, redis_url: str, tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("DATABASE_URL", "BROKER_URL", "REDIS_URL", "API_KEY")}
    return {**env, "DATABASE_URL": pg_url, "BROKER_URL": broker_url, "REDIS_URL": redis_url,
            "DATA_PATH": str(tmp_path / "data"), "MODEL_PATH": str(tmp_path / "models"),
            "API_KEY": "doctor-secret-key"}


def test_every_server_reached_and_the_first_fix_is_the_missing_workers(
        served: dict[str, str], tmp_path: Path) -> None:
    code, report, text = doctor(served, tmp_path)
    checks = status(report)
    assert {k: checks[k] for k in ("settings", "database", "schema", "broker", "cache",
                                   "artifact store")} == dict.fromkeys(
        ("settings", "database", "schema", "broker", "cache", "artifact store"), True)
    assert code == 1 and checks["workers"] is False
    assert report["first_problem"]["name"] == "workers"
    assert report["first_problem"]["fix"].startswith("start `recsys worker ingest`")
    assert checks["champion"] is False  # and nothing trained yet
    # Secrets are masked, in the settings and in every URL shown.
    assert report["settings"]["API_KEY"] == "***" and "doctor-secret-key" not in text


PRIVATE_SERVERS = {"database": (private_postgres, "DATABASE_URL",
                                 "start Postgres or correct DATABASE_URL"),
                   "broker": (private_rabbitmq, "BROKER_URL",
                              "start RabbitMQ or correct BROKER_URL"),
                   "cache": (private_redis, "REDIS_URL", "start Redis or correct REDIS_URL")}


@pytest.mark.parametrize("name", list(PRIVATE_SERVERS))
def test_each_server_stopped_in_turn_is_named_with_its_url(
        served: dict[str, str], tmp_path: Path, name: str) -> None:
    """A private server of the kind is reached, then really stopped: the doctor names it,
    the URL it tried (password masked) and the fix, and still reaches the other two."""
    start, variable, fix = PRIVATE_SERVERS[name]
    with start() as server:
        env = {**served, variable: server.url}
        _, report, _ = doctor(env, tmp_path)
        assert status(report)[name] is True, report
        with stopped(server):
            code, report, text = doctor(env, tmp_path)
    failed = next(c for c in report["checks"] if c["name"] == name)
    assert code == 1 and failed["ok"] is False and failed["fix"] == fix
    assert f"127.0.0.1:{server.port}" in failed["detail"]
    assert ":guest@" not in text
    others = {"database", "broker", "cache"} - {name}
    assert all(status(report)[o] for o in others)
    if name != "cache":  # the cache is checked after the broker
        assert report["first_problem"]["name"] == name


def test_a_database_without_the_schema_says_to_upgrade(served: dict[str, str], tmp_path: Path,
                                                       pg_url: str) -> None:
    import psycopg2
    from sqlalchemy.engine import make_url

    url = make_url(pg_url)
    admin = psycopg2.connect(host=url.host, port=url.port or 5432, user=url.username,
                             dbname="postgres")
    admin.autocommit = True
    name = f"{url.database}_empty"
    with admin.cursor() as cursor:
        cursor.execute(f'CREATE DATABASE "{name}"')
    try:
        empty = url.set(database=name).render_as_string(hide_password=False)
        code, report, _ = doctor({**served, "DATABASE_URL": empty}, tmp_path)
        assert code == 1 and report["first_problem"]["name"] == "schema"
        assert report["first_problem"]["fix"] == "run `recsys db upgrade`"
        assert "has no recsys schema" in report["first_problem"]["detail"]
    finally:
        with admin.cursor() as cursor:
            cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


def test_an_invalid_setting_is_named_and_the_rest_still_checked(tmp_path: Path) -> None:
    code, report, _ = doctor(embedded_env(tmp_path, CACHE_TTL="soon"), tmp_path)
    assert code == 1 and report["first_problem"]["name"] == "settings"
    assert "CACHE_TTL" in report["first_problem"]["detail"]
    assert report["invalid_settings"] == ["CACHE_TTL"]
    assert report["settings"]["CACHE_TTL"] == "(invalid)"
    assert report["settings"]["DATA_PATH"] == str(tmp_path / "data")
    checks = status(report)
    assert checks["database"] and checks["broker"] and checks["cache"]
    assert checks["artifact store"] and checks["disk DATA_PATH"]

    # A dependency's own URL invalid: named with its password masked, its checks skipped.
    code, report, text = doctor(embedded_env(tmp_path, DATABASE_URL="mysql://u:pw@h/x"),
                                tmp_path)
    assert code == 1 and report["first_problem"]["name"] == "settings"
    assert report["invalid_settings"] == ["DATABASE_URL"] and ":pw@" not in text
    skipped = next(c for c in report["checks"] if c["name"] == "database")
    assert skipped["ok"] is None and "DATABASE_URL is invalid" in skipped["detail"]
    assert status(report)["artifact store"]


@pytest.mark.slow
def test_embedded_after_a_run_is_well_and_a_tampered_champion_is_caught(
        tmp_path: Path, ml100k: Path) -> None:
    env = embedded_env(tmp_path, DATA_SOURCE=str(ml100k))
    code, report, _ = doctor(env, tmp_path)
    assert code == 1 and report["first_problem"]["name"] == "champion"
    built = subprocess.run([*recsys_command(), "pipeline", "--stages", "all", "--algorithms",
                            "popular", "--json"], env=env, cwd=tmp_path, capture_output=True,
                           text=True, timeout=600)
    assert built.returncode == 0, built.stderr
    code, report, text = doctor(env, tmp_path)
    assert code == 0 and report["ok"] and report["first_problem"] is None, text
    assert status(report)["champion"] is True and status(report)["workers"] is None
    champion = json.loads(built.stdout.strip().splitlines()[-1])["champion"]
    artifact = next((tmp_path / "models" / "models").rglob("arrays.npz"))
    artifact.write_bytes(artifact.read_bytes() + b"tampered")
    code, report, _ = doctor(env, tmp_path)
    assert code == 1 and report["first_problem"]["name"] == "champion"
    assert f"v{champion['version']}" in report["first_problem"]["detail"]
    assert "checksum mismatch" in report["first_problem"]["detail"]


def test_an_object_store_is_checked_reached_or_not_with_its_keys_masked(
        tmp_path: Path, s3_server, s3_bucket: str) -> None:  # type: ignore[no-untyped-def]
    env = {**embedded_env(tmp_path, **s3_server.env), "MODEL_PATH": f"s3://{s3_bucket}/models"}
    _, report, text = doctor(env, tmp_path)
    store = next(c for c in report["checks"] if c["name"] == "artifact store")
    assert store["ok"] is True and f"s3://{s3_bucket}/models at {s3_server.endpoint} reached" \
        in store["detail"], text
    assert report["settings"]["AWS_SECRET_ACCESS_KEY"] == "***"
    assert report["settings"]["AWS_ACCESS_KEY_ID"] == "***"
    assert s3_server.secret_key not in text and s3_server.access_key not in text
    env["MODEL_PATH"] = "s3://no-such-bucket-here/models"
    _, report, text = doctor(env, tmp_path)
    store = next(c for c in report["checks"] if c["name"] == "artifact store")
    assert store["ok"] is False and "bucket 'no-such-bucket-here' does not exist" \
        in store["detail"] and "s3://no-such-bucket-here/models" in store["detail"]
    assert s3_server.secret_key not in text
