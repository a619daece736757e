"""The train benchmark: one tiny real run against Postgres, RabbitMQ, Redis and a worker."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # `bench` is a folder of scripts, not an installed package
    sys.path.insert(0, str(ROOT))

from bench.common import database_exists  # noqa: E402

JSON_KEYS = {"rows", "load_ratio", "fit_ratio", "peak_rss_mb"}
RATINGS = 20_000


def test_benchmark_smoke_run(service_urls: dict[str, str], tmp_path: Path) -> None:
    completed = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "train.py"), "--ratings", str(RATINGS),
         "--workdir", str(tmp_path), "--database-url", service_urls["postgres"],
         "--broker-url", service_urls["rabbitmq"], "--redis-url", service_urls["redis"],
         "--timeout", "300"],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    lines = completed.stdout.strip().splitlines()
    assert len(lines) > 1  # human-readable lines come first
    figures = json.loads(lines[-1])
    assert set(figures) == JSON_KEYS
    assert figures["rows"] == RATINGS
    assert figures["load_ratio"] > 0 and figures["fit_ratio"] > 0
    assert figures["peak_rss_mb"] > 0
    assert any(line.startswith("run 1: train.fit via worker") for line in lines)
    # Cleaned up: the scratch database dropped, the worker's artifacts removed.
    scratch = re.search(r"^scratch database (\S+) on ", completed.stdout, re.MULTILINE)
    assert scratch and not database_exists(service_urls["postgres"], scratch.group(1))
    assert not list(tmp_path.glob(".train-bench-models-*"))
