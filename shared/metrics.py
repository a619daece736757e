"""Ranking metrics at k, vectorised with numpy.

Accuracy metrics follow the Microsoft Recommenders definitions (``python_evaluation``):
relevance is binary and every test item of a user is relevant; the recommender must already
have removed the user's training items; scores are averaged over the users that have at least
one test item. Concretely, for a user with ``R`` test items and hit indicator ``h_i`` at rank i:

* precision@k = hits / k (so the best achievable value is < 1 when R < k, as in Spark);
* recall@k = hits / R;
* ndcg@k = sum_i h_i / log(1 + i) divided by the ideal DCG over min(R, k) ranks;
* map@k = sum over hit ranks of precision@rank, divided by R (Recommenders' ``map``, not the
  ``map_at_k`` variant that divides by min(R, k));
* hit_rate@k = 1 if any hit; mrr@k = 1 / rank of the first hit (0 without a hit).

Recommendations are a 2-D integer array (users x at least k item indices, best first); ``-1``
pads rows that have fewer than k candidates and never counts as a hit. Ground truth is a sparse
matrix whose row u holds the test items of the user in recommendation row u (or one array of
item indices per row).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import scipy.sparse as sp

TruthLike = sp.spmatrix | sp.sparray | Sequence[np.ndarray]
GATE_METRIC = "ndcg@10"  # what the promotion gate compares a candidate and the champion on

METRIC_NAMES: tuple[str, ...] = (
    "ndcg",
    "precision",
    "recall",
    "map",
    "hit_rate",
    "mrr",
    "coverage",
    "novelty",
    "popularity_bias",
)


def truth_matrix(test_truth: TruthLike, n_rows: int, n_items: int = 0) -> sp.csr_matrix:
    """Return the ground truth as a canonical CSR matrix (sorted, duplicate-free structure)."""
    if sp.issparse(test_truth):
        truth = sp.csr_matrix(test_truth, copy=True)
    else:
        rows = list(test_truth)
        lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
        indices = (
            np.concatenate([np.asarray(r, dtype=np.int64) for r in rows])
            if rows
            else np.empty(0, dtype=np.int64)
        )
        width = max(n_items, int(indices.max()) + 1 if indices.size else 0)
        indptr = np.concatenate([[0], np.cumsum(lengths)])
        truth = sp.csr_matrix((np.ones(indices.size), indices, indptr), shape=(len(rows), width))
    if truth.shape[0] != n_rows:
        raise ValueError(
            f"test_truth has {truth.shape[0]} rows but recommendations have {n_rows}; "
            "row u of both must describe the same user"
        )
    truth.sum_duplicates()  # also sorts indices, which the key search below relies on
    return truth


def _check_recommendations(recommendations: np.ndarray, k: int) -> np.ndarray:
    recs = np.asarray(recommendations)
    if recs.ndim != 2 or not np.issubdtype(recs.dtype, np.integer):
        raise ValueError(
            f"recommendations must be a 2-D integer array (users x k), got shape {recs.shape} "
            f"and dtype {recs.dtype}"
        )
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if recs.shape[1] < k:
        raise ValueError(
            f"recommendations have only {recs.shape[1]} columns; cannot compute metrics at k={k}"
        )
    return recs[:, :k].astype(np.int64, copy=False)


def hit_matrix(recommendations: np.ndarray, test_truth: TruthLike, k: int) -> np.ndarray:
    """Boolean users x k matrix: True where the recommended item is one of the user's test items."""
    recs = _check_recommendations(recommendations, k)
    truth = truth_matrix(test_truth, recs.shape[0])
    # Encode (row, item) pairs as one int64 key so membership is a single sorted search.
    width = max(truth.shape[1], int(recs.max()) + 1 if recs.size else 0, 1)
    truth_rows = np.repeat(np.arange(truth.shape[0], dtype=np.int64), np.diff(truth.indptr))
    truth_keys = truth_rows * width + truth.indices.astype(np.int64)
    rec_keys = np.arange(recs.shape[0], dtype=np.int64)[:, None] * width + recs
    if truth_keys.size == 0:
        return np.zeros(recs.shape, dtype=bool)
    pos = np.minimum(np.searchsorted(truth_keys, rec_keys), truth_keys.size - 1)
    return (truth_keys[pos] == rec_keys) & (recs >= 0)


