"""The lists a version would serve a user, computed the way serve computes them.

The dashboard loads the champion and challenger itself (serve's own loader, checksums
verified) instead of asking serve: a list it shows must not count as an impression, and
the challenger's list is wanted whatever share of traffic it has. Scoring, the seen-item
mask and the source (model, fold-in, popular) are serve's code.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

import numpy as np
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from services.serve.models import LoadedModel, load_model
from services.serve.recommend import ListRequest, RecommendationService, rank
from shared.db import ModelVersion
from shared.history import History, event_value, merge
from shared.settings import Settings

KEEP = 3  # loaded versions kept (champion, challenger and one just replaced)


class ModelCache:
    """Loaded versions by (version, sha256), the least recently used dropped first."""

    def __init__(self, settings: Settings, engine: Engine) -> None:
        self.settings = settings
        self.engine = engine
        self._models: OrderedDict[tuple[int, str], LoadedModel] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, version: int) -> LoadedModel | None:
        """The version loaded (None when it is not registered); ModelLoadError if damaged."""
        with self._lock, Session(self.engine) as session:
            row = session.scalars(select(ModelVersion).where(
                ModelVersion.name == "recsys", ModelVersion.version == version)).first()
            if row is None:
                return None
            key = (row.version, row.sha256)
            if key not in self._models:
                self._models[key] = load_model(session, row, self.settings)
                while len(self._models) > KEEP:
                    self._models.popitem(last=False)
            self._models.move_to_end(key)
            return self._models[key]


def history_of(ratings: list[dict[str, Any]], feedback: list[dict[str, Any]],
               implicit_rating: float) -> History:
    """Ratings then feedback, oldest first, merged as serve merges them."""
    history: History = {}
    for row in sorted(ratings, key=lambda r: r["at"]):
        merge(history, row["movie_id"], float(row["rating"]))
    for row in sorted(feedback, key=lambda r: r["at"]):
        merge(history, row["movie_id"], event_value(row["type"], row["value"], implicit_rating))
    return history


def serve_list(model: LoadedModel, user_id: int, history: History, k: int
               ) -> dict[str, Any]:
    """The top k this model serves the user now: items (movie id, score) and the source."""
    plan = RecommendationService._plan(model, ListRequest(user_id, k, 0, (), ()), history)
    if plan.source == "popular":
        scores = model.popularity
    elif plan.user >= 0 and model.recommender.scores_trained_alone:
        scores = model.recommender.score_trained(np.asarray([plan.user], dtype=np.int64))[0]
    else:
        items = np.fromiter(plan.interactions, dtype=np.int64, count=len(plan.interactions))
        values = np.fromiter(plan.interactions.values(), dtype=np.float32,
                             count=len(plan.interactions))
        scores = model.recommender.score_user(plan.user, items, values)
    indices, best = rank(scores, plan.banned, None, k)
    return {"version": model.version, "algorithm": model.algorithm, "source": plan.source,
            "items": [(int(model.items.ids[i]), float(s))
                      for i, s in zip(indices.tolist(), best.tolist(), strict=True)]}


def similar_movies(model: LoadedModel, movie_id: int, k: int) -> list[tuple[int, float]]:
    """The movies most like this one in the model (empty when the model lacks it)."""
    column = model.items.position(movie_id)
    if column < 0:
        return []
    indices, scores = model.recommender.similar_items(column, k)
    return [(int(model.items.ids[i]), float(s)) for i, s in zip(indices.tolist(),
                                                                scores.tolist(), strict=True)
            if i >= 0 and np.isfinite(s)]
