"""Training on a snapshot artifact: the default list leaves out what cannot fit."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

import services.train.algorithms as algorithms
from services.train.training import TrainingError, train_many
from shared.artifacts import csr_to_arrays, write_artifact


@pytest.fixture
def snapshot(use_settings, tmp_path: Path) -> dict:  # type: ignore[no-untyped-def]
    use_settings(MODEL_PATH=str(tmp_path / "models"))
    matrix = sp.random(30, 12, density=0.4, format="csr", random_state=1, dtype=np.float32)
    matrix.data[:] = 4.0
    arrays = {"user_ids": np.arange(1, 31), "item_ids": np.arange(1, 13)}
    for name in ("train", "validation_train", "validation_test", "test"):
        arrays.update(csr_to_arrays(name, matrix))
    ref = write_artifact("snapshots", arrays, {"kind": "snapshot"})
    return {"snapshot_id": "s", "artifact_path": ref.path, "sha256": ref.sha256}


def test_default_list_skips_ease_above_its_cap(snapshot: dict, monkeypatch: pytest.MonkeyPatch
                                               ) -> None:
    spec = algorithms.ALGORITHMS["ease"]
    capped = dataclasses.replace(spec, defaults={**spec.defaults, "max_items": 5})
    monkeypatch.setitem(algorithms.ALGORITHMS, "ease", capped)
    trained = train_many(snapshot, None, tune=False)
    assert "ease" not in {t["algorithm"] for t in trained}
    assert "popular" in {t["algorithm"] for t in trained}
    assert [t["algorithm"] for t in trained][-1] == "sparse_ease"  # in dense EASE's place
    with pytest.raises(ValueError, match="exceeds max_items=5.*use sparse_ease"):
        train_many(snapshot, ["ease"], tune=False)
    with pytest.raises(TrainingError, match="unknown algorithm"):
        train_many(snapshot, ["nope"], tune=False)


def test_default_list_keeps_dense_ease_under_its_cap(snapshot: dict) -> None:
    trained = [t["algorithm"] for t in train_many(snapshot, None, tune=False)]
    assert "ease" in trained and "sparse_ease" not in trained


def test_tuning_reports_the_validation_users_it_scored(snapshot: dict, use_settings) -> None:  # type: ignore[no-untyped-def]
    use_settings(TUNE_VALIDATION_USERS="10")
    (tuned,) = train_many(snapshot, ["ease"], tune=True, n_trials=2)
    assert tuned["tuning"]["validation_users"] == 10
    assert tuned["tuning"]["validation_users_total"] == 30
    use_settings(TUNE_VALIDATION_USERS="0")
    (tuned,) = train_many(snapshot, ["ease"], tune=True, n_trials=2)
    assert tuned["tuning"]["validation_users"] == tuned["tuning"]["validation_users_total"] == 30
