"""`recsys pipeline --tune-budget` on embedded defaults: the JSON says what tuning spent."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.conftest import recsys_command
from tests.ingest.test_embedded import embedded_env


@pytest.mark.slow
def test_pipeline_reports_the_tuning_budget(tmp_path: Path, ml100k: Path) -> None:
    env = embedded_env(tmp_path, DATA_SOURCE=str(ml100k))
    done = subprocess.run(
        [*recsys_command(), "pipeline", "--stages", "all", "--algorithms",
         "popular,itemknn_cosine,ease", "--trials", "3", "--tune-budget", "3000", "--json"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    tuning = {t["algorithm"]: t["tuning"] for t in summary["trained"]}
    # 3000 * 3 / (3 + 3), less what the stage spent before (the popularity baseline)
    assert 1490.0 <= tuning["itemknn_cosine"]["allowance_seconds"] <= 1500.0
    for name in ("itemknn_cosine", "ease"):
        assert (tuning[name]["trials_cap"], tuning[name]["trials_run"],
                tuning[name]["trials_cut"]) == (3, 3, 0)
        assert tuning[name]["validation_users"] == tuning[name]["validation_users_total"] > 900
    assert summary["tuning"]["budget_seconds"] == 3000.0
    assert summary["tuning"]["trials_run"] == 6 and summary["tuning"]["trials_cut"] == 0
    assert summary["champion"]["algorithm"] == "ease"

    refused = subprocess.run([*recsys_command(), "pipeline", "--stages", "all",
                              "--tune-budget", "0"], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2
    assert "--tune-budget must be a positive number of seconds, got 0.0" in refused.stderr
