"""The quality benchmark: one tiny real run (60 users of ml-100k, two seeds, one trial)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CHAMPION_KEYS = {"algorithm", "ndcg@10_mean", "ndcg@10_sd", "precision@10_mean", "map_mean",
                 "recall@10_mean"}


def test_benchmark_smoke_run(ml100k: Path) -> None:
    completed = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "quality.py"), "--data", str(ml100k),
         "--users", "60", "--seeds", "42,1", "--trials", "1",
         "--algorithms", "popular,ease,als,ease_als"],
        capture_output=True, text=True, timeout=900, cwd=ROOT,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    lines = completed.stdout.strip().splitlines()
    assert "BiVAE" in completed.stdout  # the published rows beside ours
    figures = json.loads(lines[-1])
    assert {"protocol", "seeds", "champion", "models"} <= set(figures)
    assert set(figures["champion"]) == CHAMPION_KEYS
    assert figures["seeds"] == [42, 1]
    assert figures["protocol"]["stratify"] == "item" and figures["protocol"]["k"] == 10
    names = {model["algorithm"] for model in figures["models"]}
    assert names == {"popular", "ease", "als", "ease_als"}
    best = max(figures["models"], key=lambda model: model["ndcg@10_mean"])
    assert figures["champion"]["algorithm"] == best["algorithm"]
    assert all(0 < model["ndcg@10_mean"] <= 1 and model["ndcg@10_sd"] >= 0
               for model in figures["models"])


def test_benchmark_names_a_bad_data_folder(tmp_path: Path) -> None:
    completed = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "quality.py"), "--data", str(tmp_path)],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    assert completed.returncode != 0
    assert f"--data {tmp_path}: no u.data there" in completed.stderr
