"""The array merge of many users' histories keeps what the one-user merge keeps."""

from __future__ import annotations

import numpy as np

from shared.history import History, merge, merge_cells


def test_merge_cells_equals_merge_event_by_event() -> None:
    rng = np.random.default_rng(11)
    users, items, events = 40, 25, 3_000
    rows = rng.integers(0, users, events)
    columns = rng.integers(0, items, events)
    # Half the events add no interaction (NaN, a view); values repeat on purpose.
    values = np.where(rng.random(events) < 0.5, np.nan,
                      rng.integers(1, 11, events) / 2).astype(np.float32)
    expected: dict[int, History] = {}
    for row, column, value in zip(rows.tolist(), columns.tolist(), values.tolist(),
                                  strict=True):
        merge(expected.setdefault(row, {}), column, None if np.isnan(value) else value)

    interactions, seen = merge_cells(rows, columns, values, (users, items))
    assert interactions.has_canonical_format and seen.has_canonical_format
    for row in range(users):
        history = expected.get(row, {})
        start, end = interactions.indptr[row], interactions.indptr[row + 1]
        got = dict(zip(interactions.indices[start:end].tolist(),
                       interactions.data[start:end].tolist(), strict=True))
        assert got == {c: v for c, v in history.items() if v is not None}, row
        assert set(seen[row].indices.tolist()) == set(history), row
    assert seen.nnz > interactions.nnz  # some cells were only viewed


def test_merge_cells_without_views_returns_interactions_as_seen() -> None:
    rows, columns = np.array([0, 0, 1]), np.array([2, 2, 0])
    interactions, seen = merge_cells(rows, columns, np.array([1.0, 3.0, 4.0], np.float32),
                                     (3, 4))
    assert seen is interactions
    assert interactions.toarray().tolist() == [[0, 0, 3, 0], [4, 0, 0, 0], [0, 0, 0, 0]]
