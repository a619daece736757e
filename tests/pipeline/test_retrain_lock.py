"""`recsys pipeline` with a train stage is a retrain: it takes the one retrain lock."""

from __future__ import annotations

import pytest

from shared import retrain
from shared.errors import RecsysError
from shared.pipeline import run_pipeline


def test_a_pipeline_that_trains_waits_for_no_one_and_gives_the_lock_back(
        pg_url: str, use_settings) -> None:  # type: ignore[no-untyped-def]
    use_settings(DATABASE_URL=pg_url)
    assert retrain.acquire_lock("new_feedback-running", 60, task_id="the-policy-chain")
    with pytest.raises(retrain.RetrainRunning, match="the-policy-chain"):
        run_pipeline("transform,train")
    assert retrain.running_retrain().holder == "new_feedback-running"  # untouched
    assert retrain.release_lock("new_feedback-running")
    # An empty database: the chain fails at transform, and the lock is free again.
    with pytest.raises(RecsysError, match="no ratings to snapshot"):
        run_pipeline("transform,train")
    assert retrain.running_retrain() is None
