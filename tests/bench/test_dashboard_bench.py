"""The dashboard benchmark: one tiny real run (serve, the dashboard polled, wrk)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # `bench` is a folder of scripts, not an installed package
    sys.path.insert(0, str(ROOT))

from bench.common import database_exists  # noqa: E402


def test_benchmark_smoke_run(service_urls: dict[str, str], ml100k: Path, tmp_path: Path
                             ) -> None:
    redis_url = re.sub(r"/\d+$", "", service_urls["redis"].rstrip("/")) + "/14"
    completed = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "dashboard.py"), "--duration", "1", "--rounds",
         "1", "--connections", "4", "--factors", "16", "--ml100k", str(ml100k),
         "--workdir", str(tmp_path), "--database-url", service_urls["postgres"],
         "--broker-url", service_urls["rabbitmq"], "--redis-url", redis_url],
        capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    lines = completed.stdout.strip().splitlines()
    figures = json.loads(lines[-1])
    assert set(figures) == {"hit_rps_without", "hit_rps_with", "hit_ratio_with_dashboard",
                            "rounds", "polls", "poll_p50_ms"}
    assert figures["hit_ratio_with_dashboard"] == pytest.approx(
        figures["hit_rps_with"] / figures["hit_rps_without"], rel=0.01)
    assert figures["polls"] >= 1 and figures["rounds"] == 1
    assert any(line.startswith("cache hits:") for line in lines)
    scratch = re.search(r"^scratch database (\S+) on ", completed.stdout, re.MULTILINE)
    assert scratch and not database_exists(service_urls["postgres"], scratch.group(1))
    assert not list(tmp_path.glob("bench-dashboard-*"))
