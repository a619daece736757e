"""`recsys bootstrap`: the whole pipeline when the registry has no champion, else nothing;
one run at a time through a Postgres advisory lock."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import psycopg2

from shared.bootstrap import LOCK_KEY
from tests.conftest import _admin_dsn, recsys_command, wait_for


def start(pg_url: str, ml100k: Path, tmp_path: Path, name: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("BROKER_URL", "REDIS_URL")}
    env.update(DATABASE_URL=pg_url, DATA_SOURCE=str(ml100k), DATA_PATH=str(tmp_path / "data"),
               MODEL_PATH=str(tmp_path / "models"))
    return subprocess.Popen(
        [*recsys_command(), "bootstrap", "--algorithms", "als", "--trials", "2", "--json"],
        cwd=tmp_path, env=env, text=True, stdout=subprocess.PIPE,
        stderr=(tmp_path / f"{name}.err").open("w"))


def finished(process: subprocess.Popen[str], tmp_path: Path, name: str) -> dict:
    stdout, _ = process.communicate(timeout=600)
    assert process.returncode == 0, (tmp_path / f"{name}.err").read_text()[-3000:]
    return json.loads(stdout.strip().splitlines()[-1])


def test_bootstrap_trains_once_then_does_nothing(pg_url: str, ml100k: Path,
                                                 tmp_path: Path) -> None:
    holder = psycopg2.connect(_admin_dsn(pg_url))
    holder.autocommit = True

    def count(table: str) -> int:
        with holder.cursor() as cursor:
            cursor.execute(f"SELECT count(*) FROM {table}")  # noqa: S608 (fixed names)
            return int(cursor.fetchone()[0])

    try:
        with holder.cursor() as cursor:  # as if another bootstrap were running
            cursor.execute("SELECT pg_advisory_lock(%s)", (LOCK_KEY,))
        runs = {name: start(pg_url, ml100k, tmp_path, name) for name in ("a", "b")}
        wait_for(lambda: all("another bootstrap is running" in
                             (tmp_path / f"{name}.err").read_text() for name in runs),
                 timeout=120, what="both bootstraps to wait for the lock")
        assert count("model_version") == 0 and count("ingest_batch") == 0
        with holder.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_unlock(%s)", (LOCK_KEY,))
        results = sorted((finished(p, tmp_path, name) for name, p in runs.items()),
                         key=lambda r: r["status"])
        present, trained = results
        assert trained["status"] == "trained" and trained["pipeline"]["promoted"] is True
        assert present == {"status": "present", "champion": trained["champion"], "waited": True}
        versions, batches = count("model_version"), count("ingest_batch")
        assert versions >= 1 and batches == 1
        with holder.cursor() as cursor:
            cursor.execute("SELECT version FROM model_alias WHERE alias = 'champion'")
            assert cursor.fetchone() == (trained["champion"],)

        again = finished(start(pg_url, ml100k, tmp_path, "c"), tmp_path, "c")
        assert again == {"status": "present", "champion": trained["champion"], "waited": False}
        assert (count("model_version"), count("ingest_batch")) == (versions, batches)
    finally:
        holder.close()


def test_a_bad_source_fails_in_one_line_and_leaves_no_champion(pg_url: str, tmp_path: Path
                                                               ) -> None:
    missing = tmp_path / "no-such-dataset"
    failed = start(pg_url, missing, tmp_path, "bad")
    _, _ = failed.communicate(timeout=300)
    stderr = (tmp_path / "bad.err").read_text().strip().splitlines()
    assert failed.returncode == 1
    assert len(stderr) == 1 and str(missing) in stderr[0], stderr
    with psycopg2.connect(_admin_dsn(pg_url)) as connection, connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM model_alias")
        assert cursor.fetchone() == (0,)
