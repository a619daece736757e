"""The promotion gate once feedback joins the data: both models measured on interactions
neither was trained on, on the real Postgres with ml-100k."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from services.eval.offline import evaluate_on_snapshot, evaluate_versions
from services.ingest.feedback import store_feedback
from services.ingest.ingest import ingest_source
from services.registry import registry
from services.train.training import fit_on_snapshot, load_snapshot
from services.transform.snapshot import SnapshotParams, build_snapshot
from shared.artifacts import read_artifact
from shared.metrics import GATE_METRIC

HELD_BACK = 6000  # the newest ratings, sent later as feedback


def register(snapshot: dict[str, Any], algorithm: str, params: dict[str, Any] | None = None
             ) -> dict[str, Any]:
    trained = fit_on_snapshot(load_snapshot(snapshot), algorithm, params)
    record = registry.register(snapshot["snapshot_id"], algorithm, trained["params"],
                               trained["artifact_path"], trained["sha256"])
    return record | {"snapshot_artifact": snapshot}


@pytest.fixture
def grown(pg_url: str, use_settings, tmp_path: Path, ml100k: Path  # type: ignore[no-untyped-def]
          ) -> dict[str, Any]:
    """ml-100k less its newest ratings, snapshotted; then those ratings arrive as feedback
    and a second snapshot is drawn over the grown data."""
    use_settings(DATABASE_URL=pg_url, MODEL_PATH=str(tmp_path / "models"),
                 EVAL_K_VALUES="10")
    source = tmp_path / "ml-100k"
    shutil.copytree(ml100k, source)
    rows = np.loadtxt(ml100k / "u.data", dtype=np.int64)
    order = np.lexsort((rows[:, 1], rows[:, 0], rows[:, 3]))
    early, late = rows[order[:-HELD_BACK]], rows[order[-HELD_BACK:]]
    np.savetxt(source / "u.data", early, fmt="%d", delimiter="\t")
    ingest_source(str(source))
    first = build_snapshot(SnapshotParams.from_settings(protocol="random"))
    events = [{"event_id": f"late-{i}", "user_id": int(u), "movie_id": int(m), "type": "rating",
               "value": float(r), "timestamp": int(t)} for i, (u, m, r, t) in enumerate(late)]
    return {"first": first, "events": events}


def test_a_retrain_of_the_same_model_scores_as_the_champion_on_unseen_interactions(
        grown: dict[str, Any]) -> None:
    champion = register(grown["first"], "ease")
    registry.promote(champion["version"], reason="first model")
    store_feedback(grown["events"])
    second = build_snapshot(SnapshotParams.from_settings(protocol="random"))
    assert second["snapshot_id"] != grown["first"]["snapshot_id"]
    retrain = register(second, "ease", champion["params"])

    evaluated = evaluate_versions([retrain])
    gate = evaluated["gate"]
    assert set(gate) >= {"metric", "candidate", "candidate_score", "champion",
                         "champion_score", "evaluated_on"}
    assert (gate["metric"], gate["candidate"], gate["champion"]) == (
        GATE_METRIC, retrain["version"], champion["version"])
    on = gate["evaluated_on"]
    assert on["snapshot"] == second["snapshot_id"]
    assert on["champion_snapshot"] == grown["first"]["snapshot_id"]
    # The redrawn split put part of the champion's training data in the new test split.
    assert on["excluded_champion_train"] > 10_000
    assert 0 < on["interactions"] == second["counts"]["test"] - on["excluded_champion_train"]
    # Same algorithm, same parameters, one more month of data: the same figure within noise.
    assert abs(gate["candidate_score"] - gate["champion_score"]) < 0.02

    # Measured on the whole new test split, the champion is flattered by what it trained on.
    arrays, _ = read_artifact(second["artifact_path"], second["sha256"])
    leaky = evaluate_on_snapshot(champion, arrays, [10])[GATE_METRIC]
    fair = evaluated["models"][0]["metrics"][GATE_METRIC]
    assert leaky > fair + 0.05

    decision = registry.promote_if_better(evaluated)
    assert decision["gate"] == gate
    assert f"v{champion['version']}'s training data" in decision["reason"]


def test_a_genuinely_better_model_is_promoted_after_feedback(grown: dict[str, Any]) -> None:
    champion = register(grown["first"], "als", {"factors": 8, "iterations": 3})
    registry.promote(champion["version"], reason="first model")
    store_feedback(grown["events"])
    second = build_snapshot(SnapshotParams.from_settings(protocol="random"))
    better = register(second, "ease")

    decision = registry.promote_if_better(evaluate_versions([better]))
    gate = decision["gate"]
    assert gate["candidate_score"] > gate["champion_score"] + 0.02
    assert decision["promoted"] and registry.resolve("latest")["version"] == better["version"]


def test_without_a_champion_the_gate_is_the_whole_test_split(grown: dict[str, Any]) -> None:
    first = register(grown["first"], "popular")
    evaluated = evaluate_versions([first])
    gate = evaluated["gate"]
    assert (gate["champion"], gate["champion_score"]) == (None, None)
    assert gate["evaluated_on"]["excluded_champion_train"] == 0
    assert gate["evaluated_on"]["interactions"] == grown["first"]["counts"]["test"]
    assert gate["candidate_score"] == pytest.approx(
        evaluated["models"][0]["metrics"][GATE_METRIC], abs=1e-6)
    assert registry.promote_if_better(evaluated)["promoted"]
