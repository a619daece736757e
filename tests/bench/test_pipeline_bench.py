"""The pipeline benchmark at a tiny size: both runs through the real stack, JSON last."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
JSON_KEYS = {"rows", "fixed_seconds", "bare_seconds", "fixed_ratio", "default_seconds",
             "tune_budget_s", "default_within_budget", "peak_rss_mb", "champion"}


@pytest.mark.slow
def test_benchmark_smoke_run(service_urls: dict[str, str], tmp_path: Path) -> None:
    completed = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "pipeline.py"), "--ratings", "20000",
         "--tune-budget", "30", "--workdir", str(tmp_path), "--timeout", "900",
         "--database-url", service_urls["postgres"], "--broker-url", service_urls["rabbitmq"],
         "--redis-url", service_urls["redis"]],
        capture_output=True, text=True, timeout=1800, cwd=ROOT)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    lines = completed.stdout.strip().splitlines()
    for stage in ("ingest", "transform", "train", "evaluate", "promote", "serve swap"):
        assert any(line.startswith(f"fixed: {stage}") for line in lines), stage
    figures = json.loads(lines[-1])
    assert set(figures) == JSON_KEYS
    assert figures["rows"] == 20_000 and figures["tune_budget_s"] == 30
    assert figures["fixed_seconds"] > 0 and figures["fixed_ratio"] > 0
    assert figures["default_seconds"] > 0 and figures["peak_rss_mb"] > 0
    assert isinstance(figures["default_within_budget"], bool)
    assert figures["champion"]["algorithm"] and 0 < figures["champion"]["ndcg@10"] < 1
