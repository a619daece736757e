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

import logging
import warnings
from collections.abc import Callable, Mapping
from contextlib import suppress
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import numpy as np
import scipy.sparse as sp
from threadpoolctl import threadpool_limits

from services.train.ease_path import factorises_users, gram_spectrum
from shared.features import Weighting
from shared.recommenders import (
    BlendModel,
    FactoredSimilarityModel,
    FactorModel,
    ItemSimilarityModel,
    PopularityModel,
    Recommender,
    default_num_threads,
)

Params = Mapping[str, Any]
# Called after each training iteration (counted from 1) with a way to build the model as it
# stands; tuning measures it there to prune hopeless trials. Raising stops the fit.
IterationCallback = Callable[[int, Callable[[], Recommender]], None]


class StopFitting(Exception):  # noqa: N818 - a request, not an error
    """Raised by an IterationCallback to end an iterative fit where it stands: the model
    of the iterations done so far is the result."""


# ---- fitting -------------------------------------------------------------------------------


def _weighted(train_csr: sp.spmatrix, params: Params) -> tuple[Weighting, sp.csr_matrix]:
    return Weighting.from_params(dict(params)).fit_transform(train_csr)


def _iteration_hook(on_iteration: IterationCallback | None,
                    current: Callable[[], Recommender]) -> Callable[..., None] | None:
    """implicit's per-iteration callback (iteration from 0, then timings) as ours."""
    if on_iteration is None:
        return None
    return lambda iteration, *_: on_iteration(iteration + 1, current)


