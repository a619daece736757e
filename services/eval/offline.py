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
from shared.db import ModelAlias, ModelVersion, session_scope
from shared.errors import RecsysError
from shared.features import IdIndex
from shared.metrics import evaluate, item_popularity
from shared.recommenders import Recommender, from_arrays
from shared.settings import get_settings

DEFAULT_NAME = "recsys"


class EvaluationError(RecsysError):
    """A version or snapshot cannot be evaluated as asked."""


def load_model(record: dict[str, Any]) -> tuple[Recommender, np.ndarray, np.ndarray]:
    """The fitted model of a version record, with its raw user and item ids."""
    arrays, _ = read_artifact(record["artifact_path"], record["sha256"])
    return from_arrays(arrays), arrays["user_ids"], arrays["item_ids"]


def evaluate_on_snapshot(record: dict[str, Any], snapshot: dict[str, np.ndarray],
                         k_values: list[int]) -> dict[str, float]:
    """Metrics at every k of one version on a snapshot's test split (train items removed)."""
    model, model_users, model_items = load_model(record)
    train, test = arrays_to_csr("train", snapshot), arrays_to_csr("test", snapshot)
    users = np.flatnonzero(np.diff(test.indptr))
    k = max(k_values)
    snap_users, snap_items = snapshot["user_ids"], snapshot["item_ids"]
    history = train[users]
    if np.array_equal(model_users, snap_users) and np.array_equal(model_items, snap_items):
        recs, _ = model.recommend(users, history, k)
    else:
        # Translate between the snapshot's and the model's id spaces through raw ids.
        to_model = IdIndex(model_items).to_index(snap_items, allow_unknown=True)
        known = to_model >= 0
        coo = history.tocoo()
        keep = known[coo.col]
        rows = sp.csr_matrix((coo.data[keep], (coo.row[keep], to_model[coo.col[keep]])),
                             shape=(len(users), len(model_items)))
        model_user_index = IdIndex(model_users).to_index(snap_users[users], allow_unknown=True)
        model_recs, _ = model.recommend(model_user_index, rows, k)
        back = IdIndex(snap_items).to_index(
            np.where(model_recs >= 0, model_items[np.maximum(model_recs, 0)], -1),
            allow_unknown=True)
        recs = np.where(model_recs >= 0, back, -1)
    return evaluate(recs, test[users], k_values, item_popularity(train),
                    train_seen=history)


def _champion(name: str) -> dict[str, Any] | None:
    with session_scope() as session:
        alias = session.get(ModelAlias, (name, "champion"))
        if alias is None:
            return None
        version = session.scalars(select(ModelVersion).where(
            ModelVersion.name == name, ModelVersion.version == alias.version)).one()
        return {"version": version.version, "algorithm": version.algorithm,
                "params": version.params, "artifact_path": version.artifact_path,
                "sha256": version.sha256, "snapshot": version.snapshot_id}


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
    models = []
    for record in registered:
        metrics = evaluate_on_snapshot(record, arrays, ks)
        _store(name, record["version"], metrics)
        models.append({"version": record["version"], "algorithm": record["algorithm"],
                       "params": record["params"],
                       "metrics": {**record.get("metrics", {}), **metrics}})
    champion = _champion(name)
    champion_result = None
    if champion is not None:
        same = next((m for m in models if m["version"] == champion["version"]), None)
        metrics = same["metrics"] if same else evaluate_on_snapshot(champion, arrays, ks)
        champion_result = {"version": champion["version"], "algorithm": champion["algorithm"],
                           "params": champion["params"], "metrics": metrics}
    baseline = next((m for m in models if m["algorithm"] == "popular"), None)
    return {"snapshot": snapshot, "models": models, "champion": champion_result,
            "baseline": baseline, "k_values": ks}
