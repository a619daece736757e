"""Seeded train/test split policies over an interactions frame.

The frame has columns user_id, movie_id, rating, rated_at (int unix seconds). Every policy
returns a :class:`Split` holding the train and test frames (original row order and index kept)
and a :class:`SplitSpec` that records the policy, its parameters and what came out, so a model
trained on the split can say exactly how it was evaluated. ``train, test = split`` also works.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any

import numpy as np
import pandas as pd

USER, ITEM, RATING, TIME = "user_id", "movie_id", "rating", "rated_at"
POLICIES: tuple[str, ...] = ("random", "temporal", "leave_last_n", "kfold")


@dataclass(frozen=True)
class SplitSpec:
    """What a split did: policy, parameters and the resulting sizes."""

    policy: str
    params: dict[str, Any] = field(default_factory=dict)
    n_train: int = 0
    n_test: int = 0
    n_test_users: int = 0
    cold_start_test_users: int = 0  # test users with no train rows
    cold_start_test_items: int = 0  # test items with no train rows


@dataclass(frozen=True, eq=False)
class Split:
    """Train and test frames plus the spec that produced them."""

    train: pd.DataFrame
    test: pd.DataFrame
    spec: SplitSpec

    def __iter__(self) -> Iterator[pd.DataFrame]:
        return iter((self.train, self.test))


def _require_columns(df: pd.DataFrame, columns: tuple[str, ...]) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"interactions frame lacks columns {missing}; has {list(df.columns)}")


def _make_split(df: pd.DataFrame, test_mask: np.ndarray, policy: str, **params: Any) -> Split:
    train, test = df[~test_mask], df[test_mask]
    test_users = pd.unique(test[USER])
    spec = SplitSpec(
        policy=policy,
        params=params,
        n_train=len(train),
        n_test=len(test),
        n_test_users=len(test_users),
        cold_start_test_users=int((~np.isin(test_users, train[USER].to_numpy())).sum()),
        cold_start_test_items=int((~np.isin(pd.unique(test[ITEM]), train[ITEM].to_numpy())).sum()),
    )
    return Split(train, test, spec)


def _shuffled_positions(df: pd.DataFrame, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-user rank (1-based) after a seeded shuffle, and each row's user row count.

    One uniform draw per row in frame order, then a sort by (user, draw): the same scheme as
    Microsoft Recommenders' ``python_stratified_split`` (legacy ``np.random.seed`` stream).
    """
    draws = np.random.RandomState(seed).rand(len(df))
    users = df[USER].to_numpy()
    order = np.lexsort((draws, users))
    sorted_users = users[order]
    starts = np.r_[True, sorted_users[1:] != sorted_users[:-1]]
    group_start = np.maximum.accumulate(np.where(starts, np.arange(len(df)), 0))
    rank = np.empty(len(df), dtype=np.int64)
    rank[order] = np.arange(len(df)) - group_start + 1
    counts = df.groupby(USER)[USER].transform("size").to_numpy()
    return rank, counts


def random_split(df: pd.DataFrame, ratio: float = 0.75, seed: int = 42) -> Split:
    """Per-user stratified random split: each user's first ``ratio`` share (after a seeded
    shuffle) trains, the rest tests.

    Identical to Recommenders' ``python_stratified_split`` (a row trains when its shuffled rank
    / user count <= ratio), except that users too small to keep any train row under that rule
    stay entirely in train instead of becoming test-only cold starts.
    """
    _require_columns(df, (USER, ITEM))
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"ratio must be strictly between 0 and 1, got {ratio}")
    if df.empty:
        return _make_split(df, np.zeros(0, dtype=bool), "random", ratio=ratio, seed=seed)
    rank, counts = _shuffled_positions(df, seed)
    test_mask = rank / counts > ratio
    too_small = 1.0 / counts > ratio  # not even the first shuffled row would train
    return _make_split(df, test_mask & ~too_small, "random", ratio=ratio, seed=seed)


def _to_unix_seconds(moment: datetime | date | str | int | float | pd.Timestamp) -> int:
    if isinstance(moment, int | float | np.integer | np.floating) and not isinstance(moment, bool):
        return int(moment)
    stamp = pd.Timestamp(moment)
    stamp = stamp.tz_localize(UTC) if stamp.tzinfo is None else stamp
    return int(stamp.timestamp())


