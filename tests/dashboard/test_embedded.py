"""After `make demo` (the pipeline on embedded defaults: SQLite, tasks in-process, no
servers), `recsys dashboard` shows that run."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
from pathlib import Path

import httpx

from tests.conftest import recsys_command, wait_for
from tests.dashboard.conftest import log_in
from tests.ingest.test_embedded import embedded_env
from tests.serve.conftest import free_port

PASSWORD = "embedded-test-password"


def test_the_dashboard_shows_the_embedded_demo(tmp_path: Path, ml100k: Path) -> None:
    env = embedded_env(tmp_path, DATA_SOURCE=str(ml100k), DASHBOARD_USER="operator",
                       DASHBOARD_PASSWORD=PASSWORD)
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    # `make demo`'s command, with one algorithm and few trials to keep it short.
    demo = subprocess.run([*recsys_command(), "pipeline", "--stages", "all", "--algorithms",
                           "als", "--trials", "2", "--json"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)
    assert demo.returncode == 0, demo.stderr[-3000:]
    summary = json.loads(demo.stdout.strip().splitlines()[-1])
    champion = summary["champion"]["version"]
    database = next((tmp_path / "data").glob("*.sqlite3"))
    with sqlite3.connect(database) as conn:
        ratings = conn.execute("SELECT count(*) FROM rating").fetchone()[0]
    assert ratings == 100_000

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with (tmp_path / "dashboard.log").open("w") as log:
        dashboard = subprocess.Popen([*recsys_command(), "dashboard", "--port", str(port)],
                                     cwd=tmp_path, env=env, stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
    try:
        with httpx.Client(base_url=url, timeout=120) as client:
            def up() -> bool:
                assert dashboard.poll() is None, (tmp_path / "dashboard.log").read_text()
                try:
                    return client.get("/login").status_code == 200
                except httpx.TransportError:
                    return False

            wait_for(up, timeout=120, what="recsys dashboard on the embedded database")
            assert log_in(client, PASSWORD, "operator").status_code == 303
            overview = client.get("/")
            assert overview.status_code == 200
            assert f'data-total="{ratings}"' in overview.text
            assert f'data-version="{champion}"' in overview.text
            models = client.get("/models")
            assert models.status_code == 200 and f'id="v{champion}"' in models.text
            user = client.get("/users/1")
            assert user.status_code == 200 and 'id="list-champion"' in user.text
            for path in ("/experiment", "/online", "/items/50", "/decisions"):
                assert client.get(path).status_code == 200, path
    finally:
        if dashboard.poll() is None:
            os.killpg(dashboard.pid, signal.SIGTERM)
            dashboard.wait(timeout=30)
