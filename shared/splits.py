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


STRATIFY: tuple[str, ...] = ("user", "item")


def _ranks_in_groups(groups: np.ndarray, order: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rank (1-based) of each row within its group when rows are taken in ``order`` (which
    must sort ``groups``), and the size of that group."""
    sorted_groups = groups[order]
    starts = np.flatnonzero(np.r_[True, sorted_groups[1:] != sorted_groups[:-1]])
    sizes = np.diff(np.r_[starts, len(order)])
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order)) - np.repeat(starts, sizes) + 1
    counts = np.empty(len(order), dtype=np.int64)
    counts[order] = np.repeat(sizes, sizes)
    return rank, counts


def _group_then_draw_order(groups: np.ndarray, draws: np.ndarray) -> np.ndarray:
    """``np.lexsort((draws, groups))``: rows by group, then draw, then position.

    Where group ids are small integers, one sort of ``group + draw`` (a float in
    [group, group + 1)) usually gives that order in a fraction of lexsort's time: rounding
    is monotone, so it can only tie two draws of a group, never swap them. The result is
    checked pair by pair against the exact order and lexsort runs only when it fails.
    """
    if len(groups) < 2 or groups.dtype.kind not in "iu" or np.abs(groups).max() >= (1 << 40):
        return np.lexsort((draws, groups))
    order = np.argsort(groups.astype(np.float64) + draws)
    g, d = groups[order], draws[order]
    ahead = (g[1:] > g[:-1]) | ((g[1:] == g[:-1]) & (
        (d[1:] > d[:-1]) | ((d[1:] == d[:-1]) & (order[1:] > order[:-1]))))
    return order if ahead.all() else np.lexsort((draws, groups))


def _shuffled_positions(df: pd.DataFrame, seed: int, by: str = USER
                        ) -> tuple[np.ndarray, np.ndarray]:
    """Rank (1-based) of each row within its group of ``by`` after a seeded shuffle, and the
    size of that group.

    One uniform draw per row in frame order (legacy ``np.random.RandomState`` stream), then a
    sort by (group, draw).
    """
    draws = np.random.RandomState(seed).rand(len(df))
    groups = df[by].to_numpy()
    return _ranks_in_groups(groups, _group_then_draw_order(groups, draws))


def train_counts(counts: np.ndarray, ratio: float) -> np.ndarray:
    """Rows of a group of each size that train: ``round(ratio * size)``, rounding half to
    even as Python's ``round`` does (Recommenders' ``split_pandas_data_with_ratios`` cuts
    each group at ``round(ratio * len(group))``), but at least one row."""
    return np.maximum(np.rint(ratio * np.asarray(counts, dtype=np.float64)), 1).astype(np.int64)


def random_split(df: pd.DataFrame, ratio: float = 0.75, seed: int = 42,
                 stratify: str = "user") -> Split:
    """Stratified random split: within each user (or each item, ``stratify="item"``), rows
    are shuffled (seeded) and the first ``round(ratio * count)`` train, the rest test.

    The cut is Microsoft Recommenders' ``python_stratified_split(..., filter_by=stratify)``:
    per group, ``round(ratio * count)`` rows train, rounding half to even. Two differences:
    the shuffle is one seeded draw per row of the frame as given (the pipeline gives it in a
    canonical order), so which rows train differs from Recommenders' own draw while every
    group's train count is the same; and a group that rule would leave with no train row
    (``round`` giving 0) stays entirely in train instead of becoming a test-only cold start.
    """
    _require_columns(df, (USER, ITEM))
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"ratio must be strictly between 0 and 1, got {ratio}")
    if stratify not in STRATIFY:
        raise ValueError(f"stratify must be one of {', '.join(STRATIFY)}, got {stratify!r}")
    by = USER if stratify == "user" else ITEM
    params = {"ratio": ratio, "seed": seed, "stratify": stratify}
    if df.empty:
        return _make_split(df, np.zeros(0, dtype=bool), "random", **params)
    rank, counts = _shuffled_positions(df, seed, by)
    return _make_split(df, rank > train_counts(counts, ratio), "random", **params)


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
    rank, counts = _ranks_in_groups(df[USER].to_numpy(), order)
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

    Random uses the same ratio, seed and stratification; leave-last-n the same n; temporal
    cuts at the train-time quantile that reproduces the main test share; k-fold holds out
    one fold's share at random.
    Without ``like``, a random 75/25 split with seed 42 is used.
    """
    if like is None:
        return random_split(train)
    params = like.params
    if like.policy == "random":
        return random_split(train, ratio=params["ratio"], seed=params["seed"],
                            stratify=params.get("stratify", "user"))
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
