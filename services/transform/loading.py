"""Reading ratings out of the database, streaming, into numpy arrays (on Postgres by a
binary COPY parsed by numpy: shared/db/copy.py)."""

from __future__ import annotations

import numpy as np
import pandas as pd
from sqlalchemy import Engine, text

from shared.db.copy import read_columns

COLUMNS = ("user_id", "movie_id", "rating", "rated_at")
_RATINGS = "SELECT user_id, movie_id, rating, rated_at FROM rating"
# Feedback joins the interactions: a rating with its value, a click or watch as a positive
# interaction worth FEEDBACK_IMPLICIT_RATING stars; views say nothing about liking.
_FEEDBACK = {
    "postgresql": "SELECT user_id, movie_id, CAST(coalesce(CASE WHEN type = 'rating' THEN value "
                  "END, {implicit}) AS REAL), CAST(extract(epoch FROM occurred_at) AS BIGINT) "
                  "FROM feedback WHERE type IN ('rating', 'click', 'watch')",
    "sqlite": "SELECT user_id, movie_id, coalesce(CASE WHEN type = 'rating' THEN value END, "
              "{implicit}), CAST(strftime('%s', occurred_at) AS INTEGER) FROM feedback "
              "WHERE type IN ('rating', 'click', 'watch')",
}


def interactions_query(dialect: str, implicit_rating: float) -> str:
    """Ratings and the feedback that counts as an interaction, as one row set."""
    feedback = _FEEDBACK["postgresql" if dialect == "postgresql" else "sqlite"]
    return f"{_RATINGS} UNION ALL {feedback.format(implicit=float(implicit_rating))}"


def load_ratings(engine: Engine, implicit_rating: float = 4.0) -> pd.DataFrame:
    """Every rating, and every engaged feedback event, as user_id, movie_id, rating, rated_at."""
    query = interactions_query(engine.dialect.name, implicit_rating)
    columns = read_columns(engine, query)
    return pd.DataFrame(dict(zip(COLUMNS, columns.values(), strict=True)), copy=False)


def load_movie_genres(engine: Engine, movie_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(genre names, items x genres 0/1 matrix) for the given movie ids, in their order."""
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT id, genres FROM movie")).all()
    genres_of = {movie_id: [g for g in genres.split("|") if g] for movie_id, genres in rows}
    names = sorted({g for gs in genres_of.values() for g in gs})
    column = {name: i for i, name in enumerate(names)}
    matrix = np.zeros((len(movie_ids), len(names)), dtype=np.uint8)
    for row, movie_id in enumerate(movie_ids.tolist()):
        for genre in genres_of.get(movie_id, []):
            matrix[row, column[genre]] = 1
    return np.array(names, dtype=np.str_), matrix
