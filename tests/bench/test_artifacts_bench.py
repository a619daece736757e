"""The artifact-store benchmark at a tiny size: it runs, and its JSON says what it measured."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
JSON_KEYS = {"bytes", "put_ratio", "get_ratio", "cached_get_ms", "put_ms", "get_ms",
             "bare_put_ms", "bare_get_ms", "local_put_ms", "local_get_ms", "users", "items",
             "repeats"}


def test_benchmark_smoke_run(tmp_path: Path) -> None:
    completed = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "artifacts.py"), "--users", "300", "--items",
         "200", "--repeats", "1", "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    lines = completed.stdout.strip().splitlines()
    assert any(line.startswith("store get, empty cache:") for line in lines)
    figures = json.loads(lines[-1])
    assert set(figures) == JSON_KEYS
    assert (figures["users"], figures["items"], figures["repeats"]) == (300, 200, 1)
    # Two float32 factor matrices of 64 columns, and the item ids, in one npz.
    assert figures["bytes"] > (300 + 200) * 64 * 4 + 200 * 8
    assert figures["put_ratio"] > 0 and figures["get_ratio"] > 0
    assert figures["cached_get_ms"] > 0
    assert not list(tmp_path.iterdir())  # the scratch directory is removed
