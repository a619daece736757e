"""The hot-swap benchmark at a tiny size: serve swaps under wrk with no failed request."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
JSON_KEYS = {"users", "items", "workers", "model_mb", "load_seconds", "bare_load_seconds",
             "load_ratio", "rss_per_worker_mb", "rss_ratio", "swap_seconds",
             "peak_swap_rss_mb", "requests", "failed"}


def test_benchmark_smoke_run(service_urls: dict[str, str]) -> None:
    completed = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "swap.py"), "--users", "2000", "--items", "1500",
         "--ratings", "60000", "--duration", "5", "--database-url", service_urls["postgres"],
         "--broker-url", service_urls["rabbitmq"], "--redis-url", service_urls["redis"]],
        capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    lines = completed.stdout.strip().splitlines()
    assert any(line.startswith("swap to v2 under load") for line in lines)
    figures = json.loads(lines[-1])
    assert set(figures) == JSON_KEYS
    assert (figures["users"], figures["items"], figures["workers"]) == (2000, 1500, 2)
    assert figures["requests"] > 0 and figures["failed"] == 0
    assert figures["load_seconds"] > 0 and figures["swap_seconds"] > 0
    assert figures["peak_swap_rss_mb"] >= figures["rss_per_worker_mb"] > 0
