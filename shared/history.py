"""A user's history as serve and the batch lists read it: ratings and feedback events merged
into the snapshot's train row, and what the merged row leaves out of a list.

As in a snapshot (services/transform/loading.py): a rating counts with its value, a click
or watch as FEEDBACK_IMPLICIT_RATING stars, and a view is no interaction, only "seen".
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from shared.features import IdIndex

ENGAGED = ("click", "watch")
History = dict[int, float | None]  # movie id -> interaction value, None: seen only


def event_value(kind: str, value: float | None, implicit_rating: float) -> float | None:
    """The interaction value an event adds to a history row; None when it adds none."""
    if kind == "rating" and value is not None:
        return float(value)
    return implicit_rating if kind in ENGAGED else None


def merge(history: History, movie_id: int, value: float | None) -> None:
    """Later events win, but a view never erases an earlier interaction."""
    if value is not None or movie_id not in history:
        history[movie_id] = value


def merged_row(train: sp.csr_matrix, position: int, items: IdIndex, extra: History | None
               ) -> dict[int, float | None]:
    """Item index -> value of a user's train row (`position`, -1: none) with `extra`, the
    history since, merged in; None marks an item only seen. Movies outside `items` drop."""
    values: dict[int, float | None] = {}
    if position >= 0:  # the snapshot's train row, read straight from the CSR arrays
        start, end = train.indptr[position], train.indptr[position + 1]
        values = dict(zip(train.indices[start:end].tolist(), train.data[start:end].tolist(),
                          strict=True))
    if extra:
        movies = np.fromiter(extra, dtype=np.int64, count=len(extra))
        columns = items.to_index(movies, allow_unknown=True)
        for column, movie in zip(columns.tolist(), movies.tolist(), strict=True):
            if column >= 0:
                merge(values, column, extra[movie])
    return values


def event_value_sql(implicit_rating: float) -> str:
    """`event_value` as an SQL expression over a feedback row's `type` and `value`: NULL
    where the event adds no interaction (a view, a rating without a value)."""
    engaged = ", ".join(f"'{kind}'" for kind in ENGAGED)
    return (f"CASE WHEN type = 'rating' THEN value WHEN type IN ({engaged}) "
            f"THEN {float(implicit_rating)} END")


def _cells_csr(cells: np.ndarray, data: np.ndarray, shape: tuple[int, int]) -> sp.csr_matrix:
    """A CSR matrix from ascending flat cell indices (row * columns + column)."""
    rows = cells // shape[1]
    indptr = np.searchsorted(rows, np.arange(shape[0] + 1, dtype=np.int64))
    return sp.csr_matrix((data, (cells % shape[1]).astype(np.int32), indptr), shape=shape)


def merge_cells(rows: np.ndarray, columns: np.ndarray, values: np.ndarray,
                shape: tuple[int, int]) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    """`merge` for many users at once: (interactions, seen) of the cells (`rows`, `columns`)
    whose events come oldest first, `values` NaN where an event adds no interaction. A
    cell keeps its last event's value that is not NaN; a cell with only NaN events is seen
    but no interaction. `seen` is `interactions` itself when no cell is only seen."""
    keys = rows.astype(np.int64) * shape[1] + columns
    valued = ~np.isnan(values)
    # The first occurrence in the reversed events is each cell's last one.
    cells, last = np.unique(keys[valued][::-1], return_index=True)
    interactions = _cells_csr(cells, values[valued][::-1][last].astype(np.float32), shape)
    if valued.all():
        return interactions, interactions
    only_seen = np.unique(keys[~valued])
    # `cells` is ascending: a viewed cell that also has a value is where searchsorted finds it.
    found = np.minimum(np.searchsorted(cells, only_seen), max(cells.size - 1, 0))
    if cells.size:
        only_seen = only_seen[cells[found] != only_seen]
    if not only_seen.size:
        return interactions, interactions
    every = np.union1d(cells, only_seen)
    return interactions, _cells_csr(every, np.ones(every.size, dtype=bool), shape)
