"""The model registry: versions, aliases (champion, challenger), promote and rollback.

Versions are numbered per model name. Registering the same snapshot, algorithm and
parameters twice yields the same version (its `fit_key`). Moving an alias publishes a
`model.promoted` event, which serving replicas follow to hot-swap.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import sqlalchemy.exc
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from shared.artifacts import read_manifest
from shared.db import AliasChange, ModelAlias, ModelVersion, session_scope
from shared.errors import RecsysError
from shared.events import get_event_bus
from shared.metrics import GATE_METRIC

DEFAULT_NAME = "recsys"
ALIASES = ("champion", "challenger")


class RegistryError(RecsysError):
    """A registry request names something that does not exist or cannot be done."""


def fit_key(snapshot_id: str, algorithm: str, params: dict[str, Any]) -> str:
    """What makes two trainings the same: snapshot, algorithm and parameters."""
    text = json.dumps({"snapshot": snapshot_id, "algorithm": algorithm, "params": params},
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def describe(version: ModelVersion, aliases: list[str] | None = None) -> dict[str, Any]:
    return {
        "name": version.name, "version": version.version, "algorithm": version.algorithm,
        "params": version.params, "metrics": version.metrics, "snapshot": version.snapshot_id,
        "artifact_path": version.artifact_path, "sha256": version.sha256,
        "task_id": version.task_id, "aliases": aliases or [],
        "created_at": version.created_at.isoformat() if version.created_at else None,
    }


def _aliases(session: Session, name: str) -> dict[int, list[str]]:
    found: dict[int, list[str]] = {}
    for alias in session.scalars(select(ModelAlias).where(ModelAlias.name == name)):
        found.setdefault(alias.version, []).append(alias.alias)
    return found


def _get(session: Session, name: str, version: int) -> ModelVersion:
    found = session.scalars(select(ModelVersion).where(
        ModelVersion.name == name, ModelVersion.version == version)).first()
    if found is None:
        raise RegistryError(f"model {name!r} has no version {version}")
    return found


def register(snapshot_id: str, algorithm: str, params: dict[str, Any], artifact_path: str,
             sha256: str, metrics: dict[str, Any] | None = None, name: str = DEFAULT_NAME,
             task_id: str | None = None) -> dict[str, Any]:
    """Record a trained model; the same snapshot, algorithm and parameters give one version."""
    manifest = read_manifest(artifact_path)
    if manifest.get("sha256") != sha256:
        raise RegistryError(f"artifact {artifact_path} has sha256 {manifest.get('sha256')}, "
                            f"not {sha256}")
    key = fit_key(snapshot_id, algorithm, params)
    for _attempt in range(3):
        try:
            with session_scope() as session:
                existing = session.scalars(select(ModelVersion).where(
                    ModelVersion.fit_key == key)).first()
                if existing is not None:
                    return {**describe(existing, _aliases(session, name).get(existing.version)),
                            "created": False}
                number = (session.scalar(select(func.max(ModelVersion.version)).where(
                    ModelVersion.name == name)) or 0) + 1
                version = ModelVersion(
                    name=name, version=number, algorithm=algorithm, params=params,
                    snapshot_id=snapshot_id, metrics=metrics or {}, artifact_path=artifact_path,
                    sha256=sha256, fit_key=key, task_id=task_id)
                session.add(version)
                session.flush()
                return {**describe(version), "created": True}
        except sqlalchemy.exc.IntegrityError:
            continue  # a concurrent registration took the number or the key; look again
    raise RegistryError(f"could not register {algorithm} on snapshot {snapshot_id}")


def record_metrics(version: int, metrics: dict[str, Any], name: str = DEFAULT_NAME) -> None:
    """Merge offline metrics into a version's record."""
    with session_scope() as session:
        found = _get(session, name, version)
        found.metrics = {**(found.metrics or {}), **metrics}


def get_version(version: int, name: str = DEFAULT_NAME) -> dict[str, Any]:
    with session_scope() as session:
        return describe(_get(session, name, version), _aliases(session, name).get(version))


def alias_version(alias: str, name: str = DEFAULT_NAME) -> int | None:
    with session_scope() as session:
        found = session.get(ModelAlias, (name, alias))
        return found.version if found else None


def resolve(model_version: str | int, name: str = DEFAULT_NAME) -> dict[str, Any]:
    """`latest` is the champion; a number pins that version."""
    text = str(model_version).strip().lower()
    if text in ("latest", *ALIASES):
        number = alias_version("champion" if text == "latest" else text, name)
        if number is None:
            raise RegistryError(f"model {name!r} has no {'champion' if text == 'latest' else text}"
                                " yet; run the pipeline or promote a version")
        return get_version(number, name)
    if not text.isdigit():
        raise RegistryError(f"model version {model_version!r} is neither 'latest' nor a number")
    return get_version(int(text), name)


def list_versions(name: str = DEFAULT_NAME) -> list[dict[str, Any]]:
    with session_scope() as session:
        aliases = _aliases(session, name)
        return [describe(v, aliases.get(v.version)) for v in session.scalars(
            select(ModelVersion).where(ModelVersion.name == name).order_by(ModelVersion.version))]


