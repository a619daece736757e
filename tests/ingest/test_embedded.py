"""The embedded default: no servers, SQLite under DATA_PATH, tasks run in-process."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from services.ingest.errors import IngestError
from services.ingest.ingest import ingest_source
from shared.db import migrate
from shared.events import get_event_bus
from shared.settings import get_settings
from tests.conftest import FIXTURES, recsys_command
from tests.ingest.helpers import copy_dataset, db_state


def embedded_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "BROKER_URL", "REDIS_URL")
    }
    env.update(DATA_PATH=str(tmp_path / "data"), MODEL_PATH=str(tmp_path / "models"), **extra)
    return env


@pytest.mark.slow
def test_pipeline_runs_on_embedded_defaults(tmp_path: Path, ml100k: Path) -> None:
    """The README's first command: the whole job, no servers, and the quality bar."""
    env = embedded_env(tmp_path, DATA_SOURCE=str(ml100k))
    done = subprocess.run(
        [*recsys_command(), "pipeline", "--stages", "all", "--json"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["stages"][0] == "ingest"
    ingest = summary["ingest"]
    assert (ingest["ratings"], ingest["users"], ingest["movies"]) == (100_000, 943, 1682)
    assert (tmp_path / "data" / "recsys.sqlite3").exists()
    # The model side on ml-100k, random protocol, seed 42, tuned on validation only.
    by_algorithm = {m["algorithm"]: m["metrics"] for m in summary["models"]}
    champion = summary["champion"]
    assert champion["metrics"]["ndcg@10"] >= 0.47
    assert champion["metrics"]["precision@10"] >= 0.405
    assert by_algorithm["als"]["ndcg@10"] >= 0.42
    assert 0.22 <= by_algorithm["popular"]["ndcg@10"] <= 0.28
    assert all(f"{name}@{k}" in champion["metrics"] for name in ("ndcg", "precision", "recall",
               "map") for k in (5, 10, 20))
    assert summary["promoted"] is True
    gate = summary["gate"]
    assert (gate["metric"], gate["candidate"], gate["champion"]) == (
        "ndcg@10", champion["version"], None)
    assert gate["candidate_score"] == round(champion["metrics"]["ndcg@10"], 6)
    on = gate["evaluated_on"]
    assert (on["users"], on["excluded_champion_train"]) == (943, 0)
    assert on["snapshot"] == summary["snapshot"] and on["interactions"] > 20_000
    again = subprocess.run(
        [*recsys_command(), "ingest", "--json"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert json.loads(again.stdout.strip().splitlines()[-1])["status"] == "unchanged"


def test_cli_reports_bad_input_with_exit_code(tmp_path: Path) -> None:
    source = copy_dataset(FIXTURES / "ml-1m", tmp_path / "ml-1m")
    (source / "ratings.dat").write_bytes(b"1::1::7::978300760\n")
    done = subprocess.run(
        [*recsys_command(), "ingest", "--source", str(source)],
        cwd=tmp_path,
        env=embedded_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    assert "ratings.dat:1: rating 7 is not a whole number from 1 to 5" in done.stderr
    assert "Traceback" not in done.stderr


def test_sqlite_rejects_leave_database_unchanged_and_lenient_loads(
    use_settings,  # type: ignore[no-untyped-def]
    tmp_path: Path,
) -> None:
    use_settings()
    assert get_settings().embedded
    migrate()
    url = get_settings().resolved_database_url
    ingest_source(str(FIXTURES / "ml-1m"))
    before = db_state(url)
    source = copy_dataset(FIXTURES / "ml-1m", tmp_path / "bad")
    (source / "ratings.dat").write_bytes(
        b"1::2::4::978300761\n1::2::4::978300761\n1::1::5::978300760\n"
    )
    with pytest.raises(IngestError, match="ratings.dat:2: duplicate"):
        ingest_source(str(source))
    assert db_state(url) == before
    result = ingest_source(str(source), lenient=True)
    assert (result.ratings, result.rejected) == (1, 2)
    events = [e for e in get_event_bus().published if e.type == "ratings.ingested"]
    assert events[-1].payload["batch_id"] == result.batch_id