def _fit_als(
    train_csr: sp.spmatrix, params: Params, seed: int, num_threads: int = 0,
    on_iteration: IterationCallback | None = None,
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
        with suppress(StopFitting):
            model.fit(matrix, show_progress=False, callback=_iteration_hook(
                on_iteration, lambda: FactorModel("als", weighting, model.user_factors,
                                                  model.item_factors, reg, alpha)))
    return FactorModel("als", weighting, model.user_factors, model.item_factors, reg, alpha)


def _fit_bpr(
    train_csr: sp.spmatrix, params: Params, seed: int, num_threads: int = 0,
    on_iteration: IterationCallback | None = None,
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
        with suppress(StopFitting):
            model.fit(matrix, show_progress=False, callback=_iteration_hook(
                on_iteration, lambda: FactorModel("bpr", weighting, model.user_factors,
                                                  model.item_factors, reg, 1.0)))
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


def dropout_emphasis(dropout: float) -> float:
    """The multiple of diag(X^T X) that EDLAE's dropout rate adds to EASE's penalty."""
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"EASE dropout must be in [0, 1), got {dropout}")
    return dropout / (1.0 - dropout)


def dropout_searched(n_items: int, params: Params) -> bool:
    """Whether EASE's search draws a dropout penalty on a catalogue of ``n_items``: a
    dropout trial inverts the items' Gram instead of sharing one factorisation, so only up
    to ``dropout_max_items``."""
    return n_items <= int(params["dropout_max_items"])


def _fit_ease(
    train_csr: sp.spmatrix, params: Params, seed: int, num_threads: int = 0
) -> ItemSimilarityModel:
    """EASE (Steck 2019): B = I - P / diag(P) with P = (X^T X + L)^-1, zero diagonal, where
    L = l2*I + dropout / (1 - dropout) * diag(X^T X): with ``dropout`` above 0, the penalty of
    Steck's denoising autoencoder with that dropout rate (EDLAE, NeurIPS 2020), which
    penalises an item's weights in proportion to its popularity; 0 is plain EASE.

    Needs dense items x items matrices, so more than ``max_items`` items raises ValueError.
    """
    n_items, cap = train_csr.shape[1], int(params["max_items"])
    if n_items > cap:
        raise ValueError(
            f"EASE needs dense item x item matrices: {n_items} items exceeds max_items={cap} "
            f"(about {2 * n_items**2 * 8 / 1e9:.1f} GB); use sparse_ease, its sparse "
            "approximation, or drop rare items with filter_min_interactions or raise max_items"
        )
    weighting, matrix = _weighted(train_csr, params)
    l2, emphasis = float(params["l2"]), dropout_emphasis(float(params["dropout"]))
    with threadpool_limits(num_threads or default_num_threads(), "blas"):
        # P from the users' Gram (see ease_path; exact) where users are few: it costs an
        # users^3 factorisation and an items^2 x users product against the items^3
        # inversion, about even at ml-100k's 943 users of 1,682 items, so below half.
        # The dropout penalty is not uniform, so it always inverts the items' Gram.
        if not emphasis and factorises_users(matrix, share=0.5):
            spectrum = gram_spectrum(matrix)
            q = spectrum.eigenvectors
            inverse = (q * spectrum.spectrum_shift(l2)) @ q.T
            inverse[np.diag_indices(n_items)] += 1.0 / l2
        else:
            gram = (matrix.T @ matrix).toarray().astype(np.float64)
            gram[np.diag_indices(n_items)] += l2 + emphasis * np.diag(gram)
            inverse = np.linalg.inv(gram)
    weights = -inverse / np.diag(inverse)  # column j scaled by -1/P_jj, i.e. I - P/diag(P)
    weights[np.diag_indices(n_items)] = 0.0
    return ItemSimilarityModel("ease", weighting, weights.astype(np.float32))


def _import_sansa() -> Any:
    """The ``sansa`` package, imported without the root logging handler it installs."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    import sansa  # its import calls logging.basicConfig(level=INFO)

    root.handlers[:], root.level = handlers, level
    logging.getLogger("sansa").setLevel(logging.WARNING)  # a line per step is noise in workers
    return sansa


def _pruned_gram(matrix: sp.csr_matrix, per_item: int, block_cells: int = 2**24
                 ) -> sp.csr_matrix:
    """X^T X keeping, per item, its ``per_item`` largest co-occurrences (and its diagonal),
    made symmetric: computed a block of items at a time, so at most ``block_cells``
    products are held at once besides the result (items x per_item, twice)."""
    n_items = matrix.shape[1]
    by_item, by_column = matrix.T.tocsr(), matrix.tocsc()
    rows, columns, values = [], [], []
    width = max(1, block_cells // max(n_items, 1))
    for start in range(0, n_items, width):
        part = sp.csc_matrix(by_item @ by_column[:, start:start + width])
        for j in range(part.shape[1]):
            lo, hi = part.indptr[j], part.indptr[j + 1]
            index, value = part.indices[lo:hi], part.data[lo:hi]
            if hi - lo > per_item:
                keep = np.argpartition(-np.abs(value), per_item - 1)[:per_item]
                index, value = index[keep], value[keep]
            rows.append(index)
            columns.append(np.full(len(index), start + j, dtype=np.int64))
            values.append(value)
    kept = sp.csr_matrix((np.concatenate(values), (np.concatenate(rows), np.concatenate(columns))),
                         shape=(n_items, n_items), dtype=np.float32)
    gram = sp.csr_matrix(kept.maximum(kept.T))
    diagonal = np.asarray(matrix.multiply(matrix).sum(axis=0), dtype=np.float32).ravel()
    # An item nobody interacted with keeps a tiny diagonal, so that every row of the Gram
    # holds an entry (SANSA's row norms assume it); no user's score depends on it.
    diagonal = np.maximum(diagonal, np.float32(1e-6))
    gram = gram + sp.diags(diagonal - gram.diagonal(), format="csr", dtype=np.float32)
    gram.eliminate_zeros()
    return sp.csr_matrix(gram, dtype=np.float32)


def _fit_sparse_ease(
    train_csr: sp.spmatrix, params: Params, seed: int, num_threads: int = 0
) -> FactoredSimilarityModel:
    """SANSA (Spisak et al., RecSys 2023): EASE with its inverse kept sparse.

    An LDL^T factorisation of P (X^T X + l2*I) P^T and a sparse approximate inverse of L
    give P^-1 ~ W^T D^-1 W, so B = I - P^-1 / diag(P^-1) ~ I + W^T (D^-1 W / -diag), each
    factor holding about ``target_density`` * items^2 weights (at most ``max_item_weights``
    per item). Factorizer "cholmod" factorises exactly, then prunes; "icf" (SANSA's
    incomplete factorisation, on its item-normalised Gram) works from X^T X pruned to
    ``max_item_weights`` entries per item, built in blocks, so memory follows the items
    and not their squares; "auto" takes "cholmod" up to ``exact_max_items`` items.
    Deterministic: nothing in it draws random numbers.
    """
    sansa = _import_sansa()
    weighting, matrix = _weighted(train_csr, params)
    n_items, per_item = matrix.shape[1], int(params["max_item_weights"])
    density = min(float(params["target_density"]), per_item / n_items)
    factorizer = str(params["factorizer"])
    if factorizer not in ("auto", "cholmod", "icf"):
        raise ValueError(
            f"sparse_ease factorizer must be 'auto', 'cholmod' or 'icf', got {factorizer!r}")
    if factorizer == "auto":
        factorizer = "cholmod" if n_items <= int(params["exact_max_items"]) else "icf"
    config = sansa.SANSAConfig(
        l2=float(params["l2"]),
        weight_matrix_density=density,
        gramian_factorizer_config=(sansa.CHOLMODGramianFactorizerConfig() if factorizer == "cholmod"
                                   else sansa.ICFGramianFactorizerConfig()),
        lower_triangle_inverter_config=sansa.UMRUnitLowerTriangleInverterConfig(
            scans=int(params["umr_scans"]), finetune_steps=int(params["umr_finetune_steps"])),
    )
    import numba

    threads = num_threads or default_num_threads()
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    matrix = sp.csr_matrix(matrix, dtype=np.float32)
    with threadpool_limits(threads, "blas"):
        if factorizer == "cholmod":
            fitted = sansa.SANSA(config).fit(matrix)
        else:
            # CSC with int64 indices: the layout SANSA's compiled incomplete factorisation takes
            # (the Gram is symmetric, so CSC holds the same matrix).
            gram = sp.csc_matrix(_pruned_gram(matrix, per_item))
            gram.indices, gram.indptr = gram.indices.astype(np.int64), gram.indptr.astype(np.int64)
            fitted = sansa.SANSA(config).fit(gram, compute_gramian=False)
    left, right = fitted.weights
    return FactoredSimilarityModel("sparse_ease", weighting, left, right)


def _fit_popular(
    train_csr: sp.spmatrix, params: Params, seed: int, num_threads: int = 0
) -> PopularityModel:
    """Most-popular baseline: interaction counts per item (deterministic)."""
    weighting = Weighting.from_params(dict(params)).fit(train_csr)
    popularity = np.diff(sp.csc_matrix(train_csr).indptr).astype(np.float32)
    return PopularityModel("popular", weighting, popularity)


# The parts of a blend and the prefix of each part's parameters among the blend's.
BLEND_PARTS: dict[str, tuple[str, ...]] = {"ease_als": ("ease", "als")}


def blend_part_params(blend: str, params: Params) -> list[tuple[str, dict[str, Any]]]:
    """Each part of ``blend`` with its own parameters (the blend's ``PART_name`` keys)."""
    parts = []
    for part in BLEND_PARTS[blend]:
        prefix = f"{part}_"
        own = {key[len(prefix):]: value for key, value in params.items()
               if key.startswith(prefix)}
        parts.append((part, ALGORITHMS[part].resolve_params(own)))
    return parts


def blend_of(blend: str, parts: list[Recommender], params: Params) -> BlendModel:
    """The blend of fitted ``parts``: weight ``blend_weight`` on the last, the rest shared
    evenly by the others."""
    last = float(params["blend_weight"])
    if not 0.0 <= last <= 1.0:
        raise ValueError(f"{blend} blend_weight must lie in [0, 1], got {last}")
    others = (1.0 - last) / max(len(parts) - 1, 1)
    return BlendModel(blend, parts, [others] * (len(parts) - 1) + [last])


ITERATIVE = ("als", "bpr")  # the fits that take an IterationCallback (and stop at a deadline)


def _fit_blend(
    name: str, train_csr: sp.spmatrix, params: Params, seed: int, num_threads: int = 0,
    on_iteration: IterationCallback | None = None,
) -> BlendModel:
    """A blend (see BlendModel): each part fitted on the same matrix with its own
    parameters, their standardised scores summed with the tuned weights. ``on_iteration``
    follows the iterative parts (ALS, BPR)."""
    parts = [ALGORITHMS[part].fit(train_csr, own, seed, num_threads,
                                  on_iteration if part in ITERATIVE else None)
             for part, own in blend_part_params(name, params)]
    return blend_of(name, parts, params)


def _prefixed(part: str, keys: Mapping[str, Any]) -> dict[str, Any]:
    return {f"{part}_{key}": value for key, value in keys.items()}


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


# Weighting keys every algorithm accepts (see shared.features.Weighting).
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
        on_iteration: IterationCallback | None = None,
    ) -> Recommender:
        """Fit on a raw-rating CSR; ``params`` overlay the defaults, num_threads=0 uses every
        CPU this process may use; ``on_iteration`` is for the iterative fits (ALS, BPR)."""
        matrix = sp.csr_matrix(train_csr, dtype=np.float32)
        extra = {} if on_iteration is None else {"on_iteration": on_iteration}
        return self.fit_fn(matrix, self.resolve_params(params), seed, num_threads=num_threads,
                           **extra)


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
        # Frozen from this search on ml-100k's random split (Recommenders' rounding, seed 42).
        defaults={"factors": 41, "learning_rate": 0.00415, "regularization": 0.001217,
                  "iterations": 117},
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
        defaults={"l2": 412.8, "dropout": 0.0, "max_items": 10_000,
                  "dropout_max_items": 4_000},
        search_space={"l2": Dimension("float", 10.0, 5000.0, log=True),
                      "dropout": Dimension("float", 0.0, 0.85)},
    ),
    # max_item_weights caps each factor (and, with "icf", the Gram) at that many weights per
    # item whatever the density: memory bounded on large catalogues.
    "sparse_ease": AlgorithmSpec(
        "sparse_ease", _fit_sparse_ease, n_trials=15,
        defaults={"l2": 425.1, "target_density": 0.1588, "max_item_weights": 500,
                  "factorizer": "auto", "exact_max_items": 10_000, "umr_scans": 1,
                  "umr_finetune_steps": 5},
        search_space={"l2": Dimension("float", 10.0, 5000.0, log=True),
                      "target_density": Dimension("float", 0.005, 0.2, log=True)},
    ),
    "popular": AlgorithmSpec("popular", _fit_popular, defaults={}, search_space={}),
}  # fmt: skip
# EASE and ALS blended (see BlendModel). Its parts' parameters are the blend's with the
# part's prefix (ease_l2, als_factors, ...); the pipeline gives it those its parts were
# tuned to in the same run, so its search is over the weight alone.
ALGORITHMS["ease_als"] = AlgorithmSpec(
    "ease_als", partial(_fit_blend, "ease_als"), n_trials=10,
    defaults={"blend_weight": 0.5, "weighting": "none",
              **_prefixed("ease", ALGORITHMS["ease"].resolve_params()),
              **_prefixed("als", ALGORITHMS["als"].resolve_params())},
    search_space={"blend_weight": Dimension("float", 0.05, 0.95)},
)


def fit_algorithm(
    name: str,
    train_csr: sp.spmatrix,
    params: Params | None = None,
    seed: int = 42,
    num_threads: int = 0,
    on_iteration: IterationCallback | None = None,
) -> Recommender:
    """Fit the registered algorithm ``name``: ``ALGORITHMS[name].fit`` with a clear error."""
    if name not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {name!r}; choose one of {sorted(ALGORITHMS)}")
    return ALGORITHMS[name].fit(train_csr, params, seed, num_threads, on_iteration)
