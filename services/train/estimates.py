"""What an algorithm's first tuning trial is expected to cost, before any trial has run.

A budgeted search starts no trial expected to end, with the final fit after it, past its
share (see TrialClock); before the first trial ends, it has only this estimate:

- ALS and BPR: none needed (0 s). A running trial is cut at the iteration after which its
  final fit would no longer end in time (TrialObjective.iteration_hook), so an iterative
  trial cannot overrun by more than one iteration.
- Dense EASE: the Gram matrix of the fit matrix (extended from two user samples as below)
  plus one n x n eigendecomposition, timed on a PROBE_ITEMS x PROBE_ITEMS matrix (the
  fastest of three, a load spike aside) and scaled by (n / PROBE_ITEMS) ** 3. Small solves
  run below a large one's flop rate, so the cubic scaling errs long (about 1.5x at 3,000
  items here).
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

from services.train.algorithms import ALGORITHMS, BLEND_PARTS, blend_part_params, fit_algorithm
from services.train.tuning import PRUNING_STEPS

PROBE_ITEMS = 384
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
    if algorithm in PRUNING_STEPS:
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
        seconds = _gram_seconds(matrix, seed) + _cubic_seconds(matrix.shape[1], seed)
        rule = f"Gram on a user sample + eigendecomposition scaled from {PROBE_ITEMS} items"
    else:
        seconds = _sampled_fit_seconds(algorithm, matrix, params, seed, num_threads)
        rule = (f"defaults fitted on {PROBE_SHARE / 2:.0%} and {PROBE_SHARE:.0%} of the "
                "items, extended")
    return Estimate(seconds, time.perf_counter() - started, rule)


def _cost(matrix: sp.csr_matrix) -> float:
    """Sum of squared user row lengths: the item pairs a co-occurrence count visits."""
    lengths = np.diff(matrix.indptr).astype(np.float64)
    return float(lengths @ lengths) + 1.0


def _sample(matrix: sp.csr_matrix, seed: int, share: float, axis: int) -> sp.csr_matrix:
    """The users' rows (``axis`` 0) or the items' columns (1) of a seeded ``share`` of
    them; nested: a smaller share keeps a prefix of the same draw."""
    size = matrix.shape[axis]
    order = np.random.default_rng(seed).permutation(size)
    chosen = np.sort(order[:max(int(np.ceil(share * size)), 1)])
    return sp.csr_matrix(matrix[chosen] if axis == 0 else matrix[:, chosen])


def _gram_seconds(matrix: sp.csr_matrix, seed: int) -> float:
    return _extended_seconds(matrix, seed, lambda sample: (sample.T @ sample).toarray(),
                             axis=0)


def _cubic_seconds(n_items: int, seed: int) -> float:
    side = PROBE_ITEMS
    rng = np.random.default_rng(seed)
    square = rng.standard_normal((side, side))
    gram = square @ square.T + side * np.eye(side)
    fastest = np.inf
    for _ in range(3):
        started = time.perf_counter()
        np.linalg.eigh(gram)
        fastest = min(fastest, time.perf_counter() - started)
    return fastest * (n_items / side) ** 3


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
    """``work`` timed on two nested samples of the users (``axis`` 0) or the items (1),
    extended along their co-occurrence cost to the whole matrix (see the module)."""
    matrix = sp.csr_matrix(matrix)
    points = []
    for share in (PROBE_SHARE / 2, PROBE_SHARE):
        sample = _sample(matrix, seed, share, axis)
        started = time.perf_counter()
        work(sample)
        points.append((_cost(sample), time.perf_counter() - started))
    (small, small_seconds), (large, large_seconds) = points
    slope = max(large_seconds - small_seconds, 0.0) / max(large - small, 1.0)
    return max(large_seconds + slope * (_cost(matrix) - large), large_seconds)
