"""Recommendation lists, similar items and the popular list, cached and logged.

A cache hit costs one cache GET (awaited on the event loop) and a string join: the cached
value is the response body without its request id, behind one header line (items,
source) for the impression log. A miss (in the threadpool) reads the user's history,
scores every item once (one matrix-vector product, or a fold-in solve for a user the
model has not seen), masks seen, excluded and off-genre items, and takes the top by
argpartition.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass

import numpy as np
from starlette.concurrency import run_in_threadpool

from services.serve.cache import Cache, list_key
from services.serve.history import History, HistoryReader, merge
from services.serve.impressions import ImpressionLogger
from services.serve.metrics import SERVED, child
from services.serve.models import LoadedModel, ModelStore, ServingState


class NoModel(LookupError):
    """No model is loaded yet, so nothing can be recommended."""


class UnknownItem(LookupError):
    """The movie is not in the model."""


@dataclass(frozen=True)
class ListRequest:
    """The parameters of GET /recommendations/{user_id}."""

    user_id: int
    k: int
    offset: int
    exclude: tuple[int, ...]
    genres: tuple[str, ...]

    def cache_field(self, model: LoadedModel, variant: str) -> str:
        exclude = ",".join(map(str, sorted(set(self.exclude))))
        genres = ",".join(model.canonical_genres(self.genres))
        params = f"x{exclude}:g{genres}"
        if len(params) > 120:  # long exclude lists: a digest keeps keys short
            params = hashlib.sha1(params.encode()).hexdigest()
        return f"v{model.version}:{variant}:k{self.k}:o{self.offset}:{params}"


@dataclass(frozen=True)
class Pending:
    """A list being answered: what `begin` decided, for `hit` or `miss` to finish."""

    request: ListRequest
    model: LoadedModel
    variant: str
    key: str
    request_id: str


def rank(scores: np.ndarray, banned: np.ndarray, mask: np.ndarray | None, n: int
         ) -> tuple[np.ndarray, np.ndarray]:
    """Best `n` item indices by score, ties by lower index, never a banned or masked one."""
    scores = np.array(scores, dtype=np.float32).reshape(-1)  # a copy: it gets masked
    scores[np.isnan(scores)] = -np.inf
    if banned.size:
        scores[banned] = -np.inf
    if mask is not None:
        scores[~mask] = -np.inf
    n = min(n, scores.size)
    if n <= 0:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float32)
    threshold = scores[np.argpartition(-scores, n - 1)[:n]].min()
    # Every item tied at the boundary takes part, so the order is total and page 2 with
    # offset continues page 1 exactly.
    candidates = np.flatnonzero(scores >= threshold if np.isfinite(threshold)
                                else np.isfinite(scores))
    order = np.lexsort((candidates, -scores[candidates]))[:n]
    best = candidates[order]
    return best, scores[best]


def items_json(model: LoadedModel, indices: np.ndarray, scores: np.ndarray) -> bytes:
    parts = [model.item_json[i] + repr(round(s, 6)).encode() + b"}"
             for i, s in zip(indices.tolist(), scores.tolist(), strict=True)]
    return b"[" + b",".join(parts) + b"]"


def with_request_id(body_open: bytes, request_id: str) -> bytes:
    return body_open + b',"request_id":"' + request_id.encode() + b'"}'


class RecommendationService:
    """Answers the read endpoints from the store's current state."""

    def __init__(self, store: ModelStore, cache: Cache, history: HistoryReader,
                 impressions: ImpressionLogger, prefix: str) -> None:
        self.store = store
        self.cache = cache
        self.history = history
        self.impressions = impressions
        self.prefix = prefix

    def _state(self) -> ServingState:
        state = self.store.state
        if not state.models:
            raise NoModel(self.store.last_error or "no model is loaded yet")
        return state

    def begin(self, request: ListRequest) -> Pending:
        """The model, variant, cache key and request id of a list (no I/O); NoModel when
        nothing is loaded, UnknownGenre naming a bad genre."""
        chosen = self._state().choose(request.user_id)
        if chosen is None:
            raise NoModel(self.store.last_error or "no model is loaded yet")
        variant, model = chosen
        key = list_key(self.prefix, request.user_id, request.cache_field(model, variant))
        return Pending(request, model, variant, key, uuid.uuid4().hex)

    def hit(self, pending: Pending, cached: bytes) -> bytes:
        """The response body from a cached entry (logged as an impression)."""
        head, _, body_open = cached.partition(b"\n")
        items, _, source = head.partition(b"|")
        child(SERVED, source.decode(), pending.variant).inc()
        self.impressions.log(pending.request_id, pending.request.user_id, items,
                             pending.model.version, pending.variant, source.decode())
        return with_request_id(body_open, pending.request_id)

    async def answer(self, pending: Pending) -> bytes:
        """The body of a list: a hit stays on the event loop (an awaited cache read); a
        miss reads the history and scores in the threadpool."""
        cached = await self.cache.aget(pending.key)
        if cached is not None:
            return self.hit(pending, cached)
        return await run_in_threadpool(self.miss, pending)

    def miss(self, pending: Pending) -> bytes:
        """Compute the list (blocking: history read, scoring), store it, return the body."""
        request, model, variant = pending.request, pending.model, pending.variant
        recent, epoch, cache_ok = self.cache.user_state(request.user_id)
        history, database_ok = self.history.interactions(request.user_id)
        for movie, value in recent.items():
            merge(history, movie, value)
        indices, scores, source = self._compute(model, request, history)
        ids = model.items.ids[indices]
        body_open = (b'{"user_id":%d,"items":%s,"model_version":%d,"variant":"%s",'
                     b'"source":"%s"' % (request.user_id, items_json(model, indices, scores),
                                          model.version, variant.encode(), source.encode()))
        id_list = ",".join(map(str, ids.tolist())).encode()
        if database_ok and cache_ok:  # a list missing part of the history is not kept
            self.cache.put(pending.key, id_list + b"|" + source.encode() + b"\n" + body_open,
                           request.user_id, epoch)
        child(SERVED, source, variant).inc()
        self.impressions.log(pending.request_id, request.user_id, id_list, model.version,
                             variant, source)
        return with_request_id(body_open, pending.request_id)

    def _compute(self, model: LoadedModel, request: ListRequest, extra: History
                 ) -> tuple[np.ndarray, np.ndarray, str]:
        user = model.users.position(request.user_id)
        values: dict[int, float | None] = {}
        if user >= 0:  # the snapshot's train row, read straight from the CSR arrays
            start, end = model.train.indptr[user], model.train.indptr[user + 1]
            values = dict(zip(model.train.indices[start:end].tolist(),
                              model.train.data[start:end].tolist(), strict=True))
        if extra:
            movies = np.fromiter(extra, dtype=np.int64, count=len(extra))
            columns = model.items.to_index(movies, allow_unknown=True)
            for column, movie in zip(columns.tolist(), movies.tolist(), strict=True):
                if column >= 0:
                    merge(values, column, extra[movie])
        banned = np.fromiter(values, dtype=np.int64, count=len(values))  # every seen item
        if request.exclude:
            excluded = model.items.to_index(np.asarray(request.exclude, dtype=np.int64),
                                            allow_unknown=True)
            banned = np.concatenate([banned, excluded[excluded >= 0]])
        interactions = {c: v for c, v in values.items() if v is not None}
        if user < 0 and not interactions:
            source, scores = "popular", model.popularity
        else:
            source = "model" if user >= 0 else "fold-in"
            # The whole score row: genre and exclusion masks apply before ranking.
            scores = model.recommender.score_user(
                user, np.fromiter(interactions, dtype=np.int64, count=len(interactions)),
                np.fromiter(interactions.values(), dtype=np.float32, count=len(interactions)))
        indices, best = rank(scores, banned, model.genre_mask(request.genres),
                             request.offset + request.k)
        return indices[request.offset:], best[request.offset:], source

    def similar(self, movie_id: int, k: int) -> bytes:
        """Body of the movies most similar to `movie_id` in the primary model."""
        model = self._state().primary
        assert model is not None
        column = model.items.position(movie_id)
        if column < 0:
            raise UnknownItem(f"movie {movie_id} is not in model version {model.version}")
        key = f"{self.prefix}:sim:v{model.version}:{movie_id}:k{k}"
        cached = self.cache.get(key)
        if cached is not None:
            return cached
        indices, scores = model.recommender.similar_items(column, k)
        keep = (indices >= 0) & np.isfinite(scores)
        body = b'{"movie_id":%d,"items":%s,"model_version":%d}' % (
            movie_id, items_json(model, indices[keep], scores[keep]), model.version)
        self.cache.put(key, body)
        return body

    def popular(self, k: int, offset: int, genres: tuple[str, ...]) -> bytes:
        """Body of the popular list (train interactions), optionally genre-filtered."""
        model = self._state().primary
        assert model is not None
        names = model.canonical_genres(genres)
        key = f"{self.prefix}:pop:v{model.version}:k{k}:o{offset}:g{','.join(names)}"
        cached = self.cache.get(key)
        if cached is not None:
            return cached
        indices, scores = rank(model.popularity, np.empty(0, dtype=np.int64),
                               model.genre_mask(genres), offset + k)
        genre_list = json.dumps(list(names), ensure_ascii=False).encode()
        body = b'{"items":%s,"genres":%s,"model_version":%d}' % (
            items_json(model, indices[offset:], scores[offset:]), genre_list, model.version)
        self.cache.put(key, body)
        return body