def _iso(seconds: int) -> str:
    return datetime.fromtimestamp(int(seconds), tz=UTC).isoformat()


def temporal_split(
    df: pd.DataFrame, split_date: datetime | date | str | int | float | pd.Timestamp
) -> Split:
    """Rows rated before ``split_date`` train, rows at or after it test (naive dates are UTC).

    Raises ValueError naming the date and the data's first/last rating time when the date
    would leave train or test empty. Test users and items may be absent from train.
    """
    _require_columns(df, (USER, ITEM, TIME))
    if df.empty:
        raise ValueError("cannot split an empty interactions frame by date")
    cutoff = _to_unix_seconds(split_date)
    times = df[TIME].to_numpy(dtype=np.int64)
    first, last = int(times.min()), int(times.max())
    if not first < cutoff <= last:
        raise ValueError(
            f"split_date {_iso(cutoff)} ({split_date!r}) is outside the data: ratings run from "
            f"{_iso(first)} to {_iso(last)}, so the date must be after the first and no later "
            "than the last"
        )
    return _make_split(df, times >= cutoff, "temporal", split_date=_iso(cutoff))


def leave_last_n(df: pd.DataFrame, n: int = 1) -> Split:
    """Each user's last ``n`` interactions by time test; ties break by movie_id, then row order.

    Users with ``n`` or fewer interactions stay entirely in train.
    """
    _require_columns(df, (USER, ITEM, TIME))
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    order = np.lexsort(
        (np.arange(len(df)), df[ITEM].to_numpy(), df[TIME].to_numpy(), df[USER].to_numpy())
    )
    counts = df.groupby(USER)[USER].transform("size").to_numpy()
    sorted_users = df[USER].to_numpy()[order]
    starts = np.r_[True, sorted_users[1:] != sorted_users[:-1]] if len(df) else np.zeros(0, bool)
    group_start = np.maximum.accumulate(np.where(starts, np.arange(len(df)), 0))
    rank = np.empty(len(df), dtype=np.int64)
    rank[order] = np.arange(len(df)) - group_start + 1
    test_mask = (rank > counts - n) & (counts > n)
    return _make_split(df, test_mask, "leave_last_n", n=n)


def kfold_splits(df: pd.DataFrame, k: int = 5, seed: int = 42) -> list[Split]:
    """Per-user k-fold: each user's rows are shuffled (seeded) and dealt round-robin into k
    folds; fold f tests on its share. Users with fewer than k rows always stay in train.
    """
    _require_columns(df, (USER, ITEM))
    if k < 2:
        raise ValueError(f"k must be at least 2, got {k}")
    if df.empty:
        return [
            _make_split(df, np.zeros(0, dtype=bool), "kfold", k=k, seed=seed, fold=f)
            for f in range(k)
        ]
    rank, counts = _shuffled_positions(df, seed)
    fold = (rank - 1) % k
    eligible = counts >= k
    return [
        _make_split(df, (fold == f) & eligible, "kfold", k=k, seed=seed, fold=f) for f in range(k)
    ]


def validation_split(train: pd.DataFrame, like: SplitSpec | None = None) -> Split:
    """Carve a validation split out of a training frame only, mirroring the main split policy.

    Random uses the same ratio and seed; leave-last-n the same n; temporal cuts at the train-time
    quantile that reproduces the main test share; k-fold holds out one fold's share at random.
    Without ``like``, a random 75/25 split with seed 42 is used.
    """
    if like is None:
        return random_split(train)
    params = like.params
    if like.policy == "random":
        return random_split(train, ratio=params["ratio"], seed=params["seed"])
    if like.policy == "leave_last_n":
        return leave_last_n(train, n=params["n"])
    if like.policy == "kfold":
        k = int(params["k"])
        return random_split(train, ratio=(k - 1) / k, seed=params["seed"])
    if like.policy == "temporal":
        _require_columns(train, (TIME,))
        total = like.n_train + like.n_test
        test_share = like.n_test / total if total else 0.25
        cutoff = int(np.quantile(train[TIME].to_numpy(dtype=np.int64), 1.0 - test_share))
        cutoff = max(cutoff, int(train[TIME].min()) + 1)  # keep at least one train row
        return temporal_split(train, cutoff)
    raise ValueError(f"unknown split policy {like.policy!r}; expected one of {POLICIES}")
