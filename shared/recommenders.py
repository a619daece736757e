"""Fitted recommenders: scoring, top-k, fold-in, and their npz-safe array form.

Every service that reads a model (train to validate, eval to measure, serve to answer)
goes through these classes; only fitting lives in the train service.
``recommend`` takes the requested users' raw history rows (one row per user, as in
``implicit``), weights them the way the model was trained, scores every item, drops the
rows' own items and returns (ids, scores) arrays padded with -1/-inf.
"""

from __future__ import annotations

import functools
import os
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import scipy.sparse as sp

from shared.features import Weighting
from shared.metrics import evaluate, item_popularity

SCORE_BLOCK_CELLS = 2**24  # bounds the dense users x items score block held at once (64 MB)
MODEL_KINDS = {
    "als": "factors",
    "bpr": "factors",
    "ease": "item_similarity",
    "itemknn_cosine": "item_similarity",
    "itemknn_bm25": "item_similarity",
    "popular": "popularity",
    "sparse_ease": "item_similarity",
    "ease_als": "blend",
}


def default_num_threads() -> int:
    """CPUs this process may use (respects affinity masks such as container limits)."""
    return max(len(os.sched_getaffinity(0)), 1) if hasattr(os, "sched_getaffinity") else 1


def seen_cells(rows: sp.csr_matrix) -> np.ndarray:
    """The cells of CSR `rows` as flat indices into a dense block of their shape: the
    `banned` of `rank_rows` for each row's own items."""
    starts = np.arange(rows.shape[0], dtype=np.int64) * rows.shape[1]
    return np.repeat(starts, np.diff(rows.indptr)) + rows.indices


def rank_rows(scores: np.ndarray, k: int, banned: np.ndarray | None = None,
              mask: np.ndarray | None = None, in_place: bool = False
              ) -> tuple[np.ndarray, np.ndarray]:
    """Best `k` columns per row of `scores` (rows x items) as serve lists them: by score,
    ties by lower index, never a `banned` cell (flat indices into `scores`), an item off
    `mask` or a NaN score; cells past a row's rankable items are -1 / -inf.

    `in_place` lets a caller that owns a writable float32 block have it overwritten
    instead of copied. The block is negated once (NaN then sorts last), partitioned at
    k + 1 so that a tie across the k-th place shows in the k + 1 candidates; only rows
    with such a tie are ranked again over every item at the boundary score."""
    block = np.atleast_2d(scores)
    if in_place and block.dtype == np.float32 and block.flags.writeable:
        negated = np.negative(block, out=block)
    else:
        negated = np.negative(block, dtype=np.float32)
    n_rows, n_items = negated.shape
    if banned is not None and banned.size:
        negated.reshape(-1)[banned] = np.inf
    if mask is not None:
        negated[:, ~mask] = np.inf
    k = max(k, 0)
    ids = np.full((n_rows, k), -1, dtype=np.int64)
    best = np.full((n_rows, k), -np.inf, dtype=np.float32)
    width = min(k, n_items)
    if width == 0 or n_rows == 0:
        return ids, best
    if width < n_items:
        candidates = np.argpartition(negated, width, axis=1)[:, :width + 1]
    else:
        candidates = np.broadcast_to(np.arange(n_items), negated.shape)
    values = np.take_along_axis(negated, candidates, axis=1)
    order = np.lexsort((candidates, values), axis=1)
    candidates = np.take_along_axis(candidates, order, axis=1)
    values = np.take_along_axis(values, order, axis=1)
    ids[:, :width], best[:, :width] = candidates[:, :width], -values[:, :width]
    if width < n_items:
        boundary = values[:, width - 1]
        for row in np.flatnonzero((boundary == values[:, width]) & (boundary < np.inf)):
            line = negated[row]
            pool = np.flatnonzero(line <= boundary[row])
            chosen = pool[np.lexsort((pool, line[pool]))[:width]]
            ids[row, :width], best[row, :width] = chosen, -line[chosen]
    ids[~(best > -np.inf)] = -1  # banned, masked or NaN: not ranked
    best[ids < 0] = -np.inf
    return ids, best


