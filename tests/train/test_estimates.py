"""First-trial estimates: the rules they follow (their accuracy is a benchmark figure)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

import services.train.estimates as estimates
from services.train.algorithms import ALGORITHMS
from services.train.estimates import PROBE_SIDE, fastest_seconds, first_trial_estimate


def test_a_timing_is_the_fastest_of_its_repeats() -> None:
    ticks = iter([0.0, 5.0, 10.0, 11.0, 20.0, 20.5])  # runs of 5 s, 1 s and 0.5 s
    runs: list[int] = []
    assert fastest_seconds(lambda: runs.append(1), 3, clock=lambda: next(ticks)) == 0.5
    assert len(runs) == 3


def _ratings(users: int, items: int, density: float) -> sp.csr_matrix:
    matrix = sp.random(users, items, density=density, format="csr",
                       random_state=np.random.default_rng(4), dtype=np.float32)
    matrix.data[:] = 4.0
    return matrix


@pytest.mark.parametrize(("users", "items", "which", "side"),
                         [(30, 200, "users'", 30), (200, 30, "items'", 30)])
def test_ease_is_probed_on_the_smaller_gram_at_its_own_size(
        users: int, items: int, which: str, side: int) -> None:
    """Where the dropout penalty is not searched (above dropout_max_items), a trial
    factorises the smaller Gram only."""
    params = ALGORITHMS["ease"].resolve_params({"dropout_max_items": 10})
    estimate = first_trial_estimate("ease", _ratings(users, items, 0.2), params, seed=1,
                                    num_threads=1, measured={})
    assert estimate.rule.startswith(f"{which} Gram")
    assert f"of {side} x {side} timed at {side} on one thread" in estimate.rule
    assert estimate.seconds > 0 and estimate.probe_seconds > 0


def test_a_large_eigendecomposition_is_scaled_from_the_probe_by_the_cube(
        monkeypatch: pytest.MonkeyPatch) -> None:
    probed: list[int] = []
    monkeypatch.setattr(estimates, "eigh_seconds",
                        lambda side, seed: probed.append(side) or 1.0)
    side = 2 * PROBE_SIDE
    seconds, rule = estimates._ease_seconds(
        _ratings(side, side + 10, 0.02), seed=1,
        params=ALGORITHMS["ease"].resolve_params({"dropout_max_items": 10}))
    assert probed == [PROBE_SIDE] and f"timed at {PROBE_SIDE}" in rule
    assert seconds >= 8.0  # (2 * PROBE_SIDE / PROBE_SIDE) ** 3 probe seconds, Gram besides


def test_where_a_dropout_trial_may_run_the_items_gram_is_estimated_too(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A trial with a dropout penalty inverts the items' Gram even with few users: where
    the search may draw one, the estimate is the larger of the two factorisations."""
    probed: list[int] = []
    monkeypatch.setattr(estimates, "eigh_seconds",
                        lambda side, seed: probed.append(side) or side / 10.0)
    matrix = _ratings(30, 200, 0.2)
    seconds, rule = estimates._ease_seconds(matrix, seed=1,
                                            params=ALGORITHMS["ease"].resolve_params({}))
    assert sorted(probed) == [30, 200] and rule.startswith("items' Gram") and seconds >= 20.0
