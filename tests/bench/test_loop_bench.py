"""The loop benchmark: one tiny real run (a stack of real processes, ml-100k, a small window)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
JSON_KEYS = {"loop_seconds", "direct_seconds", "loop_ratio", "online_window_ratio"}


@pytest.mark.slow
def test_loop_benchmark_smoke_run(service_urls: dict[str, str], ml100k: Path) -> None:
    completed = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "loop.py"), "--impressions", "20000",
         "--feedback", "1000", "--algorithms", "ease", "--trials", "1",
         "--data-source", str(ml100k), "--database-url", service_urls["postgres"],
         "--broker-url", service_urls["rabbitmq"], "--redis-url", service_urls["redis"],
         "--timeout", "300"],
        capture_output=True, text=True, timeout=900, cwd=ROOT,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    lines = completed.stdout.strip().splitlines()
    assert len(lines) > 1  # human-readable lines come first
    figures = json.loads(lines[-1])
    assert set(figures) == JSON_KEYS
    assert all(figures[key] > 0 for key in JSON_KEYS), figures
    assert any(line.startswith("loop: rule fired -> serve answers v") for line in lines)
