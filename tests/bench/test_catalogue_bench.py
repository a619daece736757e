"""The catalogue benchmark at a tiny size: both pipelines on embedded defaults, JSON last."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_benchmark_smoke_run(ml100k: Path) -> None:
    completed = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "catalogue.py"), "--reference", str(ml100k),
         "--ratings", "5000", "--movies", "2000", "--users", "100",
         "--algorithms", "popular,itemknn_cosine", "--trials", "2"],
        capture_output=True, text=True, timeout=1200, cwd=ROOT)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    figures = json.loads(completed.stdout.strip().splitlines()[-1])
    assert figures["ratio"] == pytest.approx(
        figures["catalogue_seconds"] / figures["reference_seconds"], rel=1e-2)
    assert figures["reference"]["ratings"] == 100_000
    assert figures["reference"]["items"] == 1_682
    assert figures["catalogue"]["ratings"] == 5_000
    assert 0 < figures["catalogue"]["items"] <= 2_000
    for run in ("reference", "catalogue"):
        assert set(figures[run]["trained"]) == {"popular", "itemknn_cosine"}
        assert figures[run]["champion"] in figures[run]["trained"]
        assert 0 < figures[run]["ndcg@10"] < 1


def test_bad_input_is_named() -> None:
    completed = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "catalogue.py"), "--movies", "0"],
        capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert completed.returncode != 0
    assert "--users and --movies must be positive, got 610 and 0" in completed.stderr
