"""The batch benchmark at a tiny size: it runs, and its JSON says what it measured."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_benchmark_smoke_run(tmp_path: Path) -> None:
    completed = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "batch.py"), "--users", "1500", "--items", "800",
         "--ratings", "60000", "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    figures = json.loads(completed.stdout.strip().splitlines()[-1])
    assert set(figures) == {"users", "rows", "seconds", "bare_seconds", "ratio", "peak_rss_mb"}
    assert (figures["users"], figures["rows"]) == (1500, 15000) and figures["ratio"] > 0
    assert not list(tmp_path.iterdir())