def _move(alias: str, version: int | None, action: str, reason: str, name: str
          ) -> dict[str, Any]:
    if alias not in ALIASES:
        raise RegistryError(f"alias {alias!r} is not one of {', '.join(ALIASES)}")
    with session_scope() as session:
        current = session.get(ModelAlias, (name, alias))
        previous = current.version if current else None
        if version is not None:
            target = _get(session, name, version)
            if current is None:
                session.add(ModelAlias(name=name, alias=alias, version=version))
            else:
                current.version, current.updated_at = version, func.now()
        elif current is not None:
            session.delete(current)
        session.add(AliasChange(name=name, alias=alias, from_version=previous,
                                to_version=version, action=action, reason=reason))
        payload = {"name": name, "alias": alias, "version": version, "previous": previous,
                   "action": action, "reason": reason}
        if version is not None:
            payload.update(artifact_path=target.artifact_path, sha256=target.sha256,
                           algorithm=target.algorithm)
    get_event_bus().publish("model.promoted", payload)
    return payload


def promote(version: int, alias: str = "champion", reason: str = "",
            name: str = DEFAULT_NAME) -> dict[str, Any]:
    """Point `alias` at `version` and announce it."""
    return _move(alias, version, "promote", reason, name)


def rollback(alias: str = "champion", reason: str = "", name: str = DEFAULT_NAME
             ) -> dict[str, Any]:
    """Move `alias` back to the version it held before the promotion that set it."""
    with session_scope() as session:
        current = session.get(ModelAlias, (name, alias))
        if current is None:
            raise RegistryError(f"model {name!r} has no {alias} to roll back")
        promotion = session.scalars(
            select(AliasChange).where(AliasChange.name == name, AliasChange.alias == alias,
                                      AliasChange.action == "promote",
                                      AliasChange.to_version == current.version)
            .order_by(AliasChange.id.desc())).first()
        if promotion is None or promotion.from_version is None:
            raise RegistryError(f"{alias} version {current.version} has no earlier version "
                                "to roll back to")
        target = promotion.from_version
    return _move(alias, target, "rollback", reason, name)


def _gate_from_models(evaluated: dict[str, Any], metric: str) -> dict[str, Any]:
    """The gate of an evaluation that did not measure one: the best version and the
    champion as they scored on the snapshot's whole test split."""
    models = evaluated.get("models") or []
    if not models:
        raise RegistryError("nothing was evaluated, so nothing can be promoted")
    missing = [m["version"] for m in models if metric not in m["metrics"]]
    if missing:
        raise RegistryError(f"versions {missing} have no {metric} to compare; EVAL_K_VALUES "
                            f"must include {metric.split('@')[-1]}")
    best = max(models, key=lambda m: (m["metrics"][metric], -m["version"]))
    champion = evaluated.get("champion")
    return {"metric": metric, "candidate": best["version"],
            "candidate_score": best["metrics"][metric],
            "champion": champion["version"] if champion else None,
            "champion_score": champion["metrics"][metric] if champion else None,
            "evaluated_on": {"snapshot": evaluated["snapshot"]["snapshot_id"], "split": "test"}}


def promote_if_better(evaluated: dict[str, Any], metric: str = GATE_METRIC,
                      name: str = DEFAULT_NAME) -> dict[str, Any]:
    """Promote the best evaluated version if its `metric` is at least the champion's on the
    same interactions, neither model trained on them (the evaluation's `gate`); otherwise
    make it the challenger."""
    models = evaluated.get("models") or []
    gate = evaluated.get("gate")
    if not gate or gate.get("metric") != metric:
        gate = _gate_from_models(evaluated, metric)
    candidate, score = gate["candidate"], gate["candidate_score"]
    champion, bar = gate["champion"], gate["champion_score"]
    measured_on = (f"{gate['evaluated_on'].get('interactions', 'the')} test interactions of "
                   f"snapshot {gate['evaluated_on']['snapshot'][:12]}")
    if gate["evaluated_on"].get("excluded_champion_train"):
        measured_on += (f" not in champion v{champion}'s training data ("
                        f"{gate['evaluated_on']['excluded_champion_train']} left out)")
    if champion is not None and champion == candidate:
        decision = {"promoted": False, "reason": f"v{candidate} is already the champion"}
    elif champion is None or score >= bar:
        reason = (f"{metric} {score:.4f} >= champion "
                  + (f"v{champion} {bar:.4f}" if champion is not None else "(none)")
                  + f" on {measured_on}")
        promote(candidate, "champion", reason, name)
        decision = {"promoted": True, "reason": reason}
    else:
        reason = f"{metric} {score:.4f} < champion v{champion} {bar:.4f} on {measured_on}"
        _move("challenger", candidate, "promote", reason, name)
        decision = {"promoted": False, "reason": reason}
    current = resolve("latest", name)
    previous = evaluated.get("champion")
    return {**decision, "candidate": candidate, "gate": gate,
            "champion": {k: current[k] for k in ("version", "algorithm", "params")}
            | {"metrics": next((m["metrics"] for m in models
                                if m["version"] == current["version"]),
                               previous["metrics"] if previous else current["metrics"])},
            "models": models, "snapshot": evaluated["snapshot"]}
