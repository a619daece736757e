"""The serve benchmark: one tiny real run (serve, the bare app, wrk, an ingest worker)."""

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

JSON_KEYS = {"hit_rps", "bare_rps", "hit_ratio", "miss_p99_ms_100k", "miss_p99_ms_60k_items",
             "impression_cost", "feedback_events_per_s", "feedback_lost"}
MISS_FLOOR_KEYS = {"miss_ratio_60k", "miss_p99_ratio_60k", "miss_rps_60k",
                   "bare_score_rps_60k", "bare_score_p99_ms_60k"}


def test_benchmark_smoke_run(service_urls: dict[str, str], ml100k: Path, tmp_path: Path
                             ) -> None:
    # Redis db 14 as the benchmark's default: its keys go under a fresh prefix and are
    # deleted afterwards, nothing is flushed. wrk is installed by the benchmark if missing.
    redis_url = re.sub(r"/\d+$", "", service_urls["redis"].rstrip("/")) + "/14"
    completed = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "serve.py"), "--duration", "1", "--items", "2000",
         "--connections", "4", "--latency-connections", "0", "--impression-lists", "2000",
         "--ml100k", str(ml100k), "--workdir", str(tmp_path),
         "--database-url", service_urls["postgres"], "--broker-url", service_urls["rabbitmq"],
         "--redis-url", redis_url],
        capture_output=True, text=True, timeout=900, cwd=ROOT,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    lines = completed.stdout.strip().splitlines()
    assert len(lines) > 1  # human-readable lines come first
    figures = json.loads(lines[-1])
    assert set(figures) == JSON_KEYS | MISS_FLOOR_KEYS | {"feedback_single_events_per_s",
                                                          "feedback_batch"}
    assert figures["miss_ratio_60k"] == pytest.approx(
        figures["miss_rps_60k"] / figures["bare_score_rps_60k"], rel=0.01)
    assert any(line.startswith("bare scoring (one product") for line in lines)
    assert figures["feedback_lost"] == 0
    for key in set(figures) - {"feedback_lost"}:
        assert figures[key] > 0, key
    assert any(line.startswith("cache hits:") for line in lines)
    assert any("hot-swapped" in line or "restarted" in line for line in lines)
    # Cleaned up: the scratch database dropped, the scratch folder removed.
    scratch = re.search(r"^scratch database (\S+) on ", completed.stdout, re.MULTILINE)
    assert scratch and not database_exists(service_urls["postgres"], scratch.group(1))
    assert not list(tmp_path.glob("bench-serve-*"))


def test_bare_scoring_route_is_one_product_and_a_top_k(
    tmp_path: Path, use_settings, monkeypatch: pytest.MonkeyPatch  # type: ignore[no-untyped-def]
) -> None:
    import importlib

    import numpy as np
    from fastapi.testclient import TestClient

    from shared.artifacts import write_artifact

    use_settings(MODEL_PATH=str(tmp_path / "models"))
    rng = np.random.default_rng(3)
    users, items = rng.standard_normal((5, 8)), rng.standard_normal((300, 8))
    item_ids = np.arange(1000, 1300, dtype=np.int64)
    ref = write_artifact("models", {"user_ids": np.array([7, 8, 9, 10, 11]),
                                    "user_factors": users.astype(np.float32),
                                    "item_factors": items.astype(np.float32),
                                    "item_ids": item_ids}, {"kind": "model"})
    monkeypatch.setenv("BARE_MODEL", ref.path)
    monkeypatch.setenv("BARE_MODEL_SHA", ref.sha256)
    import bench.bare_app as bare_app

    client = TestClient(importlib.reload(bare_app).app)
    answer = client.get("/bare-score/9?k=5&offset=2").json()
    scores = users[2].astype(np.float32) @ items.astype(np.float32).T
    expected = item_ids[np.argsort(-scores, kind="stable")[2:7]].tolist()
    assert [item["movie_id"] for item in answer["items"]] == expected
    assert client.get("/bare-score/99").status_code == 404
    monkeypatch.delenv("BARE_MODEL")
    importlib.reload(bare_app)  # leave the module as other tests import it
