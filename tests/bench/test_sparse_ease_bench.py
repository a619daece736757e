"""The sparse_ease benchmark: one tiny real run at the full 59,047-movie catalogue."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
JSON_KEYS = {"rows", "items", "fit_seconds", "popular_seconds", "fit_ratio", "peak_rss_mb",
             "nnz"}
RATINGS = 20_000


def test_benchmark_smoke_run() -> None:
    completed = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "sparse_ease.py"), "--ratings", str(RATINGS)],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    lines = completed.stdout.strip().splitlines()
    assert len(lines) > 1 and lines[0].startswith("matrix: ")  # human-readable lines first
    figures = json.loads(lines[-1])
    assert set(figures) == JSON_KEYS
    assert figures["rows"] == RATINGS and figures["items"] == 59_047
    assert figures["fit_seconds"] > 0 and figures["peak_rss_mb"] > 0
    assert 0 < figures["nnz"] <= 2 * 500 * 59_047  # at most max_item_weights per item
