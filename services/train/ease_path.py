"""EASE for many values of l2 on one matrix, from one eigendecomposition of its Gram matrix.

With G = X^T X = Q diag(w) Q^T, (G + l2 I)^-1 = Q diag(1/(w + l2)) Q^T for every l2, so a
search over l2 factorises G once and each trial costs matrix products instead of a new
inversion. Scores are those of ``_fit_ease``'s B = I - P / diag(P) (zero diagonal): a row x
scores x B = x - (x P) / diag(P), and x P = ((x Q) / (w + l2)) Q^T never forms P itself, so a
trial costs (scored users x items x items) rather than (items x items x items).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import scipy.sparse as sp
from threadpoolctl import threadpool_limits

from shared.features import Weighting
from shared.recommenders import Recommender, default_num_threads


class EaseLambdaPath:
    """The weighted Gram matrix of one training matrix, factorised once for any l2."""

    def __init__(self, train_csr: sp.spmatrix, params: Mapping[str, Any],
                 num_threads: int = 0) -> None:
        n_items, cap = train_csr.shape[1], int(params["max_items"])
        if n_items > cap:
            raise ValueError(
                f"EASE needs dense item x item matrices: {n_items} items exceeds "
                f"max_items={cap}; drop rare items with filter_min_interactions or raise "
                "max_items"
            )
        self.threads = num_threads or default_num_threads()
        self.weighting, matrix = Weighting.from_params(dict(params)).fit_transform(
            sp.csr_matrix(train_csr, dtype=np.float32))
        with threadpool_limits(self.threads, "blas"):
            gram = (matrix.T @ matrix).toarray().astype(np.float64)
            # G is symmetric positive semi-definite: its eigenvalues are >= 0 up to rounding.
            self.eigenvalues, self.eigenvectors = np.linalg.eigh(gram)

    def model(self, l2: float) -> Recommender:
        """The EASE model of this matrix for ``l2`` (for scoring; it is not stored)."""
        if not l2 > -float(self.eigenvalues.min()):
            raise ValueError(f"EASE l2 must be positive, got {l2}")
        return _EaseEigenModel(self, float(l2))


class _EaseEigenModel(Recommender):
    """EASE scores from the factorised Gram matrix; equal to ``_fit_ease``'s to rounding."""

    def __init__(self, path: EaseLambdaPath, l2: float) -> None:
        super().__init__("ease", path.weighting, path.eigenvalues.size)
        self.path = path
        self.inverse_spectrum = 1.0 / (path.eigenvalues + l2)
        q = path.eigenvectors  # diag of (G + l2 I)^-1 = (Q * Q) @ (1 / (w + l2))
        self.diagonal = np.einsum("ij,j,ij->i", q, self.inverse_spectrum, q)

    def _score(self, user_indices: np.ndarray, rows: sp.csr_matrix) -> np.ndarray:
        q = self.path.eigenvectors
        with threadpool_limits(self.path.threads, "blas"):
            projected = np.asarray(rows.astype(np.float64) @ q) * self.inverse_spectrum
            scores = projected @ q.T
        scores /= -self.diagonal
        scores += rows.toarray()
        return scores

    def _item_similarities(self, item_idx: int) -> np.ndarray:
        q = self.path.eigenvectors
        row = -((q * self.inverse_spectrum) @ q[item_idx]) / self.diagonal  # P symmetric
        row[item_idx] = 0.0  # B's zero diagonal
        return row

    def _state_arrays(self) -> dict[str, np.ndarray]:
        raise NotImplementedError("a tuning-time EASE model is not stored; fit EASE to keep it")