class Recommender(ABC):
    """A fitted model: scores items for users from their (raw) interaction rows."""

    scores_trained_alone = False  # whether a trained user's scores need no history

    def __init__(self, algorithm: str, weighting: Weighting, n_items: int) -> None:
        self.algorithm = algorithm
        self.weighting = weighting
        self.n_items = n_items

    @abstractmethod
    def _score(self, user_indices: np.ndarray, rows: sp.csr_matrix) -> np.ndarray:
        """Dense scores (len(users) x n_items) from trained user state and weighted rows;
        a user index of -1 means "not trained on", scored from the row alone."""

    @abstractmethod
    def _state_arrays(self) -> dict[str, np.ndarray]:
        """Model-specific arrays for :meth:`to_arrays`."""

    def recommend(
        self,
        user_indices: Sequence[int] | np.ndarray,
        user_items: sp.spmatrix,
        k: int,
        filter_seen: bool = True,
        exclude: sp.spmatrix | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k item indices and scores (users x k) given each user's raw history row.

        Index -1 marks a user the model was not trained on (factor models fold them in).
        ``exclude`` (same shape as ``user_items``) names the items to leave out instead of
        the history's own, for an evaluation that hides more than the model is shown.
        """
        users = np.asarray(user_indices, dtype=np.int64).reshape(-1)
        rows = sp.csr_matrix(user_items)
        if rows.shape != (users.size, self.n_items):
            raise ValueError(
                f"user_items has shape {rows.shape}; expected one history row per requested "
                f"user and one column per item ({users.size}, {self.n_items}), e.g. "
                "train_csr[user_indices]"
            )
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        hidden = rows if exclude is None else sp.csr_matrix(exclude)
        if hidden.shape != rows.shape:
            raise ValueError(f"exclude has shape {hidden.shape}; expected {rows.shape}, the "
                             "shape of user_items")
        ids = np.full((users.size, k), -1, dtype=np.int64)
        scores = np.full((users.size, k), -np.inf, dtype=np.float32)
        batch_users = max(1, SCORE_BLOCK_CELLS // max(self.n_items, 1))
        for start in range(0, users.size, batch_users):
            batch = slice(start, start + batch_users)
            block = self._score(users[batch], self.weighting.transform(rows[batch]))
            banned = seen_cells(hidden[batch]) if filter_seen else None
            ids[batch], scores[batch] = rank_rows(block, k, banned, in_place=True)
        return ids, scores

    def score(self, user_indices: Sequence[int] | np.ndarray, user_items: sp.spmatrix
              ) -> np.ndarray:
        """Dense scores (users x items) from raw history rows, before any filtering: for
        callers that mask or re-rank themselves (genres, exclusions, paging)."""
        users = np.asarray(user_indices, dtype=np.int64).reshape(-1)
        return self._score(users, self.weighting.transform(sp.csr_matrix(user_items)))

    def score_user(self, user_index: int, items: np.ndarray, values: np.ndarray) -> np.ndarray:
        """Scores of every item for one user (index -1: not trained on) from their raw
        history as item indices and values: the serving path, one user per request."""
        row = sp.csr_matrix((np.asarray(values, dtype=np.float32),
                             np.asarray(items, dtype=np.int32), np.array([0, len(items)])),
                            shape=(1, self.n_items))
        return self.score([user_index], row)[0]

    def score_trained(self, user_indices: np.ndarray) -> np.ndarray:
        """Scores (users x items) of trained users from the model alone, in one pass for
        all of them: only where `scores_trained_alone`."""
        raise NotImplementedError(f"{self.algorithm} scores each user from their history")

    def prepare_serving(self) -> None:
        """Lay out now what scoring requests will need, so that no request pays for it
        (serve calls it while loading, before the swap). Nothing, unless a model has such
        a layout."""
        return None

    def recommend_for_history(
        self, user_items: sp.spmatrix, k: int, filter_seen: bool = True
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k for users known only by raw history rows (new users; ALS uses fold-in)."""
        n_rows = sp.csr_matrix(user_items).shape[0]
        return self.recommend(np.full(n_rows, -1), user_items, k, filter_seen)

    @abstractmethod
    def _item_similarities(self, item_idx: int) -> np.ndarray:
        """Similarity of every item to ``item_idx`` (-inf where there is none)."""

    def similar_items(self, item_idx: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` items most similar to ``item_idx`` (itself excluded) and their scores."""
        if not 0 <= item_idx < self.n_items:
            raise ValueError(f"item index {item_idx} outside 0..{self.n_items - 1}")
        scores = np.asarray(self._item_similarities(item_idx), dtype=np.float32)
        ids, best = rank_rows(scores, k, np.array([item_idx]))  # not its own neighbour
        return ids[0], best[0]

    def to_arrays(self) -> dict[str, np.ndarray]:
        """All state as numpy arrays (npz-safe, no pickle)."""
        arrays = {"algorithm": np.array(self.algorithm), "n_items": np.array(self.n_items)}
        arrays.update(self.weighting.to_arrays())
        arrays.update(self._state_arrays())
        return arrays

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> Recommender:
        """Rebuild any model saved by :meth:`to_arrays`."""
        return from_arrays(arrays)


class FactorModel(Recommender):
    """Matrix factorisation (ALS, BPR): score = user factors . item factors."""

    scores_trained_alone = True

    def __init__(
        self,
        algorithm: str,
        weighting: Weighting,
        user_factors: np.ndarray,
        item_factors: np.ndarray,
        regularization: float,
        alpha: float,
    ) -> None:
        super().__init__(algorithm, weighting, item_factors.shape[0])
        self.user_factors = np.ascontiguousarray(user_factors, dtype=np.float32)
        self.item_factors = np.ascontiguousarray(item_factors, dtype=np.float32)
        self.regularization = float(regularization)
        self.alpha = float(alpha)

    def score_trained(self, user_indices: np.ndarray) -> np.ndarray:
        # users x factors times a factors x items copy laid out row by row: one pass over
        # the item factors for all the users, and each user's scores contiguous (measured
        # at 60,000 items x 64, 8 users: 0.16 ms per user, against 0.22 ms multiplying by
        # the transposed view and 0.31 ms from the items x users product transposed).
        return self.user_factors[user_indices] @ self._item_factors_by_row

    def prepare_serving(self) -> None:
        _ = self._item_factors_by_row  # made here, kept by the cached property

    @functools.cached_property
    def _item_factors_by_row(self) -> np.ndarray:
        """The item factors transposed (factors x items), C-contiguous; made on first use."""
        return np.ascontiguousarray(self.item_factors.T)

    def _score(self, user_indices: np.ndarray, rows: sp.csr_matrix) -> np.ndarray:
        if user_indices.size and not -1 <= user_indices.min() <= user_indices.max() < len(
            self.user_factors
        ):
            raise ValueError(
                f"user indices must lie in 0..{len(self.user_factors) - 1}, or be -1 for users "
                "the model was not trained on"
            )
        factors = self.user_factors[np.maximum(user_indices, 0)]
        new_users = user_indices < 0
        if new_users.any():
            factors[new_users] = self.fold_in(rows[new_users])
        return factors @ self.item_factors.T

    def fold_in(self, rows: sp.csr_matrix) -> np.ndarray:
        """User factors for weighted history rows, holding item factors fixed.

        ALS: the exact per-user least-squares step of implicit's solver (confidence c = alpha *
        value, A = YtY + reg*I + sum (c - 1) y y^T, b = sum c y). BPR has no closed form; its user
        vector is the mean of the history's item factors with the bias coordinate set to 1.
        """
        factors = np.zeros((rows.shape[0], self.item_factors.shape[1]), dtype=np.float64)
        item_factors = self.item_factors.astype(np.float64)
        if self.algorithm == "bpr":
            for u in range(rows.shape[0]):
                items = rows.indices[rows.indptr[u] : rows.indptr[u + 1]]
                if items.size:
                    factors[u] = item_factors[items].mean(axis=0)
                factors[u, -1] = 1.0  # implicit's BPR keeps a constant 1 against the item bias
            return factors.astype(np.float32)
        base = item_factors.T @ item_factors + self.regularization * np.eye(item_factors.shape[1])
        for u in range(rows.shape[0]):
            span = slice(rows.indptr[u], rows.indptr[u + 1])
            items, confidence = rows.indices[span], self.alpha * rows.data[span].astype(np.float64)
            if items.size == 0:
                continue
            y = item_factors[items]
            a = base + (y.T * (confidence - 1.0)) @ y
            factors[u] = np.linalg.solve(a, y.T @ confidence)
        return factors.astype(np.float32)

    def _item_similarities(self, item_idx: int) -> np.ndarray:
        norms = np.linalg.norm(self.item_factors, axis=1)
        unit = self.item_factors / np.where(norms == 0, 1.0, norms)[:, None]
        return unit @ unit[item_idx]  # cosine of item factors

    def _state_arrays(self) -> dict[str, np.ndarray]:
        return {
            "user_factors": self.user_factors,
            "item_factors": self.item_factors,
            "factor_hyper": np.array([self.regularization, self.alpha]),
        }


class ItemSimilarityModel(Recommender):
    """Item-item models (kNN, EASE): score = weighted history row @ item x item matrix."""

    def __init__(
        self, algorithm: str, weighting: Weighting, similarity: np.ndarray | sp.csr_matrix
    ) -> None:
        super().__init__(algorithm, weighting, similarity.shape[1])
        self.similarity = (
            sp.csr_matrix(similarity) if sp.issparse(similarity) else np.asarray(similarity)
        )

    def _score(self, user_indices: np.ndarray, rows: sp.csr_matrix) -> np.ndarray:
        scores = rows @ self.similarity
        return scores.toarray() if sp.issparse(scores) else np.asarray(scores)

    def _item_similarities(self, item_idx: int) -> np.ndarray:
        if not sp.issparse(self.similarity):
            return self.similarity[item_idx]
        row = self.similarity[item_idx].toarray()[0]
        return np.where(row != 0, row, -np.inf)  # pruned neighbours must not outrank real ones

    def _state_arrays(self) -> dict[str, np.ndarray]:
        if not sp.issparse(self.similarity):
            return {"similarity": self.similarity}
        s = self.similarity
        return {
            "similarity.data": s.data,
            "similarity.indices": s.indices,
            "similarity.indptr": s.indptr,
            "similarity.shape": np.array(s.shape),
        }


class FactoredSimilarityModel(Recommender):
    """An item x item matrix kept as two sparse factors, B = I + left @ right (sparse EASE):
    score = weighted history row @ B, computed as (row @ left) @ right + row, so the
    items x items product itself is never formed."""

    def __init__(self, algorithm: str, weighting: Weighting, left: sp.spmatrix,
                 right: sp.spmatrix) -> None:
        left, right = sp.csr_matrix(left, dtype=np.float32), sp.csr_matrix(right, dtype=np.float32)
        if left.shape[0] != right.shape[1] or left.shape[1] != right.shape[0]:
            raise ValueError(f"factors of shapes {left.shape} and {right.shape} do not make an "
                             "items x items matrix")
        super().__init__(algorithm, weighting, left.shape[0])
        self.factors = (left, right)

    def _score(self, user_indices: np.ndarray, rows: sp.csr_matrix) -> np.ndarray:
        left, right = self.factors
        rows = sp.csr_matrix(rows, dtype=np.float32)
        return np.asarray(((rows @ left) @ right + rows).toarray())

    def _item_similarities(self, item_idx: int) -> np.ndarray:
        left, right = self.factors
        row = (left[item_idx] @ right).toarray()[0]
        return np.where(row != 0, row, -np.inf)  # pruned pairs must not outrank real ones

    def _state_arrays(self) -> dict[str, np.ndarray]:
        arrays: dict[str, np.ndarray] = {}
        for name, factor in zip(("left", "right"), self.factors, strict=True):
            arrays.update({f"{name}.data": factor.data, f"{name}.indices": factor.indices,
                           f"{name}.indptr": factor.indptr,
                           f"{name}.shape": np.array(factor.shape)})
        return arrays


class PopularityModel(Recommender):
    """Most-popular baseline: every user gets the items with most training interactions."""

    def __init__(self, algorithm: str, weighting: Weighting, popularity: np.ndarray) -> None:
        super().__init__(algorithm, weighting, popularity.size)
        self.popularity = np.asarray(popularity, dtype=np.float32)

    def _score(self, user_indices: np.ndarray, rows: sp.csr_matrix) -> np.ndarray:
        return np.broadcast_to(self.popularity, (rows.shape[0], self.n_items))

    def _item_similarities(self, item_idx: int) -> np.ndarray:
        return self.popularity  # no notion of similarity: the most popular other items

    def _state_arrays(self) -> dict[str, np.ndarray]:
        return {"popularity": self.popularity}


def _standardised(scores: np.ndarray) -> np.ndarray:
    """Each row less its mean, over its standard deviation: scores of different models on
    one scale, whatever each model's own."""
    scores = np.asarray(scores, dtype=np.float64)
    centred = scores - scores.mean(axis=1, keepdims=True)
    spread = centred.std(axis=1, keepdims=True)
    return centred / np.where(spread > 0, spread, 1.0)


class BlendModel(Recommender):
    """A weighted sum of other fitted models' standardised scores (each user's scores less
    their mean, over their spread, per model). Each part weights the raw history its own
    way and folds in new users its own way; the blend's own weighting is ``none``."""

    def __init__(self, algorithm: str, parts: Sequence[Recommender],
                 weights: Sequence[float]) -> None:
        if not parts or len(parts) != len(weights):
            raise ValueError(f"a blend needs one weight per part, got {len(parts)} parts and "
                             f"{len(weights)} weights")
        if len({part.n_items for part in parts}) != 1:
            raise ValueError("the parts of a blend must score the same items")
        super().__init__(algorithm, Weighting("none"), parts[0].n_items)
        self.parts = list(parts)
        self.weights = np.asarray(weights, dtype=np.float64)

    def _score(self, user_indices: np.ndarray, rows: sp.csr_matrix) -> np.ndarray:
        total = np.zeros((rows.shape[0], self.n_items))
        for part, weight in zip(self.parts, self.weights, strict=True):
            if weight:
                total += weight * _standardised(
                    part._score(user_indices, part.weighting.transform(rows)))
        return total.astype(np.float32)

    def prepare_serving(self) -> None:
        for part in self.parts:
            part.prepare_serving()

    def _item_similarities(self, item_idx: int) -> np.ndarray:
        total = np.zeros(self.n_items)
        for part, weight in zip(self.parts, self.weights, strict=True):
            row = np.asarray(part._item_similarities(item_idx), dtype=np.float64)
            known = np.isfinite(row)
            row = np.where(known, row, row[known].min() if known.any() else 0.0)
            total += weight * _standardised(row[None, :])[0]
        return total

    def _state_arrays(self) -> dict[str, np.ndarray]:
        arrays = {"blend_weights": self.weights, "blend_parts": np.array(len(self.parts))}
        for position, part in enumerate(self.parts):
            arrays.update({f"part{position}.{key}": value
                           for key, value in part.to_arrays().items()})
        return arrays


def from_arrays(arrays: Mapping[str, np.ndarray]) -> Recommender:
    """Rebuild a model from :meth:`Recommender.to_arrays` output (e.g. a loaded npz)."""
    algorithm = str(arrays["algorithm"])
    weighting = Weighting.from_arrays(dict(arrays))
    if algorithm in ("als", "bpr"):
        regularization, alpha = (float(x) for x in arrays["factor_hyper"])
        user_factors, item_factors = arrays["user_factors"], arrays["item_factors"]
        return FactorModel(algorithm, weighting, user_factors, item_factors, regularization, alpha)
    if algorithm == "popular":
        return PopularityModel(algorithm, weighting, arrays["popularity"])
    if MODEL_KINDS.get(algorithm) == "blend":
        parts = [from_arrays({key[len(f"part{p}."):]: value for key, value in arrays.items()
                              if key.startswith(f"part{p}.")})
                 for p in range(int(arrays["blend_parts"]))]
        return BlendModel(algorithm, parts, [float(w) for w in arrays["blend_weights"]])
    if algorithm == "sparse_ease":
        left, right = (_csr_from_arrays(arrays, name) for name in ("left", "right"))
        return FactoredSimilarityModel(algorithm, weighting, left, right)
    if algorithm in ("ease", "itemknn_cosine", "itemknn_bm25"):
        if "similarity" in arrays:
            return ItemSimilarityModel(algorithm, weighting, np.asarray(arrays["similarity"]))
        return ItemSimilarityModel(algorithm, weighting, _csr_from_arrays(arrays, "similarity"))
    raise ValueError(f"unknown algorithm {algorithm!r} in arrays; known: {sorted(MODEL_KINDS)}")


def _csr_from_arrays(arrays: Mapping[str, np.ndarray], name: str) -> sp.csr_matrix:
    """The CSR matrix stored as ``name.data``, ``.indices``, ``.indptr`` and ``.shape``."""
    parts = tuple(arrays[f"{name}.{p}"] for p in ("data", "indices", "indptr"))
    shape = tuple(int(x) for x in arrays[f"{name}.shape"])
    return sp.csr_matrix(parts, shape=shape)


def evaluate_model(
    model: Recommender,
    train_csr: sp.spmatrix,
    test_csr: sp.spmatrix,
    k_values: Iterable[int] = (10,),
) -> dict[str, float]:
    """Recommend for every user with test items (train items filtered) and compute metrics."""
    train, test = sp.csr_matrix(train_csr), sp.csr_matrix(test_csr)
    users = np.flatnonzero(np.diff(test.indptr))
    ks = sorted(set(k_values))
    recs, _ = model.recommend(users, train[users], max(ks))
    return evaluate(recs, test[users], ks, item_popularity(train), train_seen=train[users])
