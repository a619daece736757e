"""The dashboard's login settings: production refuses a missing or placeholder password."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from shared.settings import SettingsError, get_settings
from tests.conftest import recsys_command

REAL = {"ENVIRONMENT": "production", "API_KEY": "a-real-api-key",
        "FLOWER_PASSWORD": "a-real-flower-secret"}


@pytest.mark.parametrize("password", ["", "  ", "changeme", "recsys-dev"])
def test_production_refuses_a_missing_or_placeholder_password(use_settings, password: str  # type: ignore[no-untyped-def]
                                                              ) -> None:
    with pytest.raises(SettingsError, match="DASHBOARD_PASSWORD must be set to a real secret"):
        use_settings(**REAL, DASHBOARD_PASSWORD=password)


def test_credentials_in_production_and_development(use_settings, settings_env  # type: ignore[no-untyped-def]
                                                   ) -> None:
    use_settings(**REAL, DASHBOARD_USER="ops", DASHBOARD_PASSWORD="s3cret-enough")
    assert get_settings().dashboard_credentials == ("ops", "s3cret-enough")
    assert get_settings().dashboard_port == 8050
    settings_env.delenv("DASHBOARD_PASSWORD")
    use_settings(ENVIRONMENT="development")
    assert get_settings().dashboard_credentials == ("ops", "recsys-dev")


@pytest.mark.parametrize(("name", "value"), [("DASHBOARD_USER", " "), ("DASHBOARD_PORT", "0"),
                                             ("DASHBOARD_PORT", "many")])
def test_unusable_settings_name_the_variable(use_settings, name: str, value: str  # type: ignore[no-untyped-def]
                                             ) -> None:
    with pytest.raises(SettingsError, match=name):
        use_settings(**{name: value})


def test_the_command_refuses_production_without_a_password(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DASHBOARD_")}
    done = subprocess.run([*recsys_command(), "dashboard"], env={**env, **REAL}, cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "DASHBOARD_PASSWORD must be set to a real secret" in " ".join(done.stderr.split())
