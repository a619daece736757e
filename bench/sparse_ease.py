"""Benchmark `sparse_ease` at the ml-25m catalogue size (59,047 movies) against most-popular.

Builds in memory, seeded, the users x movies interaction matrix of a MovieLens-25M-shaped
data set (the same popularity and user-activity model as `bench/datagen.py`, which writes
it as CSV; the movies stay at 59,047 whatever --ratings says), then fits `sparse_ease`
with its registered defaults and, as the baseline measured in the same run, the
most-popular model. Peak RSS is this process's VmHWM, reset (via /proc/self/clear_refs)
after the matrix is built, so it is the fit's peak with the input matrix included.
Human-readable lines first; the last stdout line is one JSON object: rows, items,
fit_seconds, popular_seconds, fit_ratio (sparse_ease / popular), peak_rss_mb, nnz.

    python bench/sparse_ease.py --ratings 25000095
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import scipy.sparse as sp

from bench.datagen import (
    HEAVY_USER_SHARE,
    MIN_USER_RATINGS,
    ML25M_MOVIES,
    ML25M_RATINGS,
    ML25M_USERS,
    Shape,
    _chunks,
    _rng,
    _sample_heavy,
    _sample_light,
    popularity,
    user_counts,
)
from bench.train import own_peak_rss_mb, reset_peak_rss
from services.train.algorithms import ALGORITHMS, fit_algorithm


def catalogue_shape(ratings: int, seed: int) -> Shape:
    """ml-25m's users scaled to `ratings`, its full 59,047 movies kept."""
    users = min(max(1, round(ML25M_USERS * ratings / ML25M_RATINGS)), ratings // MIN_USER_RATINGS)
    return Shape(ratings, users, ML25M_MOVIES, 209_171, seed)


def interactions(shape: Shape) -> sp.csr_matrix:
    """The users x movies 0/1 matrix datagen's sampling draws for `shape`, chunk by chunk."""
    weights = popularity(shape)
    cdf, log_weights = np.cumsum(weights), np.log(weights)
    counts = user_counts(shape)
    heavy_above = max(MIN_USER_RATINGS, int(shape.movies * HEAVY_USER_SHARE))
    columns = np.empty(int(counts.sum()), dtype=np.int32)
    for index, (first, end) in enumerate(_chunks(counts)):
        rng = _rng(shape.seed, 5, index)
        sizes = counts[first:end]
        bounds = np.concatenate([[0], np.cumsum(sizes)])
        items = np.empty(int(bounds[-1]), dtype=np.int64)
        heavy = sizes > heavy_above
        owner = np.repeat(np.arange(end - first), sizes)
        items[~heavy[owner]] = _sample_light(rng, cdf, sizes[~heavy])
        for local in np.flatnonzero(heavy):
            items[bounds[local]:bounds[local + 1]] = _sample_heavy(
                rng, log_weights, int(sizes[local]))
        offset = int(counts[:first].sum())
        columns[offset:offset + len(items)] = items
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    matrix = sp.csr_matrix((np.ones(len(columns), dtype=np.float32), columns, indptr),
                           shape=(shape.users, shape.movies))
    matrix.sort_indices()
    return matrix


def timed_fit(name: str, matrix: sp.csr_matrix, params: dict[str, Any] | None = None,
              seed: int = 42) -> tuple[float, Any]:
    started = time.perf_counter()
    model = fit_algorithm(name, matrix, params, seed=seed)
    return time.perf_counter() - started, model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratings", type=int, default=ML25M_RATINGS)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args(argv)
    shape = catalogue_shape(args.ratings, args.seed)
    started = time.perf_counter()
    matrix = interactions(shape)
    print(f"matrix: {matrix.shape[0]:,} users x {matrix.shape[1]:,} movies, "
          f"{matrix.nnz:,} interactions ({time.perf_counter() - started:.1f} s)")
    popular_seconds, _ = timed_fit("popular", matrix, seed=args.seed)
    reset_peak_rss()
    fit_seconds, model = timed_fit("sparse_ease", matrix, seed=args.seed)
    peak = own_peak_rss_mb()
    nnz = int(sum(factor.nnz for factor in model.factors))
    params = {k: v for k, v in ALGORITHMS["sparse_ease"].resolve_params().items()
              if k in ALGORITHMS["sparse_ease"].defaults}
    print(f"sparse_ease {params}: {fit_seconds:.1f} s, peak RSS {peak:,.0f} MB, "
          f"{nnz:,} weights in its factors; most-popular {popular_seconds:.2f} s")
    print(json.dumps({"rows": int(matrix.nnz), "items": int(matrix.shape[1]),
                      "fit_seconds": round(fit_seconds, 2),
                      "popular_seconds": round(popular_seconds, 3),
                      "fit_ratio": round(fit_seconds / max(popular_seconds, 1e-9), 1),
                      "peak_rss_mb": round(peak, 1), "nnz": nnz}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
