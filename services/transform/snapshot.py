"""Dataset snapshots: id maps, CSR splits, statistics and genre features, stored once.

A snapshot's id hashes the ratings it was built from and the settings that built it, so
the same ratings with the same settings name the same snapshot, and a repeated or
redelivered task finds it instead of making another.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd
import sqlalchemy.exc
from sqlalchemy import Engine

from services.transform.loading import load_movie_genres, load_ratings
from shared.artifacts import csr_to_arrays, write_artifact
from shared.db import Snapshot, get_engine, session_scope
from shared.errors import RecsysError
from shared.features import IdIndex, filter_min_interactions, interactions_csr
from shared.settings import EvalProtocol, EvalStratify, get_settings
from shared.splits import (
    Split,
    leave_last_n,
    random_split,
    temporal_split,
    validation_split,
)

SCHEMA_VERSION = 3  # bump when the snapshot's arrays change meaning


class SnapshotError(RecsysError):
    """The snapshot cannot be built from these ratings with these settings."""


@dataclass(frozen=True)
class SnapshotParams:
    """Everything that decides a snapshot's content besides the ratings."""

    protocol: str = EvalProtocol.RANDOM.value
    ratio: float = 0.75
    seed: int = 42
    stratify: str = EvalStratify.USER.value
    split_date: str = "2000-11-01"
    last_n: int = 1
    min_user_interactions: int = 1
    min_item_interactions: int = 1

    @classmethod
    def from_settings(cls, **overrides: Any) -> SnapshotParams:
        settings = get_settings()
        values: dict[str, Any] = {"protocol": settings.eval_protocol.value,
                                  "seed": settings.seed,
                                  "stratify": settings.eval_stratify.value,
                                  "split_date": settings.eval_split_date.isoformat()}
        values.update({k: v for k, v in overrides.items() if v is not None})
        params = cls(**values)
        if params.protocol not in {p.value for p in EvalProtocol}:
            raise SnapshotError(f"protocol {params.protocol!r} is not one of "
                                f"{', '.join(p.value for p in EvalProtocol)}")
        if params.stratify not in {s.value for s in EvalStratify}:
            raise SnapshotError(f"stratify {params.stratify!r} is not one of "
                                f"{', '.join(s.value for s in EvalStratify)}")
        return params


def _split(frame: pd.DataFrame, params: SnapshotParams) -> Split:
    if params.protocol == EvalProtocol.RANDOM:
        return random_split(frame, ratio=params.ratio, seed=params.seed,
                            stratify=params.stratify)
    if params.protocol == EvalProtocol.LEAVE_LAST_N:
        return leave_last_n(frame, n=params.last_n)
    try:
        return temporal_split(frame, dt.date.fromisoformat(params.split_date))
    except ValueError as error:
        raise SnapshotError(f"EVAL_SPLIT_DATE {params.split_date}: {error}") from None