def _per_user(
    recommendations: np.ndarray, test_truth: TruthLike, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Hits and relevant counts restricted to users with at least one test item."""
    hits = hit_matrix(recommendations, test_truth, k)
    n_relevant = np.diff(truth_matrix(test_truth, hits.shape[0]).indptr)
    evaluated = n_relevant > 0
    return hits[evaluated], n_relevant[evaluated]


def _mean(values: np.ndarray) -> float:
    return float(values.mean()) if values.size else 0.0


def _precision(hits: np.ndarray, n_relevant: np.ndarray) -> np.ndarray:
    return hits.sum(axis=1) / hits.shape[1]


def _recall(hits: np.ndarray, n_relevant: np.ndarray) -> np.ndarray:
    return hits.sum(axis=1) / n_relevant


def _ndcg(hits: np.ndarray, n_relevant: np.ndarray) -> np.ndarray:
    k = hits.shape[1]
    discounts = 1.0 / np.log2(np.arange(2, k + 2))  # the log base cancels in the ratio
    ideal = np.cumsum(discounts)[np.minimum(n_relevant, k) - 1]
    return (hits @ discounts) / ideal


def _average_precision(hits: np.ndarray, n_relevant: np.ndarray) -> np.ndarray:
    precision_at_rank = np.cumsum(hits, axis=1) / np.arange(1, hits.shape[1] + 1)
    return (precision_at_rank * hits).sum(axis=1) / n_relevant


def _hit(hits: np.ndarray, n_relevant: np.ndarray) -> np.ndarray:
    return hits.any(axis=1).astype(np.float64)


def _reciprocal_rank(hits: np.ndarray, n_relevant: np.ndarray) -> np.ndarray:
    return np.where(hits.any(axis=1), 1.0 / (hits.argmax(axis=1) + 1), 0.0)


_ACCURACY = {
    "ndcg": _ndcg,
    "precision": _precision,
    "recall": _recall,
    "map": _average_precision,
    "hit_rate": _hit,
    "mrr": _reciprocal_rank,
}


def _accuracy(name: str, recommendations: np.ndarray, test_truth: TruthLike, k: int) -> float:
    hits, n_relevant = _per_user(recommendations, test_truth, k)
    return _mean(_ACCURACY[name](hits, n_relevant))


def precision_at_k(recommendations: np.ndarray, test_truth: TruthLike, k: int) -> float:
    """Mean over users with test items of hits@k / k."""
    return _accuracy("precision", recommendations, test_truth, k)


def recall_at_k(recommendations: np.ndarray, test_truth: TruthLike, k: int) -> float:
    """Mean over users with test items of hits@k / number of test items."""
    return _accuracy("recall", recommendations, test_truth, k)


def ndcg_at_k(recommendations: np.ndarray, test_truth: TruthLike, k: int) -> float:
    """Mean binary-relevance nDCG@k over users with test items."""
    return _accuracy("ndcg", recommendations, test_truth, k)


def map_at_k(recommendations: np.ndarray, test_truth: TruthLike, k: int) -> float:
    """Recommenders' MAP: sum of precision at each hit rank within k, divided by the test count."""
    return _accuracy("map", recommendations, test_truth, k)


def hit_rate_at_k(recommendations: np.ndarray, test_truth: TruthLike, k: int) -> float:
    """Share of users with test items that get at least one hit in the top k."""
    return _accuracy("hit_rate", recommendations, test_truth, k)


def mrr_at_k(recommendations: np.ndarray, test_truth: TruthLike, k: int) -> float:
    """Mean reciprocal rank of the first hit within k (0 for users without a hit)."""
    return _accuracy("mrr", recommendations, test_truth, k)


def item_popularity(train: sp.spmatrix | sp.sparray) -> np.ndarray:
    """Number of training interactions (stored entries) per item column."""
    return np.diff(sp.csc_matrix(train).indptr).astype(np.float64)


def catalogue_coverage_at_k(recommendations: np.ndarray, k: int, n_catalogue_items: int) -> float:
    """Distinct items recommended in any top k divided by the catalogue size."""
    if n_catalogue_items < 1:
        raise ValueError(f"n_catalogue_items must be positive, got {n_catalogue_items}")
    recs = _check_recommendations(recommendations, k)
    return np.unique(recs[recs >= 0]).size / n_catalogue_items


def _recommended_popularity(
    recommendations: np.ndarray, k: int, popularity: np.ndarray
) -> np.ndarray:
    recs = _check_recommendations(recommendations, k)
    items = recs[recs >= 0]
    if items.size and items.max() >= popularity.size:
        raise ValueError(
            f"recommendations contain item index {items.max()} but item_popularity covers only "
            f"{popularity.size} items"
        )
    return np.asarray(popularity, dtype=np.float64)[items]


def novelty_at_k(recommendations: np.ndarray, k: int, item_popularity: np.ndarray) -> float:
    """Mean self-information -log2(count / total train interactions) of recommended items.

    Items never seen in training count as seen once, so novelty stays finite.
    """
    counts = _recommended_popularity(recommendations, k, item_popularity)
    total = float(np.sum(item_popularity))
    if counts.size == 0 or total <= 0:
        return 0.0
    return float(np.mean(-np.log2(np.maximum(counts, 1.0) / total)))


def popularity_bias_at_k(recommendations: np.ndarray, k: int, item_popularity: np.ndarray) -> float:
    """Mean popularity of recommended items over the mean popularity of catalogue items.

    1.0 means recommendations are as popular as a random catalogue item; larger is more biased.
    """
    counts = _recommended_popularity(recommendations, k, item_popularity)
    catalogue = np.asarray(item_popularity, dtype=np.float64)
    catalogue = catalogue[catalogue > 0]
    if counts.size == 0 or catalogue.size == 0:
        return 0.0
    return float(counts.mean() / catalogue.mean())


def _check_no_seen_items(recommendations: np.ndarray, train_seen: TruthLike) -> None:
    if sp.issparse(train_seen):
        # Look the recommended cells up in the matrix itself: memory follows users x k,
        # not the (large) number of training interactions.
        given = sp.csr_matrix(train_seen)
        seen = sp.csr_matrix((np.ones(given.nnz, dtype=np.int8), given.indices, given.indptr),
                             shape=given.shape)  # structure only: a stored 0 is still seen
        rows = np.repeat(np.arange(recommendations.shape[0]), recommendations.shape[1])
        cols = recommendations.ravel()
        valid = cols >= 0
        hits = np.zeros(cols.size, dtype=bool)
        if valid.any():
            hits[valid] = np.asarray(seen[rows[valid], cols[valid]]).ravel() != 0
        seen_hits = hits.reshape(recommendations.shape)
    else:
        seen_hits = hit_matrix(recommendations, train_seen, recommendations.shape[1])
    if seen_hits.any():
        row, col = np.argwhere(seen_hits)[0]
        raise ValueError(
            f"recommendations row {row} contains training item {recommendations[row, col]}; "
            "seen items must be filtered before evaluation"
        )


def _check_unique_rows(recommendations: np.ndarray) -> None:
    ordered = np.sort(recommendations, axis=1)
    repeated = (ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)
    if repeated.any():
        row = int(np.argwhere(repeated)[0, 0])
        raise ValueError(f"recommendations row {row} lists the same item more than once")


def evaluate(
    recommendations: np.ndarray,
    test_truth: TruthLike,
    k_values: Iterable[int],
    item_popularity: np.ndarray,
    *,
    n_catalogue_items: int | None = None,
    train_seen: TruthLike | None = None,
) -> dict[str, float]:
    """All metrics at every k, keyed like ``"ndcg@10"``, over users that have test items.

    ``item_popularity`` holds train interaction counts per item index; the catalogue defaults to
    the items with training interactions (Recommenders' catalog coverage). When ``train_seen`` is
    given, any recommended training item raises a ValueError.
    """
    recs = np.asarray(recommendations)
    ks = sorted({int(k) for k in k_values})
    if not ks:
        raise ValueError("k_values must contain at least one k")
    _check_recommendations(recs, ks[-1])
    recs = recs[:, : ks[-1]]
    _check_unique_rows(recs)
    if train_seen is not None:
        _check_no_seen_items(recs, train_seen)
    truth = truth_matrix(test_truth, recs.shape[0])
    evaluated = np.diff(truth.indptr) > 0
    recs, truth = recs[evaluated], truth[evaluated]
    all_hits = hit_matrix(recs, truth, ks[-1])
    n_relevant = np.diff(truth.indptr)
    popularity = np.asarray(item_popularity, dtype=np.float64)
    catalogue = n_catalogue_items or max(int(np.count_nonzero(popularity)), 1)
    results: dict[str, float] = {}
    for k in ks:
        for name, per_user in _ACCURACY.items():
            results[f"{name}@{k}"] = _mean(per_user(all_hits[:, :k], n_relevant))
        results[f"coverage@{k}"] = catalogue_coverage_at_k(recs, k, catalogue)
        results[f"novelty@{k}"] = novelty_at_k(recs, k, popularity)
        results[f"popularity_bias@{k}"] = popularity_bias_at_k(recs, k, popularity)
    return results


def accuracy_intervals(recommendations: np.ndarray, test_truth: TruthLike,
                       k_values: Iterable[int], z: float = 1.959964) -> dict[str, list[float]]:
    """A 95% confidence interval (normal approximation: mean +- z * sd / sqrt(n)) of each
    accuracy metric at every k, over the users that have test items: for figures measured
    on a sample of users."""
    recs = np.asarray(recommendations)
    ks = sorted({int(k) for k in k_values})
    truth = truth_matrix(test_truth, recs.shape[0])
    evaluated = np.diff(truth.indptr) > 0
    recs, truth = recs[evaluated, : ks[-1]], truth[evaluated]
    all_hits = hit_matrix(recs, truth, ks[-1])
    n_relevant = np.diff(truth.indptr)
    intervals: dict[str, list[float]] = {}
    for k in ks:
        for name, per_user in _ACCURACY.items():
            values = per_user(all_hits[:, :k], n_relevant)
            mean = _mean(values)
            half = z * float(values.std(ddof=1)) / np.sqrt(values.size) if values.size > 1 else 0.0
            intervals[f"{name}@{k}"] = [mean - half, mean + half]
    return intervals
