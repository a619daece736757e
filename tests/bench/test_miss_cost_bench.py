"""The miss-cost benchmark: one tiny real run (20 users of ml-100k, one pass)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_benchmark_smoke_run(ml100k: Path) -> None:
    completed = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "miss_cost.py"), "--data", str(ml100k),
         "--users", "20", "--repeats", "1"],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    lines = completed.stdout.strip().splitlines()
    assert len(lines) == 4  # one line per algorithm, then the figures
    figures = json.loads(lines[-1])
    assert figures["users"] == 20 and set(figures["ms"]) == {"ease", "als", "ease_als"}
    assert all(ms > 0 for ms in figures["ms"].values())
    assert figures["ratio_vs_ease"]["ease"] == 1.0 and figures["ratio_vs_als"]["als"] == 1.0
