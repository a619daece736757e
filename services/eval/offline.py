"""Offline evaluation: ranking metrics of registered versions on a snapshot's test split.

A model carries the raw user and item ids it was trained with, so it can be measured on
any snapshot's test split, including a newer one than its own: that is how a new model
and the current champion are compared on the same split.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sp
from sqlalchemy import select

from shared.artifacts import arrays_to_csr, read_artifact
from shared.db import ModelAlias, ModelVersion, Snapshot, session_scope
from shared.errors import RecsysError
from shared.features import IdIndex
from shared.metrics import GATE_METRIC, accuracy_intervals, evaluate, item_popularity
from shared.recommenders import Recommender, from_arrays
from shared.settings import get_settings

DEFAULT_NAME = "recsys"


class EvaluationError(RecsysError):
    """A version or snapshot cannot be evaluated as asked."""


def load_model(record: dict[str, Any]) -> tuple[Recommender, np.ndarray, np.ndarray]:
    """The fitted model of a version record, with its raw user and item ids."""
    arrays, _ = read_artifact(record["artifact_path"], record["sha256"])
    return from_arrays(arrays), arrays["user_ids"], arrays["item_ids"]


def _to_space(matrix: sp.csr_matrix, from_users: np.ndarray, from_items: np.ndarray,
              to_users: np.ndarray, to_items: np.ndarray) -> sp.csr_matrix:
    """`matrix` (rows `from_users`, columns `from_items`, raw ids) re-indexed by `to_users` and
    `to_items`; cells whose user or item the target lacks are dropped."""
    coo = matrix.tocoo()
    rows = IdIndex(to_users).to_index(from_users[coo.row], allow_unknown=True)
    cols = IdIndex(to_items).to_index(from_items[coo.col], allow_unknown=True)
    keep = (rows >= 0) & (cols >= 0)
    return sp.csr_matrix((coo.data[keep], (rows[keep], cols[keep])),
                         shape=(len(to_users), len(to_items)))


def sample_users(users: np.ndarray, size: int, seed: int) -> np.ndarray:
    """A seeded sample of `size` of `users` (all of them when `size` is 0 or not smaller),
    in ascending order, so the same seed and users give the same sample."""
    if size <= 0 or size >= users.size:
        return users
    return np.sort(np.random.default_rng(seed).choice(users, size=size, replace=False))


def measure_on_snapshot(record: dict[str, Any], snapshot: dict[str, np.ndarray],
                        k_values: list[int], test: sp.csr_matrix | None = None,
                        exclude: sp.csr_matrix | None = None, sample: int = 0
                        ) -> dict[str, Any]:
    """Metrics at every k of one version on a snapshot's test split (train items removed).

    `test` replaces the snapshot's test split and `exclude` the train items left out of the
    lists (the promotion gate hides what the champion was trained on, too); the model is
    always shown the snapshot's train split as each user's history. With `sample` > 0, a
    seeded sample of that many test users is measured, and each accuracy metric gets a 95%
    confidence interval. Memory: the splits, the model, users x k recommendations and one
    score block of at most `SCORE_BLOCK_CELLS` cells at a time.
    """
    model, model_users, model_items = load_model(record)
    train = arrays_to_csr("train", snapshot)
    test = arrays_to_csr("test", snapshot) if test is None else test
    all_users = np.flatnonzero(np.diff(test.indptr))
    users = sample_users(all_users, sample, get_settings().seed)
    k = max(k_values)
    snap_users, snap_items = snapshot["user_ids"], snapshot["item_ids"]
    history = train[users]
    hidden = history if exclude is None else exclude[users]
    if np.array_equal(model_users, snap_users) and np.array_equal(model_items, snap_items):
        recs, _ = model.recommend(users, history, k, exclude=hidden)
    else:
        # Translate between the snapshot's and the model's id spaces through raw ids.
        rows_users = snap_users[users]
        model_user_index = IdIndex(model_users).to_index(rows_users, allow_unknown=True)
        model_recs, _ = model.recommend(
            model_user_index, _to_space(history, rows_users, snap_items, rows_users, model_items),
            k, exclude=_to_space(hidden, rows_users, snap_items, rows_users, model_items))
        back = IdIndex(snap_items).to_index(
            np.where(model_recs >= 0, model_items[np.maximum(model_recs, 0)], -1),
            allow_unknown=True)
        recs = np.where(model_recs >= 0, back, -1)
    truth = test[users]
    measured: dict[str, Any] = {"metrics": evaluate(recs, truth, k_values, item_popularity(train),
                                                    train_seen=hidden)}
    if users.size < all_users.size:
        measured["intervals"] = accuracy_intervals(recs, truth, k_values)
        measured["sample"] = {"users": int(users.size), "test_users": int(all_users.size),
                              "seed": get_settings().seed}
    return measured


def evaluate_on_snapshot(record: dict[str, Any], snapshot: dict[str, np.ndarray],
                         k_values: list[int], test: sp.csr_matrix | None = None,
                         exclude: sp.csr_matrix | None = None, sample: int = 0
                         ) -> dict[str, float]:
    """The metrics of `measure_on_snapshot` alone."""
    return measure_on_snapshot(record, snapshot, k_values, test, exclude, sample)["metrics"]


def _binary(matrix: sp.csr_matrix) -> sp.csr_matrix:
    out = matrix.copy().astype(np.float32)
    out.data[:] = 1.0
    return out


def gate_split(snapshot: dict[str, np.ndarray], snapshot_id: str,
               champion_snapshot: dict[str, np.ndarray] | None,
               champion_snapshot_id: str | None
               ) -> tuple[sp.csr_matrix, sp.csr_matrix, dict[str, Any]]:
    """The interactions a candidate and the champion are compared on, and what to hide.

    The test split of the candidate's snapshot, less every interaction the champion was
    trained on: a snapshot of grown data draws its random split anew, so part of its test
    split is the champion's training data, which would flatter the champion. The removed
    interactions are hidden from both models' lists like train items. Returns (test,
    exclude, description).
    """
    train, test = arrays_to_csr("train", snapshot), arrays_to_csr("test", snapshot)
    overlap = sp.csr_matrix(test.shape, dtype=np.float32)
    if champion_snapshot is not None and champion_snapshot_id != snapshot_id:
        seen = _to_space(_binary(arrays_to_csr("train", champion_snapshot)),
                         champion_snapshot["user_ids"], champion_snapshot["item_ids"],
                         snapshot["user_ids"], snapshot["item_ids"])
        overlap = test.multiply(_binary(seen)).tocsr()
        overlap.eliminate_zeros()
    if overlap.nnz:
        gate_test = (test - overlap).tocsr()
        gate_test.eliminate_zeros()
        exclude = (_binary(train) + _binary(overlap)).tocsr()
    else:
        gate_test, exclude = test, train
    described = {
        "snapshot": snapshot_id, "split": "test", "interactions": int(gate_test.nnz),
        "users": int(np.count_nonzero(np.diff(gate_test.indptr))),
        "champion_snapshot": champion_snapshot_id,
        "excluded_champion_train": int(overlap.nnz),
        "rule": "the snapshot's test split less the interactions the champion was trained on",
    }
    return gate_test, exclude, described


def _champion(name: str) -> dict[str, Any] | None:
    with session_scope() as session:
        alias = session.get(ModelAlias, (name, "champion"))
        if alias is None:
            return None
        version = session.scalars(select(ModelVersion).where(
            ModelVersion.name == name, ModelVersion.version == alias.version)).one()
        snapshot = session.get(Snapshot, version.snapshot_id)
        return {"version": version.version, "algorithm": version.algorithm,
                "params": version.params, "artifact_path": version.artifact_path,
                "sha256": version.sha256, "snapshot": version.snapshot_id,
                "snapshot_artifact": None if snapshot is None else {
                    "artifact_path": snapshot.artifact_path, "sha256": snapshot.sha256}}


def _store(name: str, version: int, metrics: dict[str, float]) -> None:
    with session_scope() as session:
        row = session.scalars(select(ModelVersion).where(
            ModelVersion.name == name, ModelVersion.version == version)).one()
        row.metrics = {**(row.metrics or {}), **metrics}


def evaluate_versions(registered: list[dict[str, Any]], k_values: list[int] | None = None,
                      name: str = DEFAULT_NAME) -> dict[str, Any]:
    """Measure registered versions on their snapshot's test split, store the figures, and
    measure the current champion on the same split for the promotion gate."""
    if not registered:
        raise EvaluationError("no versions to evaluate")
    snapshots = {r["snapshot_artifact"]["snapshot_id"] for r in registered}
    if len(snapshots) != 1:
        raise EvaluationError(f"versions come from {len(snapshots)} snapshots; evaluate one "
                              "snapshot's versions together")
    snapshot = registered[0]["snapshot_artifact"]
    arrays, _ = read_artifact(snapshot["artifact_path"], snapshot["sha256"])
    ks = k_values or get_settings().eval_k_values
    sample = get_settings().eval_sample_users
    models = []
    for record in registered:
        measured = measure_on_snapshot(record, arrays, ks, sample=sample)
        _store(name, record["version"], measured["metrics"])
        models.append({"version": record["version"], "algorithm": record["algorithm"],
                       "params": record["params"],
                       "metrics": {**record.get("metrics", {}), **measured["metrics"]},
                       **{key: measured[key] for key in ("intervals", "sample")
                          if key in measured}})
    baseline = next((m for m in models if m["algorithm"] == "popular"), None)
    champion = _champion(name)
    # Without the gate's k among EVAL_K_VALUES there is nothing to gate on; promotion says so.
    gate = (measure_gate(models, registered, champion, snapshot, arrays, ks, sample)
            if all(GATE_METRIC in m["metrics"] for m in models) else None)
    champion_result = None
    if champion is not None and gate is not None:
        champion_result = {"version": champion["version"], "algorithm": champion["algorithm"],
                           "params": champion["params"], "metrics": gate.pop("champion_metrics")}
    elif champion is not None:
        champion_result = {"version": champion["version"], "algorithm": champion["algorithm"],
                           "params": champion["params"],
                           "metrics": evaluate_on_snapshot(champion, arrays, ks,
                                                           sample=sample)}
    if gate is not None:
        gate.pop("champion_metrics", None)
    return {"snapshot": snapshot, "models": models, "champion": champion_result,
            "baseline": baseline, "k_values": ks, "gate": gate}


def measure_gate(models: list[dict[str, Any]], registered: list[dict[str, Any]],
                 champion: dict[str, Any] | None, snapshot: dict[str, Any],
                 arrays: dict[str, np.ndarray], ks: list[int], sample: int = 0
                 ) -> dict[str, Any]:
    """The best new version (by `GATE_METRIC` on the test split) and the champion, measured
    on interactions neither was trained on (see `gate_split`)."""
    best = max(models, key=lambda m: (m["metrics"][GATE_METRIC], -m["version"]))
    champion_arrays = None
    if champion is not None and champion["snapshot"] != snapshot["snapshot_id"]:
        where = champion["snapshot_artifact"]
        if where is None:
            raise EvaluationError(f"champion v{champion['version']}'s snapshot "
                                  f"{champion['snapshot']} is not in the registry, so it cannot "
                                  "be compared on data it was not trained on")
        champion_arrays, _ = read_artifact(where["artifact_path"], where["sha256"])
    test, exclude, described = gate_split(
        arrays, snapshot["snapshot_id"], champion_arrays,
        None if champion is None else champion["snapshot"])
    if 0 < sample < described["users"]:
        described["sampled_users"] = sample
    unchanged = described["excluded_champion_train"] == 0
    record = next(r for r in registered if r["version"] == best["version"])
    candidate_metrics = best["metrics"] if unchanged else evaluate_on_snapshot(
        record, arrays, ks, test, exclude, sample)
    champion_metrics = None
    if champion is not None:
        same = next((m for m in models if m["version"] == champion["version"]), None)
        champion_metrics = same["metrics"] if same and unchanged else evaluate_on_snapshot(
            champion, arrays, ks, test, exclude, sample)
    return {"metric": GATE_METRIC, "candidate": best["version"],
            "candidate_score": round(float(candidate_metrics[GATE_METRIC]), 6),
            "champion": None if champion is None else champion["version"],
            "champion_score": None if champion_metrics is None
            else round(float(champion_metrics[GATE_METRIC]), 6),
            "evaluated_on": described, "champion_metrics": champion_metrics}
