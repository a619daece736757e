"""The evaluation benchmark at a tiny size: it runs, and its JSON says what it measured."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
JSON_KEYS = {"users", "items", "rows", "seconds", "bare_seconds", "ratio", "peak_rss_mb",
             "bound_mb", "sample_users", "sample_seconds", "sample_ndcg@10",
             "sample_ndcg@10_ci95", "ndcg@10"}


def test_benchmark_smoke_run(tmp_path: Path) -> None:
    completed = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "evaluate.py"), "--users", "1500", "--items",
         "800", "--ratings", "60000", "--sample-users", "300", "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    lines = completed.stdout.strip().splitlines()
    assert any(line.startswith("evaluate every test user:") for line in lines)
    figures = json.loads(lines[-1])
    assert set(figures) == JSON_KEYS
    assert (figures["users"], figures["items"], figures["sample_users"]) == (1500, 800, 300)
    assert 0 < figures["rows"] <= 60_000 and figures["ratio"] > 0
    assert 0 < figures["ndcg@10"] < 1 and figures["sample_ndcg@10_ci95"] > 0
    assert not list(tmp_path.iterdir())  # the generated artifacts are removed