def canonical_order(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per (user, movie), the latest, sorted by user, time and movie: the seeded
    split must not depend on the order the database (or a file) gives the rows in."""
    users = frame["user_id"].to_numpy(np.int64)
    movies = frame["movie_id"].to_numpy(np.int64)
    times = frame["rated_at"].to_numpy(np.int64)
    # One stable sort by (user, time, movie). Where both ranges fit, user and time share
    # one int64 key, a sort pass fewer over the same order.
    user_span = int(users.max()) - int(users.min()) if len(users) else 0
    time_span = int(times.max()) - int(times.min()) if len(times) else 0
    if user_span < (1 << 31) and time_span < (1 << 32):
        user_time = ((users - users.min()) << 32) | (times - times.min())
        order = np.lexsort((movies, user_time))
    else:
        order = np.lexsort((movies, times, users))
    # A user may have rated a movie and clicked it later: the latest interaction stands (of
    # two at the same second, the later row). In this order a pair's latest row is its
    # last. One int64 key per pair hashes faster than the two columns.
    pair = (users[order] << 32) | movies[order]
    order = order[~pd.Series(pair).duplicated(keep="last").to_numpy()]
    return frame.iloc[order].reset_index(drop=True)


def _fingerprint(frame: pd.DataFrame) -> str:
    digest = hashlib.sha256()
    for column in ("user_id", "movie_id", "rating", "rated_at"):
        digest.update(np.ascontiguousarray(frame[column].to_numpy()).tobytes())
    return digest.hexdigest()


def snapshot_id(fingerprint: str, params: SnapshotParams) -> str:
    text = json.dumps({"ratings": fingerprint, "params": asdict(params),
                       "schema": SCHEMA_VERSION}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _statistics(train: pd.DataFrame, users: IdIndex, items: IdIndex) -> dict[str, np.ndarray]:
    """Per-item and per-user counts and mean ratings over the train split."""
    stats: dict[str, np.ndarray] = {}
    ratings = train["rating"].to_numpy(dtype=np.float64)
    for prefix, index, column in (("item", items, "movie_id"), ("user", users, "user_id")):
        position = index.to_index(train[column].to_numpy())
        counts = np.bincount(position, minlength=len(index))
        sums = np.bincount(position, weights=ratings, minlength=len(index))
        stats[f"{prefix}_train_count"] = counts.astype(np.int64)
        stats[f"{prefix}_mean_rating"] = np.divide(
            sums, counts, out=np.zeros(len(index)), where=counts > 0).astype(np.float32)
    return stats


def describe(row: Snapshot) -> dict[str, Any]:
    return {"snapshot_id": row.id, "artifact_path": row.artifact_path, "sha256": row.sha256,
            "protocol": row.protocol, "params": row.params, "counts": row.counts}


def build_snapshot(params: SnapshotParams, engine: Engine | None = None,
                   task_id: str | None = None) -> dict[str, Any]:
    """Build (or find) the snapshot of the current ratings under `params`."""
    engine = engine or get_engine()
    frame = load_ratings(engine, get_settings().feedback_implicit_rating)
    if frame.empty:
        raise SnapshotError("there are no ratings to snapshot; run `recsys ingest` first")
    frame = canonical_order(frame)
    frame = filter_min_interactions(frame, params.min_user_interactions,
                                    params.min_item_interactions).reset_index(drop=True)
    fingerprint = _fingerprint(frame)
    key = snapshot_id(fingerprint, params)
    with session_scope(engine) as session:
        existing = session.get(Snapshot, key)
        if existing is not None:
            return {**describe(existing), "created": False}

    split = _split(frame, params)
    validation = validation_split(split.train, like=split.spec)
    users = IdIndex.from_values(frame["user_id"])
    items = IdIndex.from_values(frame["movie_id"])
    genre_names, genres = load_movie_genres(engine, items.ids)
    arrays: dict[str, np.ndarray] = {
        "user_ids": users.ids.astype(np.int64),
        "item_ids": items.ids.astype(np.int64),
        **_statistics(split.train, users, items),
        "genre_names": genre_names,
        "item_genres": genres,
    }
    parts = {"train": split.train, "test": split.test, "validation_train": validation.train,
             "validation_test": validation.test}
    for name, part in parts.items():
        arrays.update(csr_to_arrays(name, interactions_csr(part, users, items)))
    counts = {"ratings": len(frame), "users": len(users), "items": len(items),
              **{name: len(part) for name, part in parts.items()},
              "test_users": split.spec.n_test_users,
              "cold_start_test_users": split.spec.cold_start_test_users}
    manifest = {"kind": "snapshot", "snapshot_id": key, "ratings_fingerprint": fingerprint,
                "params": asdict(params), "split": {"policy": split.spec.policy,
                                                   "params": split.spec.params},
                "validation": {"policy": validation.spec.policy,
                               "params": validation.spec.params},
                "counts": counts, "schema": SCHEMA_VERSION}
    ref = write_artifact("snapshots", arrays, manifest)
    row = Snapshot(id=key, ratings_fingerprint=fingerprint, protocol=params.protocol,
                   params=asdict(params), counts=counts, artifact_path=ref.path,
                   sha256=ref.sha256, task_id=task_id)
    try:
        with session_scope(engine) as session:
            session.add(row)
    except sqlalchemy.exc.IntegrityError:  # a concurrent twin recorded it first
        with session_scope(engine) as session:
            return {**describe(session.get(Snapshot, key)), "created": False}
    return {**describe(row), "created": True}
