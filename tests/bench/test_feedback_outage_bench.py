"""The feedback outage benchmark: one tiny real run (private broker, serve, ingest worker)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
JSON_KEYS = {"sent", "accepted", "persisted", "lost", "duplicated", "errors_5xx", "no_answer",
             "outage_s", "requests_outage", "p50_ms", "p99_ms", "p99_ms_outage", "max_ms",
             "events_per_s", "events_per_s_up", "events_per_s_outage", "outbox_events"}


@pytest.mark.slow
def test_benchmark_smoke_run(service_urls: dict[str, str], ml100k: Path, tmp_path: Path
                             ) -> None:
    redis_url = re.sub(r"/\d+$", "", service_urls["redis"].rstrip("/")) + "/14"
    completed = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "feedback_outage.py"), "--outage", "2",
         "--before", "1", "--after", "1", "--connections", "2", "--ml100k", str(ml100k),
         "--workdir", str(tmp_path), "--database-url", service_urls["postgres"],
         "--redis-url", redis_url],
        capture_output=True, text=True, timeout=900, cwd=ROOT,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    lines = completed.stdout.strip().splitlines()
    assert len(lines) > 1  # human-readable lines come first
    figures = json.loads(lines[-1])
    assert set(figures) == JSON_KEYS
    assert figures["accepted"] == figures["sent"] == figures["persisted"] > 0
    assert figures["lost"] == figures["duplicated"] == figures["errors_5xx"] == 0
    assert figures["requests_outage"] > 0 and figures["outbox_events"] > 0
