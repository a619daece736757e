"""rank_rows, the ranking serve, the batch and evaluation share, against a plain sort of
each row; seen_cells, the cells a history row bans."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from shared.recommenders import rank_rows, seen_cells


def sorted_row(line: np.ndarray, k: int) -> list[int]:
    """Every rankable item by score, ties by lower index, the first k."""
    items = [i for i in range(line.size) if not np.isnan(line[i]) and line[i] > -np.inf]
    return sorted(items, key=lambda i: (-float(line[i]), i))[:k]


def test_ties_nan_banned_masked_and_short_rows_rank_as_a_full_sort() -> None:
    rng = np.random.default_rng(11)
    scores = rng.integers(0, 6, size=(60, 40)).astype(np.float32)  # many ties everywhere
    scores[rng.random(scores.shape) < 0.05] = np.nan
    scores[3, 5:] = np.nan  # fewer rankable items than k
    banned_cells = rng.choice(scores.size, size=300, replace=False)
    mask = rng.random(40) < 0.8
    expected = scores.copy()
    expected.reshape(-1)[banned_cells] = -np.inf
    expected[:, ~mask] = -np.inf
    for k in (1, 7, 39, 40, 55):
        ids, best = rank_rows(scores, k, banned_cells, mask)
        assert ids.shape == best.shape == (60, k)
        for row in range(60):
            want = sorted_row(expected[row], k)
            assert ids[row, :len(want)].tolist() == want, (k, row)
            assert (ids[row, len(want):] == -1).all() and np.isneginf(best[row, len(want):]).all()
            np.testing.assert_array_equal(best[row, :len(want)], expected[row, want])


def test_in_place_overwrites_only_an_owned_float32_block() -> None:
    rng = np.random.default_rng(5)
    scores = rng.standard_normal((8, 30)).astype(np.float32)
    kept = scores.copy()
    copied = rank_rows(scores, 5)
    np.testing.assert_array_equal(scores, kept)  # not asked: left alone
    shared = np.broadcast_to(kept[0], (8, 30))  # read-only: copied even when asked
    assert (rank_rows(shared, 5, in_place=True)[0] == copied[0][0]).all()
    in_place = rank_rows(scores, 5, in_place=True)
    assert not np.array_equal(scores, kept)
    for got, want in zip(in_place, copied, strict=True):
        np.testing.assert_array_equal(got, want)


def test_seen_cells_ban_each_rows_own_items_and_ties_go_to_the_lower_index() -> None:
    scores = np.array([[1.0, 3.0, 3.0, 0.5, 3.0], [2.0, 2.0, 1.0, 2.0, 0.0]])
    seen = sp.csr_matrix(([1.0, 1.0, 1.0], ([0, 1, 1], [2, 0, 3])), shape=(2, 5))
    assert seen_cells(seen).tolist() == [2, 5, 8]
    ids, best = rank_rows(scores, 3, seen_cells(seen))
    assert ids.tolist() == [[1, 4, 0], [1, 2, 4]]
    assert best.tolist() == [[3.0, 3.0, 1.0], [2.0, 1.0, 0.0]]
