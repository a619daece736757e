"""What an algorithm's first tuning trial is expected to cost, before any trial has run.

A budgeted search starts no trial expected to end, with the final fit after it, past its
share (see TrialClock); before the first trial ends, it has only this estimate:

- ALS and BPR: none needed (0 s). A running trial is cut at the iteration after which its
  final fit would no longer end in time (TrialObjective.iteration_hook), so an iterative
  trial cannot overrun by more than one iteration.
- Dense EASE: what its search factorises once (services.train.ease_path): the smaller
  Gram matrix (X^T X, or X X^T where fewer users than items interacted), timed on two
  nested samples of its other side and extended linearly in the co-occurrences it counts,
  plus one m x m eigendecomposition, m the smaller of the users and the items. That is
  timed on one BLAS thread at min(m, PROBE_SIDE) rows (exactly m up to PROBE_SIDE) and
  scaled by the cube of m over that side. Where the search may draw a dropout penalty
  (catalogues up to dropout_max_items), a trial factorises the items' Gram whatever the
  users: the estimate is then the larger of the two.
- Why so: every timing is the fastest of a few runs (``fastest_seconds``), since other
  processes' load only ever adds time. A small multi-threaded solve is what load hurts
  most (its threads wait on each other at every step): on this shared 2-core machine,
  a 384 x 384 eigendecomposition on two threads, fastest of three, scaled to 4,724 items
  gave 79 to 89 s for a solve that took 12 to 20 s, and one at 768 gave 21 to 43 s. On one
  thread, 768 x 768 scaled to 20 s for a one-thread solve of 20 s, as at 1,536 rows (19 s).
  The real solve runs on the train threads, so on a quiet machine the estimate errs long by
  their speed-up (about 1.7x on two cores); under load, where extra threads gain little,
  it is about right. The EASE probe costs about 0.3 s of eigendecompositions plus the
  sampled Gram matrices (0.6 s at 4,724 items and 1.1 million ratings, where the Gram
  itself took 0.8 s and the eigendecomposition 12 to 20 s).
- A blend: the sum of its parts' estimates, or of the final fit a part had earlier in the
  same run (on train, larger than the fit matrix, so again long).
- The others (item kNN, sparse_ease): the defaults fitted on two nested seeded samples
  of the items (PROBE_SHARE / 2 and PROBE_SHARE of them, every user; after an untimed fit
  on PROBE_SHARE / 4 that loads what a first fit loads), extended to every item by the
  power law through the two times, its power held between 2 and 3 (item kNN's
  co-occurrences grow as the square of the items sampled, sparse_ease's factorisation
  faster). Samples of users would not do: sparse_ease's cost follows the items, and a fit
  on a tenth of the users cost about a whole one.

The probes fit the algorithm's defaults, whereas the first trial draws its own parameters;
what the estimate misses is bounded by the stage's stated slack (the longest piece no
deadline can interrupt: an iteration, a scoring pass, a non-iterative trial, a probe).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp
from threadpoolctl import threadpool_limits

from services.train.algorithms import (
    ALGORITHMS,
    BLEND_PARTS,
    ITERATIVE,
    blend_part_params,
    dropout_searched,
    fit_algorithm,
)
from services.train.ease_path import factorises_users

PROBE_SIDE = 768
PROBE_REPEATS = 3  # an eigendecomposition's timings
GRAM_REPEATS = 2  # a sampled Gram's: each densifies an items x items (or users) matrix
PROBE_SHARE = 0.2


@dataclass(frozen=True)
class Estimate:
    """Seconds a first trial is expected to take, what measuring it took, and the rule."""

    seconds: float
    probe_seconds: float
    rule: str


def first_trial_estimate(algorithm: str, matrix: sp.csr_matrix, params: Mapping[str, Any],
                         seed: int, num_threads: int, measured: Mapping[str, float]
                         ) -> Estimate:
    """The expected first trial of ``algorithm`` on the fit ``matrix`` (see the module);
    ``measured`` holds the final fit seconds of the algorithms fitted before it."""
    started = time.perf_counter()
    if algorithm in ITERATIVE:
        seconds, rule = 0.0, "iterative: cut at the deadline"
    elif algorithm in BLEND_PARTS:
        seconds, rules = 0.0, []
        for part, own in blend_part_params(algorithm, params):
            if part in measured:
                seconds += measured[part]
                rules.append(f"{part}: its final fit")
            else:
                estimate = first_trial_estimate(part, matrix, own, seed, num_threads, measured)
                seconds += estimate.seconds
                rules.append(f"{part}: {estimate.rule}")
        rule = "; ".join(rules)
    elif algorithm == "ease":
        seconds, rule = _ease_seconds(matrix, seed, ALGORITHMS["ease"].resolve_params(
            dict(params)))
    else:
        seconds = _sampled_fit_seconds(algorithm, matrix, params, seed, num_threads)
        rule = (f"defaults fitted on {PROBE_SHARE / 2:.0%} and {PROBE_SHARE:.0%} of the "
                "items, extended")
    return Estimate(seconds, time.perf_counter() - started, rule)


def fastest_seconds(work: Callable[[], object], repeats: int = PROBE_REPEATS,
                    clock: Callable[[], float] = time.perf_counter) -> float:
    """The least of ``repeats`` timings of ``work`` by ``clock``: other processes' load
    only ever adds time, so the fastest run is the closest to the work's own cost."""
    fastest = np.inf
    for _ in range(max(repeats, 1)):
        started = clock()
        work()
        fastest = min(fastest, clock() - started)
    return float(fastest)


