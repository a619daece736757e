"""The chaos benchmark at a tiny size: one scenario through --scenarios, its JSON line last."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
COUNTS = {"sent", "accepted", "persisted", "lost", "duplicated", "5xx", "connection_errors",
          "outage_s"}


@pytest.mark.slow
@pytest.mark.chaos
def test_benchmark_smoke_run(service_urls: dict[str, str]) -> None:
    completed = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "chaos.py"), "--scenarios",
         "feedback_postgres_restart", "--outage", "1", "--database-url",
         service_urls["postgres"], "--redis-url", service_urls["redis"]],
        capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    lines = completed.stdout.strip().splitlines()
    assert any(line.startswith("feedback_postgres_restart: sent ") for line in lines)
    figures = json.loads(lines[-1])
    assert set(figures) == {"scenarios", "lost_total", "duplicated_total", "5xx_total"}
    counts = figures["scenarios"]["feedback_postgres_restart"]
    assert set(counts) == COUNTS
    assert counts["accepted"] > 0 and counts["persisted"] == counts["accepted"]
    assert figures["lost_total"] == counts["lost"] == 0
    assert figures["duplicated_total"] == 0 and figures["5xx_total"] == counts["5xx"]


def test_unknown_scenario_is_refused() -> None:
    completed = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "chaos.py"), "--scenarios", "no_such"],
        capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert completed.returncode == 2
    assert "unknown scenario no_such" in completed.stderr
