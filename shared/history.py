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