def _cost(matrix: sp.csr_matrix, axis: int = 0) -> float:
    """Sum of the squared lengths of the rows (``axis`` 0) or columns (1): the pairs of
    entries the Gram matrix of the other side visits."""
    matrix = sp.csr_matrix(matrix)
    lengths = (np.diff(matrix.indptr) if axis == 0 else
               np.bincount(matrix.indices, minlength=matrix.shape[1])).astype(np.float64)
    return float(lengths @ lengths) + 1.0


def _sample(matrix: sp.csr_matrix, seed: int, share: float, axis: int) -> sp.csr_matrix:
    """The users' rows (``axis`` 0) or the items' columns (1) of a seeded ``share`` of
    them; nested: a smaller share keeps a prefix of the same draw."""
    size = matrix.shape[axis]
    order = np.random.default_rng(seed).permutation(size)
    chosen = np.sort(order[:max(int(np.ceil(share * size)), 1)])
    return sp.csr_matrix(matrix[chosen] if axis == 0 else matrix[:, chosen])


def _ease_seconds(matrix: sp.csr_matrix, seed: int, params: Mapping[str, Any]
                  ) -> tuple[float, str]:
    """EASE's search factorisation (see the module), and the rule said. A trial with a
    dropout penalty factorises the items' Gram whatever the users (services.train.tuning):
    where one may run, the estimate is the larger of the two."""
    matrix = sp.csr_matrix(matrix, dtype=np.float64)
    sides = ["users'"] if factorises_users(matrix) else []
    if not sides or float(params["dropout"]) or dropout_searched(matrix.shape[1], params):
        sides.append("items'")
    return max(_gram_factorisation_seconds(matrix, seed, which) for which in sides)


def _gram_factorisation_seconds(matrix: sp.csr_matrix, seed: int, which: str
                                ) -> tuple[float, str]:
    """The users' (X X^T, over samples of the items) or the items' Gram and its
    eigendecomposition, and the rule said."""
    if which == "users'":
        users = matrix[np.flatnonzero(np.diff(matrix.indptr))]
        gram = _extended_seconds(users, seed, lambda sample: (sample @ sample.T).toarray(),
                                 axis=1)
        side = users.shape[0]
    else:
        gram = _extended_seconds(matrix, seed, lambda sample: (sample.T @ sample).toarray(),
                                 axis=0)
        side = matrix.shape[1]
    probe = min(side, PROBE_SIDE)
    factor = eigh_seconds(probe, seed) * (side / probe) ** 3
    return gram + factor, (f"{which} Gram on two samples + eigendecomposition of "
                           f"{side} x {side} timed at {probe} on one thread")


def eigh_seconds(side: int, seed: int) -> float:
    """The fastest of PROBE_REPEATS eigendecompositions of a side x side Gram matrix, on
    one BLAS thread (see the module)."""
    rng = np.random.default_rng(seed)
    square = rng.standard_normal((side, side))
    gram = square @ square.T + side * np.eye(side)
    with threadpool_limits(1, "blas"):
        return fastest_seconds(lambda: np.linalg.eigh(gram))


def _sampled_fit_seconds(algorithm: str, matrix: sp.csr_matrix, params: Mapping[str, Any],
                         seed: int, num_threads: int) -> float:
    resolved = ALGORITHMS[algorithm].resolve_params(dict(params))
    matrix = sp.csr_matrix(matrix)

    def fit(share: float) -> float:
        sample = _sample(matrix, seed, share, axis=1)
        started = time.perf_counter()
        fit_algorithm(algorithm, sample, resolved, seed, num_threads)
        return time.perf_counter() - started

    fit(PROBE_SHARE / 4)  # loads what a first fit loads, so that the timed ones compare
    small, large = fit(PROBE_SHARE / 2), fit(PROBE_SHARE)
    power = float(np.clip(np.log2(max(large, 1e-9) / max(small, 1e-9)), 2.0, 3.0))
    return large * (1.0 / PROBE_SHARE) ** power


def _extended_seconds(matrix: sp.csr_matrix, seed: int,
                      work: Callable[[sp.csr_matrix], object], axis: int) -> float:
    """``work`` timed (the fastest of GRAM_REPEATS) on two nested samples of the users
    (``axis`` 0) or the items (1), extended along their co-occurrence cost to the whole
    matrix (see the module)."""
    matrix = sp.csr_matrix(matrix)
    points = []
    for share in (PROBE_SHARE / 2, PROBE_SHARE):
        sample = _sample(matrix, seed, share, axis)
        points.append((_cost(sample, axis),
                       fastest_seconds(lambda s=sample: work(s), GRAM_REPEATS)))
    (small, small_seconds), (large, large_seconds) = points
    slope = max(large_seconds - small_seconds, 0.0) / max(large - small, 1.0)
    return max(large_seconds + slope * (_cost(matrix, axis) - large), large_seconds)
