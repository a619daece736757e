"""Settings: names users know, clear errors naming the variable, embedded detection."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
from pathlib import Path

import pytest

from shared.settings import SettingsError, get_settings, setting_names
from tests.conftest import recsys_command


def test_defaults_are_embedded(use_settings) -> None:  # type: ignore[no-untyped-def]
    use_settings()
    settings = get_settings()
    assert settings.embedded
    assert settings.eval_k_values == [5, 10, 20]
    assert settings.eval_split_date == dt.date(2000, 11, 1)
    assert settings.model_version == "latest"
    assert settings.resolved_database_url.startswith("sqlite:///")
    assert settings.resolved_database_url.endswith("data/recsys.sqlite3")


def test_values_from_environment(use_settings) -> None:  # type: ignore[no-untyped-def]
    use_settings(
        ALS_RANK="32",
        EVAL_K_VALUES="10, 5",
        MODEL_VERSION="3",
        DATABASE_URL="postgresql+psycopg2://u@h/db",
        CACHE_TTL="60",
    )
    settings = get_settings()
    assert (settings.als_rank, settings.eval_k_values, settings.model_version) == (32, [5, 10], "3")
    assert not settings.embedded


def test_dotenv_file_is_read(use_settings, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / ".env").write_text("ALS_ITERATIONS=7\n")
    use_settings()
    assert get_settings().als_iterations == 7


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("ALS_RANK", "many"),
        ("ALS_RANK", "0"),
        ("EVAL_K_VALUES", "5,ten"),
        ("EVAL_K_VALUES", "0,5"),
        ("EVAL_SPLIT_DATE", "someday"),
        ("MODEL_VERSION", "newest"),
        ("DATABASE_URL", "mysql://x"),
        ("BROKER_URL", "redis://x"),
        ("CACHE_TTL", "-1"),
        ("EVAL_PROTOCOL", "bootstrap"),
        ("EVAL_STRATIFY", "movie"),
    ],
)
def test_invalid_value_names_the_variable(use_settings, name: str, value: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(SettingsError, match=rf"^invalid setting: {name}: .*{value!r}"):
        use_settings(**{name: value})


def test_placeholder_api_key_refused_in_production(use_settings) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(SettingsError, match="API_KEY must be set to a real secret"):
        use_settings(ENVIRONMENT="production", API_KEY="changeme")


def test_every_documented_name_is_a_setting() -> None:
    assert {
        "DATA_PATH",
        "MODEL_PATH",
        "ALS_RANK",
        "ALS_ITERATIONS",
        "MODEL_VERSION",
        "CACHE_TTL",
        "EVAL_SPLIT_DATE",
        "EVAL_K_VALUES",
        "DATABASE_URL",
        "BROKER_URL",
        "REDIS_URL",
        "API_KEY",
        "DATA_SOURCE",
        "EVAL_PROTOCOL",
        "EVAL_STRATIFY",
    } <= setting_names()


def test_cli_stops_at_startup_naming_the_variable(tmp_path: Path) -> None:
    env = {**os.environ, "ALS_RANK": "lots"}
    done = subprocess.run(
        [*recsys_command(), "ingest", "--help"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "ALS_RANK" in done.stderr and "lots" in done.stderr
