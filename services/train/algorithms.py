"""Recommendation algorithms behind one small interface.

``ALGORITHMS[name].fit(train_csr, params, seed)`` (or ``fit_algorithm(name, ...)``) takes a
users x items CSR of *raw* ratings, overlays ``params`` on the algorithm's defaults, applies the
weighting they name (fitted on that matrix and stored in the model) and returns a
:class:`Recommender`. ``recommend`` takes the requested users' raw history rows (one row per
user, as in ``implicit``), weights them the same way, scores every item, drops the rows' own
items and returns (ids, scores) arrays padded with -1/-inf. Models serialise to plain numpy
arrays (``to_arrays``/``from_arrays``) so they can be stored as npz without pickle.
"""

from __future__ import annotations

import os
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import numpy as np
import scipy.sparse as sp
from threadpoolctl import threadpool_limits

from services.transform.features import Weighting

Params = Mapping[str, Any]
SCORE_BLOCK_CELLS = 2**24  # bounds the dense users x items score block held at once (64 MB)


def default_num_threads() -> int:
    """CPUs this process may use (respects affinity masks such as container limits)."""
    return max(len(os.sched_getaffinity(0)), 1) if hasattr(os, "sched_getaffinity") else 1


def top_k(
    scores: np.ndarray, k: int, exclude: sp.csr_matrix | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Best ``k`` columns per row (ties by lower item index); excluded/-inf cells pad as -1."""
    scores = np.array(scores, dtype=np.float32, copy=True)
    if exclude is not None and exclude.nnz:
        rows = np.repeat(np.arange(exclude.shape[0]), np.diff(exclude.indptr))
        scores[rows, exclude.indices] = -np.inf
    width = min(k, scores.shape[1])
    candidates = np.argpartition(-scores, width - 1, axis=1)[:, :width]
    candidate_scores = np.take_along_axis(scores, candidates, axis=1)
    order = np.lexsort((candidates, -candidate_scores), axis=1)
    ids = np.full((scores.shape[0], k), -1, dtype=np.int64)
    best = np.full((scores.shape[0], k), -np.inf, dtype=np.float32)
    ids[:, :width] = np.take_along_axis(candidates, order, axis=1)
    best[:, :width] = np.take_along_axis(candidate_scores, order, axis=1)
    ids[~np.isfinite(best)] = -1
    return ids, best


class Recommender(ABC):
    """A fitted model: scores items for users from their (raw) interaction rows."""

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
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k item indices and scores (users x k) given each user's raw history row.

        Index -1 marks a user the model was not trained on (factor models fold them in).
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
        ids = np.full((users.size, k), -1, dtype=np.int64)
        scores = np.full((users.size, k), -np.inf, dtype=np.float32)
        batch_users = max(1, SCORE_BLOCK_CELLS // max(self.n_items, 1))
        for start in range(0, users.size, batch_users):
            batch = slice(start, start + batch_users)
            raw = rows[batch]
            block = self._score(users[batch], self.weighting.transform(raw))
            ids[batch], scores[batch] = top_k(block, k, raw if filter_seen else None)
        return ids, scores

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
        scores = np.array(self._item_similarities(item_idx), dtype=np.float32).reshape(1, -1)
        scores[0, item_idx] = -np.inf  # an item is not its own neighbour
        ids, best = top_k(scores, k)
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
    if algorithm in ("ease", "itemknn_cosine", "itemknn_bm25"):
        if "similarity" in arrays:
            return ItemSimilarityModel(algorithm, weighting, np.asarray(arrays["similarity"]))
        parts = (arrays[f"similarity.{p}"] for p in ("data", "indices", "indptr"))
        shape = tuple(int(x) for x in arrays["similarity.shape"])
        return ItemSimilarityModel(algorithm, weighting, sp.csr_matrix(tuple(parts), shape=shape))
    raise ValueError(f"unknown algorithm {algorithm!r} in arrays; known: {sorted(ALGORITHMS)}")


# ---- fitting -------------------------------------------------------------------------------


def _weighted(train_csr: sp.spmatrix, params: Params) -> tuple[Weighting, sp.csr_matrix]:
    return Weighting.from_params(dict(params)).fit_transform(train_csr)


def _fit_als(
    train_csr: sp.spmatrix, params: Params, seed: int, num_threads: int = 0
) -> FactorModel:
    """Implicit-feedback ALS (implicit's CPU conjugate-gradient solver)."""
    from implicit.cpu.als import AlternatingLeastSquares

    weighting, matrix = _weighted(train_csr, params)
    reg, alpha = float(params["regularization"]), float(params["alpha"])
    # implicit runs its own OpenMP threads; a second BLAS thread pool would oversubscribe.
    with threadpool_limits(1, "blas"):
        model = AlternatingLeastSquares(
            factors=int(params["factors"]),
            regularization=reg,
            alpha=alpha,
            iterations=int(params["iterations"]),
            random_state=seed,
            num_threads=num_threads or default_num_threads(),
        )
        model.fit(matrix, show_progress=False)
    return FactorModel("als", weighting, model.user_factors, model.item_factors, reg, alpha)


def _fit_bpr(
    train_csr: sp.spmatrix, params: Params, seed: int, num_threads: int = 0
) -> FactorModel:
    """Bayesian personalised ranking (implicit's CPU SGD), always on one thread: its lock-free
    multi-threaded updates depend on scheduling and would make runs irreproducible."""
    from implicit.cpu.bpr import BayesianPersonalizedRanking

    weighting, matrix = _weighted(train_csr, params)
    reg = float(params["regularization"])
    with threadpool_limits(1, "blas"):
        model = BayesianPersonalizedRanking(
            factors=int(params["factors"]),
            learning_rate=float(params["learning_rate"]),
            regularization=reg,
            iterations=int(params["iterations"]),
            random_state=seed,
            num_threads=1,
        )
        model.fit(matrix, show_progress=False)
    return FactorModel("bpr", weighting, model.user_factors, model.item_factors, reg, 1.0)


def _fit_itemknn(
    name: str, train_csr: sp.spmatrix, params: Params, seed: int, num_threads: int = 0
) -> ItemSimilarityModel:
    """Item kNN from implicit (cosine or BM25 item-item similarity); deterministic."""
    from implicit.nearest_neighbours import BM25Recommender, CosineRecommender

    weighting, matrix = _weighted(train_csr, params)
    threads, neighbours = num_threads or default_num_threads(), int(params["neighbours"])
    if name == "itemknn_bm25":
        k1, b = float(params["knn_k1"]), float(params["knn_b"])
        model = BM25Recommender(K=neighbours, K1=k1, B=b, num_threads=threads)
    else:
        model = CosineRecommender(K=neighbours, num_threads=threads)
    with warnings.catch_warnings(), threadpool_limits(1, "blas"):
        # implicit's kNN classes convert their own COO intermediates and warn about it.
        warnings.filterwarnings("ignore", message="Method expects CSR input")
        model.fit(matrix, show_progress=False)
    return ItemSimilarityModel(name, weighting, model.similarity.astype(np.float32))


def _fit_ease(
    train_csr: sp.spmatrix, params: Params, seed: int, num_threads: int = 0
) -> ItemSimilarityModel:
    """EASE (Steck 2019): B = I - P / diag(P) with P = (X^T X + l2*I)^-1, zero diagonal.

    Needs dense items x items matrices, so more than ``max_items`` items raises ValueError.
    """
    n_items, cap = train_csr.shape[1], int(params["max_items"])
    if n_items > cap:
        raise ValueError(
            f"EASE needs dense item x item matrices: {n_items} items exceeds max_items={cap} "
            f"(about {2 * n_items**2 * 8 / 1e9:.1f} GB); drop rare items with "
            "filter_min_interactions or raise max_items"
        )
    weighting, matrix = _weighted(train_csr, params)
    with threadpool_limits(num_threads or default_num_threads(), "blas"):
        gram = (matrix.T @ matrix).toarray().astype(np.float64)
        gram[np.diag_indices(n_items)] += float(params["l2"])
        inverse = np.linalg.inv(gram)
    weights = -inverse / np.diag(inverse)  # column j scaled by -1/P_jj, i.e. I - P/diag(P)
    weights[np.diag_indices(n_items)] = 0.0
    return ItemSimilarityModel("ease", weighting, weights.astype(np.float32))


def _fit_popular(
    train_csr: sp.spmatrix, params: Params, seed: int, num_threads: int = 0
) -> PopularityModel:
    """Most-popular baseline: interaction counts per item (deterministic)."""
    weighting = Weighting.from_params(dict(params)).fit(train_csr)
    popularity = np.diff(sp.csc_matrix(train_csr).indptr).astype(np.float32)
    return PopularityModel("popular", weighting, popularity)


# ---- registry and search spaces ------------------------------------------------------------


@dataclass(frozen=True)
class Dimension:
    """One hyperparameter's search range: int/float in [low, high] (optionally log-scaled) or
    a categorical choice among ``values``."""

    kind: Literal["int", "float", "choice"]
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    values: tuple[Any, ...] = ()


# Weighting keys every algorithm accepts (see services.transform.features.Weighting).
WEIGHTING_DEFAULTS: dict[str, Any] = {
    "weighting": "binary", "weight_alpha": 1.0, "weight_threshold": 4.0,
    "bm25_k1": 1.2, "bm25_b": 0.75, "weight_binarise": True,
}  # fmt: skip


@dataclass(frozen=True)
class AlgorithmSpec:
    """An algorithm's fit function, default hyperparameters, search space and tuning budget."""

    name: str
    fit_fn: Callable[..., Recommender]  # takes fully resolved params
    defaults: Mapping[str, Any]
    search_space: Mapping[str, Dimension]
    n_trials: int = 0  # TPE trials the frozen defaults were tuned with

    def resolve_params(self, params: Params | None = None) -> dict[str, Any]:
        """Defaults overlaid with ``params``; unknown keys raise ValueError."""
        merged = {**WEIGHTING_DEFAULTS, **self.defaults}
        unknown = sorted(set(params or {}) - set(merged))
        if unknown:
            raise ValueError(
                f"unknown {self.name} parameters {unknown}; accepted: {sorted(merged)}"
            )
        return {**merged, **(params or {})}

    def fit(
        self,
        train_csr: sp.spmatrix,
        params: Params | None = None,
        seed: int = 42,
        num_threads: int = 0,
    ) -> Recommender:
        """Fit on a raw-rating CSR; ``params`` overlay the defaults, num_threads=0 uses every
        CPU this process may use."""
        matrix = sp.csr_matrix(train_csr, dtype=np.float32)
        return self.fit_fn(matrix, self.resolve_params(params), seed, num_threads=num_threads)


# Defaults are the tuned values (4 significant digits) of tune(name, train, n_trials=n_trials,
# seed=42) on ML-100K: random 75/25 split with seed 42, validation carved from train only.
# tests/train/test_quality.py re-runs that tuning and checks it reproduces these values.
ALGORITHMS: dict[str, AlgorithmSpec] = {
    "als": AlgorithmSpec(
        "als", _fit_als, n_trials=30,
        defaults={"factors": 26, "regularization": 38.44, "alpha": 3.536, "iterations": 15,
                  "weighting": "binary"},
        search_space={"factors": Dimension("int", 16, 256, log=True),
                      "regularization": Dimension("float", 0.1, 200.0, log=True),
                      "alpha": Dimension("float", 0.5, 30.0, log=True),
                      "weighting": Dimension("choice", values=("binary", "bm25"))},
    ),
    "bpr": AlgorithmSpec(
        "bpr", _fit_bpr, n_trials=20,
        defaults={"factors": 35, "learning_rate": 0.002706, "regularization": 0.002719,
                  "iterations": 138},
        search_space={"factors": Dimension("int", 16, 128, log=True),
                      "learning_rate": Dimension("float", 0.001, 0.02, log=True),
                      "regularization": Dimension("float", 1e-3, 0.1, log=True),
                      "iterations": Dimension("int", 30, 150, log=True)},
    ),
    "itemknn_cosine": AlgorithmSpec(
        "itemknn_cosine", partial(_fit_itemknn, "itemknn_cosine"), n_trials=10,
        defaults={"neighbours": 643},
        search_space={"neighbours": Dimension("int", 10, 800, log=True)},
    ),
    "itemknn_bm25": AlgorithmSpec(
        "itemknn_bm25", partial(_fit_itemknn, "itemknn_bm25"), n_trials=20,
        defaults={"neighbours": 204, "knn_k1": 4.084, "knn_b": 0.2963},
        search_space={"neighbours": Dimension("int", 10, 800, log=True),
                      "knn_k1": Dimension("float", 0.1, 10.0, log=True),
                      "knn_b": Dimension("float", 0.0, 1.0)},
    ),
    "ease": AlgorithmSpec(
        "ease", _fit_ease, n_trials=15,
        defaults={"l2": 412.8, "max_items": 10_000},
        search_space={"l2": Dimension("float", 10.0, 5000.0, log=True)},
    ),
    "popular": AlgorithmSpec("popular", _fit_popular, defaults={}, search_space={}),
}  # fmt: skip


def fit_algorithm(
    name: str,
    train_csr: sp.spmatrix,
    params: Params | None = None,
    seed: int = 42,
    num_threads: int = 0,
) -> Recommender:
    """Fit the registered algorithm ``name``: ``ALGORITHMS[name].fit`` with a clear error."""
    if name not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {name!r}; choose one of {sorted(ALGORITHMS)}")
    return ALGORITHMS[name].fit(train_csr, params, seed, num_threads)
