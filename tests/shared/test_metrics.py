"""Ranking metrics: hand-computed cases, a loop reference, and implicit where definitions agree.

implicit.evaluation.ranking_metrics_at_k vs. these (Recommenders) definitions:
* ndcg: identical (binary gains, ideal DCG over min(R, k) ranks, mean over users with tests).
* precision: implicit divides total hits by sum(min(k, R)); Recommenders averages hits / k.
  They coincide only when every test user has at least k test items.
* map: implicit divides each user's summed precisions by min(k, R); Recommenders' ``map`` by R.
  They coincide only when every test user has at most k test items.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from implicit.evaluation import ranking_metrics_at_k

from shared.metrics import (
    catalogue_coverage_at_k,
    evaluate,
    hit_rate_at_k,
    map_at_k,
    mrr_at_k,
    ndcg_at_k,
    novelty_at_k,
    popularity_bias_at_k,
    precision_at_k,
    recall_at_k,
)

RECS = np.array([[1, 2, 3], [4, 5, 6], [6, 4, -1], [9, 8, 0]])
TRUTH = [np.array([2, 7]), np.array([], dtype=int), np.array([6]), np.array([0, 1, 2, 3, 4])]
D2, D3, D4 = 1.0, 1 / np.log2(3), 1 / np.log2(4)  # discounts at ranks 1..3


def test_hand_computed_accuracy_metrics() -> None:
    # user 0: hit at rank 2 of R=2; user 1: no test items (skipped); user 2: hit at rank 1 of
    # R=1 (row padded with -1); user 3: hit at rank 3 of R=5.
    assert precision_at_k(RECS, TRUTH, 3) == pytest.approx((1 / 3 + 1 / 3 + 1 / 3) / 3)
    assert recall_at_k(RECS, TRUTH, 3) == pytest.approx((1 / 2 + 1 + 1 / 5) / 3)
    ndcg = (D3 / (D2 + D3) + 1.0 + D4 / (D2 + D3 + D4)) / 3
    assert ndcg_at_k(RECS, TRUTH, 3) == pytest.approx(ndcg)
    # MAP divides by R (2, 1, 5), not by min(k, R).
    assert map_at_k(RECS, TRUTH, 3) == pytest.approx(((1 / 2) / 2 + 1.0 + (1 / 3) / 5) / 3)
    assert hit_rate_at_k(RECS, TRUTH, 3) == pytest.approx(1.0)
    assert mrr_at_k(RECS, TRUTH, 3) == pytest.approx((1 / 2 + 1 + 1 / 3) / 3)


def test_metrics_at_smaller_k_use_the_prefix() -> None:
    assert precision_at_k(RECS, TRUTH, 1) == pytest.approx(1 / 3)  # only user 2 hits at rank 1
    assert ndcg_at_k(RECS, TRUTH, 1) == pytest.approx(1 / 3)
    assert hit_rate_at_k(RECS, TRUTH, 2) == pytest.approx(2 / 3)


def test_truth_as_sparse_matrix_matches_lists() -> None:
    rows = np.repeat(np.arange(4), [len(t) for t in TRUTH])
    truth = sp.csr_matrix((np.ones(rows.size), (rows, np.concatenate(TRUTH))), shape=(4, 12))
    assert ndcg_at_k(RECS, truth, 3) == pytest.approx(ndcg_at_k(RECS, TRUTH, 3))


def test_beyond_accuracy_metrics() -> None:
    popularity = np.array([10, 0, 5, 5, 20, 0, 40, 0, 10, 10], dtype=float)  # 100 interactions
    recs = np.array([[0, 2], [4, 6], [6, -1]])
    assert catalogue_coverage_at_k(recs, 2, 7) == pytest.approx(4 / 7)
    novelty = np.mean(-np.log2(np.array([10, 5, 20, 40, 40]) / 100))
    assert novelty_at_k(recs, 2, popularity) == pytest.approx(novelty)
    catalogue_mean = 100 / 7  # seven items have training interactions
    assert popularity_bias_at_k(recs, 2, popularity) == pytest.approx(
        np.mean([10, 5, 20, 40, 40]) / catalogue_mean
    )


def test_evaluate_returns_every_metric_for_every_k() -> None:
    popularity = np.ones(10)
    result = evaluate(RECS, TRUTH, [1, 3], popularity)
    names = ["ndcg", "precision", "recall", "map", "hit_rate", "mrr", "coverage", "novelty"]
    names.append("popularity_bias")
    assert set(result) == {f"{name}@{k}" for name in names for k in (1, 3)}
    assert result["ndcg@3"] == pytest.approx(ndcg_at_k(RECS, TRUTH, 3))
    assert result["map@3"] == pytest.approx(map_at_k(RECS, TRUTH, 3))
    # Beyond-accuracy metrics use only the users that have test items (rows 0, 2, 3).
    assert result["coverage@3"] == pytest.approx(8 / 10)  # {0, 1, 2, 3, 4, 6, 8, 9}


def test_evaluate_rejects_bad_inputs() -> None:
    with pytest.raises(ValueError, match="only 3 columns"):
        evaluate(RECS, TRUTH, [10], np.ones(10))
    with pytest.raises(ValueError, match="rows"):
        evaluate(RECS, TRUTH[:2], [3], np.ones(10))
    with pytest.raises(ValueError, match="more than once"):
        evaluate(np.array([[1, 1, 2]]), [np.array([1])], [3], np.ones(10))
    seen = [np.array([3]), np.array([]), np.array([]), np.array([])]
    with pytest.raises(ValueError, match="training item 3"):
        evaluate(RECS, TRUTH, [3], np.ones(10), train_seen=seen)


def _loop_reference(recs: np.ndarray, truth: list[np.ndarray], k: int) -> dict[str, float]:
    """Straight per-user transcription of the Recommenders definitions."""
    per_user: dict[str, list[float]] = {m: [] for m in ("precision", "recall", "ndcg", "map")}
    for row, relevant in zip(recs, truth, strict=True):
        relevant_set = set(relevant.tolist())
        if not relevant_set:
            continue
        hits = [int(item) in relevant_set for item in row[:k]]
        dcg = sum(1 / np.log(1 + rank) for rank, hit in enumerate(hits, 1) if hit)
        idcg = sum(1 / np.log(1 + rank) for rank in range(1, min(len(relevant_set), k) + 1))
        precisions = [sum(hits[:rank]) / rank for rank, hit in enumerate(hits, 1) if hit]
        per_user["precision"].append(sum(hits) / k)
        per_user["recall"].append(sum(hits) / len(relevant_set))
        per_user["ndcg"].append(dcg / idcg)
        per_user["map"].append(sum(precisions) / len(relevant_set))
    return {name: float(np.mean(values)) for name, values in per_user.items()}


def test_vectorised_metrics_match_loop_reference() -> None:
    rng = np.random.default_rng(7)
    recs = np.stack([rng.permutation(40)[:10] for _ in range(50)])
    truth = [rng.choice(40, size=rng.integers(0, 15), replace=False) for _ in range(50)]
    result = evaluate(recs, truth, [5, 10], np.ones(40))
    for k in (5, 10):
        reference = _loop_reference(recs, truth, k)
        for name, value in reference.items():
            assert result[f"{name}@{k}"] == pytest.approx(value), (name, k)


class _FixedRecommendations:
    """Stands in for an implicit model: returns precomputed recommendations per user id."""

    def __init__(self, recs: np.ndarray) -> None:
        self.recs = recs

    def recommend(
        self, userid: np.ndarray, user_items: sp.csr_matrix, N: int = 10, **_: object
    ) -> tuple[np.ndarray, np.ndarray]:
        users = np.asarray(userid)
        return self.recs[users, :N].astype(np.int32), np.zeros((users.size, N), np.float32)


def _random_case(
    test_sizes: np.ndarray, k: int, seed: int
) -> tuple[sp.csr_matrix, sp.csr_matrix, np.ndarray]:
    rng = np.random.default_rng(seed)
    n_users, n_items = test_sizes.size, 60
    train_rows, test_rows, recs = [], [], []
    for size in test_sizes:
        items = rng.permutation(n_items)
        train_rows.append(items[:5])
        test_rows.append(items[5 : 5 + size])
        # Up to k/2 test items lead the candidate pool so that hits are plentiful.
        candidates = np.concatenate([items[5 : 5 + size][: k // 2], items[5 + size :]])
        recs.append(rng.permutation(candidates[: k + 5])[:k])

    def to_csr(rows: list[np.ndarray]) -> sp.csr_matrix:
        user_ids = np.repeat(np.arange(n_users), [len(r) for r in rows])
        data = np.ones(user_ids.size, dtype=np.float32)
        return sp.csr_matrix((data, (user_ids, np.concatenate(rows))), shape=(n_users, n_items))

    return to_csr(train_rows), to_csr(test_rows), np.stack(recs)


def _implicit_metrics(
    train: sp.csr_matrix, test: sp.csr_matrix, recs: np.ndarray, k: int
) -> dict[str, float]:
    model = _FixedRecommendations(recs)
    return ranking_metrics_at_k(model, train, test, K=k, show_progress=False)


def test_ndcg_precision_and_map_match_implicit_when_every_user_has_exactly_k_tests() -> None:
    k = 6
    train, test, recs = _random_case(np.full(25, k), k, seed=1)
    ours = evaluate(recs, test, [k], np.ones(60), train_seen=train)
    theirs = _implicit_metrics(train, test, recs, k)
    assert ours[f"ndcg@{k}"] == pytest.approx(theirs["ndcg"])
    assert ours[f"precision@{k}"] == pytest.approx(theirs["precision"])
    assert ours[f"map@{k}"] == pytest.approx(theirs["map"])


def test_only_ndcg_matches_implicit_when_test_sizes_vary() -> None:
    k = 6
    sizes = np.tile([0, 2, 4, 6, 9, 13], 5)  # users with no tests are skipped by both
    train, test, recs = _random_case(sizes, k, seed=2)
    ours = evaluate(recs, test, [k], np.ones(60), train_seen=train)
    theirs = _implicit_metrics(train, test, recs, k)
    assert ours[f"ndcg@{k}"] == pytest.approx(theirs["ndcg"])
    # Documented divergences: different precision denominators and MAP normalisers.
    assert ours[f"precision@{k}"] != pytest.approx(theirs["precision"])
    assert ours[f"map@{k}"] != pytest.approx(theirs["map"])
