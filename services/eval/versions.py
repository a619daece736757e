"""Evaluate one registered version, named by number or alias, beside the most-popular baseline.

The eval service reads the registry's tables (`model_version`, `model_alias`, `snapshot`)
through `shared.db`; it never imports the registry service. A version is measured on its
own snapshot's test split, and so is the baseline: the registered `popular` version of that
snapshot when there is one, else popularity counted from the snapshot's train split (the
same counts the train service's `popular` algorithm uses).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sqlalchemy import select

from services.eval.offline import (
    DEFAULT_NAME,
    EvaluationError,
    evaluate_on_snapshot,
    measure_on_snapshot,
)
from shared.artifacts import arrays_to_csr, read_artifact
from shared.db import ModelAlias, ModelVersion, Snapshot, session_scope
from shared.features import Weighting
from shared.recommenders import PopularityModel, evaluate_model
from shared.settings import get_settings

ALIASES = ("champion", "challenger")
BASELINE_ALGORITHM = "popular"
BASELINE_PREFIX = "baseline_"  # the baseline's figures, stored beside the version's own


class UnknownVersionError(EvaluationError):
    """The version or alias asked for is not in the registry."""


def _record(version: ModelVersion, aliases: list[str]) -> dict[str, Any]:
    return {"name": version.name, "version": version.version, "algorithm": version.algorithm,
            "params": version.params, "snapshot": version.snapshot_id,
            "artifact_path": version.artifact_path, "sha256": version.sha256,
            "metrics": dict(version.metrics or {}), "aliases": aliases}


def resolve_version(model: str | int, name: str = DEFAULT_NAME) -> dict[str, Any]:
    """The version record `model` names: a number, `latest` (the champion) or an alias."""
    text = str(model).strip().lower()
    with session_scope() as session:
        aliases: dict[int, list[str]] = {}
        for row in session.scalars(select(ModelAlias).where(ModelAlias.name == name)):
            aliases.setdefault(row.version, []).append(row.alias)
        if text in ("latest", *ALIASES):
            alias = "champion" if text == "latest" else text
            number = next((v for v, names in aliases.items() if alias in names), None)
            if number is None:
                raise UnknownVersionError(
                    f"model {name!r} has no {alias} yet, so --model {model} names no version; "
                    "run `recsys pipeline` or `recsys models promote VERSION`")
        elif text.isdigit():
            number = int(text)
        else:
            raise UnknownVersionError(f"model version {model!r} is not a number, 'latest' or "
                                      f"'challenger'")
        found = session.scalars(select(ModelVersion).where(
            ModelVersion.name == name, ModelVersion.version == number)).first()
        if found is None:
            known = session.scalars(select(ModelVersion.version).where(
                ModelVersion.name == name).order_by(ModelVersion.version)).all()
            listed = f"versions are {', '.join(map(str, known))}" if known else "none is registered"
            raise UnknownVersionError(f"model {name!r} has no version {model}; {listed}")
        return _record(found, sorted(aliases.get(number, [])))


def load_snapshot_arrays(snapshot_id: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The `snapshot` row of a version and its arrays, verified against the stored sha256."""
    with session_scope() as session:
        row = session.get(Snapshot, snapshot_id)
        if row is None:
            raise EvaluationError(f"snapshot {snapshot_id} is not in the snapshot table")
        info = {"snapshot_id": row.id, "protocol": row.protocol, "params": row.params,
                "counts": row.counts, "artifact_path": row.artifact_path, "sha256": row.sha256}
    arrays, _ = read_artifact(info["artifact_path"], info["sha256"])
    return info, arrays


def _registered_baseline(snapshot_id: str, name: str) -> dict[str, Any] | None:
    with session_scope() as session:
        found = session.scalars(select(ModelVersion).where(
            ModelVersion.name == name, ModelVersion.snapshot_id == snapshot_id,
            ModelVersion.algorithm == BASELINE_ALGORITHM).order_by(ModelVersion.version)).first()
        return _record(found, []) if found is not None else None


def popularity_metrics(arrays: dict[str, np.ndarray], k_values: list[int]) -> dict[str, float]:
    """Most-popular recommendations (train interaction counts) on the snapshot's test split."""
    counts = arrays.get("item_train_count")
    train = arrays_to_csr("train", arrays)
    if counts is None:  # a snapshot written before the statistics existed
        counts = np.diff(train.tocsc().indptr)
    model = PopularityModel(BASELINE_ALGORITHM, Weighting(), np.asarray(counts, np.float32))
    return evaluate_model(model, train, arrays_to_csr("test", arrays), k_values)


def baseline_on_snapshot(record: dict[str, Any], arrays: dict[str, np.ndarray],
                         k_values: list[int], name: str = DEFAULT_NAME,
                         own: dict[str, float] | None = None) -> dict[str, Any]:
    """The most-popular baseline on the snapshot `record` was trained on."""
    if record["algorithm"] == BASELINE_ALGORITHM and own is not None:
        return {"algorithm": BASELINE_ALGORITHM, "version": record["version"],
                "source": "registered", "metrics": own}
    registered = _registered_baseline(record["snapshot"], name)
    if registered is not None:
        return {"algorithm": BASELINE_ALGORITHM, "version": registered["version"],
                "source": "registered",
                "metrics": evaluate_on_snapshot(registered, arrays, k_values)}
    return {"algorithm": BASELINE_ALGORITHM, "version": None, "source": "train split counts",
            "metrics": popularity_metrics(arrays, k_values)}


def store_metrics(version: int, metrics: dict[str, float], name: str = DEFAULT_NAME) -> None:
    """Merge figures into a version's `metrics` (evaluation is deterministic, so repeatable)."""
    with session_scope() as session:
        row = session.scalars(select(ModelVersion).where(
            ModelVersion.name == name, ModelVersion.version == version)).one()
        row.metrics = {**(row.metrics or {}), **metrics}


def evaluate_version(model: str | int = "latest", k_values: list[int] | None = None,
                     name: str = DEFAULT_NAME, sample_users: int | None = None
                     ) -> dict[str, Any]:
    """Measure one version and the most-popular baseline on the version's own test split,
    store both on the version, and return them side by side. With `sample_users` (default
    EVAL_SAMPLE_USERS), the version is measured on a seeded sample of test users and each
    accuracy metric gets a 95% confidence interval."""
    ks = sorted({int(k) for k in (k_values or get_settings().eval_k_values)})
    if not ks or ks[0] < 1:
        raise EvaluationError(f"k values must be positive whole numbers, got {k_values}")
    sample = get_settings().eval_sample_users if sample_users is None else int(sample_users)
    if sample < 0:
        raise EvaluationError(f"sample of users must be 0 (all) or more, got {sample_users}")
    record = resolve_version(model, name)
    snapshot, arrays = load_snapshot_arrays(record["snapshot"])
    measured = measure_on_snapshot(record, arrays, ks, sample=sample)
    metrics = measured["metrics"]
    baseline = baseline_on_snapshot(record, arrays, ks, name, own=metrics)
    store_metrics(record["version"], {**metrics, **{
        f"{BASELINE_PREFIX}{key}": value for key, value in baseline["metrics"].items()}}, name)
    return {"name": name, "version": record["version"], "algorithm": record["algorithm"],
            "params": record["params"], "aliases": record["aliases"],
            "snapshot": snapshot["snapshot_id"], "protocol": snapshot["protocol"],
            "counts": snapshot["counts"], "k_values": ks, "metrics": metrics,
            "baseline": baseline,
            **{key: measured[key] for key in ("intervals", "sample") if key in measured}}
