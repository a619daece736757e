"""Recommendation lists, similar items and the popular list, cached and logged.

A cache hit costs one cache GET (awaited on the event loop) and a string join: the cached
value is the response body without its request id, behind one header line (items,
source) for the impression log. A miss awaits the user's recent feedback (Redis) and
history (Postgres) together on the event loop, then scores every item once (one
matrix-vector product, or a fold-in solve for a user the model has not seen), masks
seen, excluded and off-genre items, and takes the top by argpartition. Everything runs
on the loop: no thread hop, and no threads contending for the interpreter while they
wait on the network.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import uuid
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from services.serve.cache import Cache, list_key
from services.serve.history import HistoryReader
from services.serve.impressions import ImpressionLogger
from services.serve.metrics import SCORE_BATCH, SERVED, child
from services.serve.models import LoadedModel, ModelStore, ServingState
from shared.history import History, merge, merged_row
from shared.recommenders import Recommender, rank_rows


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
    """Best `n` item indices by score, ties by lower index, never a banned or masked one.

    The order is total, so page 2 with offset continues page 1 exactly; the batch lists
    (services/eval/batch.py) rank with the same function, many users at once."""
    ids, best = rank_rows(np.reshape(scores, (1, -1)), n, banned, mask)
    kept = ids[0] >= 0
    return ids[0][kept], best[0][kept]


def items_json(model: LoadedModel, indices: np.ndarray, scores: np.ndarray) -> bytes:
    parts = [model.item_json[i] + repr(round(s, 6)).encode() + b"}"
             for i, s in zip(indices.tolist(), scores.tolist(), strict=True)]
    return b"[" + b",".join(parts) + b"]"


def with_request_id(body_open: bytes, request_id: str) -> bytes:
    return body_open + b',"request_id":"' + request_id.encode() + b'"}'


@dataclass(frozen=True)
class Plan:
    """What a miss scores: the user's model row (-1: unknown to the model), their
    interactions (item index -> value), every item they must not be shown, the path."""

    user: int
    interactions: dict[int, float]
    banned: np.ndarray
    source: str  # model / fold-in / popular


@dataclass
class _Gathering:
    """One event loop's batch being gathered."""

    expected: int = 0  # misses holding a ticket that have not joined a batch
    waiting: list[tuple[Recommender, int, asyncio.Future[np.ndarray]]] = field(
        default_factory=list)
    timer: asyncio.TimerHandle | None = None
    scheduled: bool = False  # the batch runs in this loop's next turn


class Ticket:
    """A miss's place in the gathering: it counts as expected from its start until it
    joins a batch or goes without one (another scoring path, a failure, a cancelled
    request)."""

    __slots__ = ("expected",)

    def __init__(self) -> None:
        self.expected = True


class ScoreBatch:
    """Score rows of trained users for concurrent misses, by one matrix product per model.

    Scoring a 60,000-item catalogue is a pass over the whole item matrix, bound by memory:
    one pass for eight users costs little more than for one (measured 0.16 ms per user
    against 0.60 ms alone). Each miss holds a ticket from before its reads, so the batch
    knows how many more are on their way: it runs as soon as all of them have joined, or
    after `max_wait` seconds when some are still reading their history, or when it holds
    `max_users`. It never waits when a wait cannot pay: fewer than `gather_from` misses
    in flight (a lone request is scored at once), or a catalogue under
    `gather_from_items` (its product costs microseconds).
    """

    def __init__(self, max_wait: float = 0.002, max_users: int = 64, gather_from: int = 4,
                 gather_from_items: int = 10_000) -> None:
        self.max_wait = max_wait
        self.max_users = max_users
        self.gather_from = gather_from
        self.gather_from_items = gather_from_items
        self._loops: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Gathering] = (
            weakref.WeakKeyDictionary())

    def _gathering(self) -> tuple[asyncio.AbstractEventLoop, _Gathering]:
        loop = asyncio.get_running_loop()
        gathering = self._loops.get(loop)
        if gathering is None:
            gathering = self._loops[loop] = _Gathering()
        return loop, gathering

    @contextmanager
    def ticket(self) -> Iterator[Ticket]:
        """Held for a whole miss, from before its reads until it has its scores."""
        loop, gathering = self._gathering()
        ticket = Ticket()
        gathering.expected += 1
        try:
            yield ticket
        finally:
            if ticket.expected:  # left without joining: the batch stops waiting for it
                ticket.expected = False
                gathering.expected -= 1
                self._check(loop, gathering)

    def score(self, ticket: Ticket, recommender: Recommender, user: int
              ) -> asyncio.Future[np.ndarray]:
        """The trained user's score row, once the batch they join has run."""
        loop, gathering = self._gathering()
        future: asyncio.Future[np.ndarray] = loop.create_future()
        gathering.waiting.append((recommender, user, future))
        if ticket.expected:
            ticket.expected = False
            gathering.expected -= 1
        self._check(loop, gathering)
        return future

    def _check(self, loop: asyncio.AbstractEventLoop, gathering: _Gathering) -> None:
        """Run the batch in the next turn, or wait for the misses still on their way."""
        waiting = gathering.waiting
        if not waiting or gathering.scheduled:
            return
        if (gathering.expected <= 0 or len(waiting) >= self.max_users
                or gathering.expected + len(waiting) < self.gather_from
                or max(r.n_items for r, _, _ in waiting) < self.gather_from_items):
            if gathering.timer is not None:
                gathering.timer.cancel()
                gathering.timer = None
            gathering.scheduled = True
            loop.call_soon(self._run, gathering)
        elif gathering.timer is None:
            gathering.timer = loop.call_later(self.max_wait, self._run, gathering)

    @staticmethod
    def _run(gathering: _Gathering) -> None:
        if gathering.timer is not None:
            gathering.timer.cancel()
        waiting, gathering.waiting = gathering.waiting, []
        gathering.timer, gathering.scheduled = None, False
        groups: dict[int, tuple[Recommender, list[tuple[int, asyncio.Future[np.ndarray]]]]] = {}
        for recommender, user, future in waiting:
            if not future.done():  # a cancelled request took itself out
                groups.setdefault(id(recommender), (recommender, []))[1].append((user, future))
        for recommender, members in groups.values():
            SCORE_BATCH.observe(len(members))
            try:
                rows = recommender.score_trained(
                    np.fromiter((user for user, _ in members), dtype=np.int64,
                                count=len(members)))
            except Exception as error:  # each waiting request fails as it would alone
                for _, future in members:
                    future.set_exception(error)
                continue
            for row, (_, future) in zip(rows, members, strict=True):
                future.set_result(row)


class RecommendationService:
    """Answers the read endpoints from the store's current state."""

    def __init__(self, store: ModelStore, cache: Cache, history: HistoryReader,
                 impressions: ImpressionLogger, prefix: str) -> None:
        self.store = store
        self.cache = cache
        self.history = history
        self.impressions = impressions
        self.prefix = prefix
        self.batch = ScoreBatch()

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
        """The body of a list, all on the event loop: a hit is one awaited cache read; a
        miss awaits the user's cache state and history (together), then scores."""
        cached = await self.cache.aget(pending.key)
        if cached is not None:
            return self.hit(pending, cached)
        return await self.miss(pending)

    async def miss(self, pending: Pending) -> bytes:
        """Compute the list (history read, scoring), store it, return the body."""
        user_id = pending.request.user_id
        with self.batch.ticket() as ticket:
            (recent, epoch, cache_ok), (history, database_ok) = await asyncio.gather(
                self.cache.auser_state(user_id), self.history.ainteractions(user_id))
            for movie, value in recent.items():
                merge(history, movie, value)
            plan = self._plan(pending.model, pending.request, history)
            scores = await self._scores(pending.model, plan, ticket)
        body_open, entry = self._list(pending, plan, scores)
        if database_ok and cache_ok:  # a list missing part of the history is not kept
            await self.cache.aput(pending.key, entry, user_id, epoch)
        return with_request_id(body_open, pending.request_id)

    def _list(self, pending: Pending, plan: Plan, scores: np.ndarray) -> tuple[bytes, bytes]:
        """Rank (CPU only): the body without its request id, and the cache entry; the list
        is logged as an impression."""
        request, model, variant, source = (pending.request, pending.model, pending.variant,
                                           plan.source)
        indices, best = rank(scores, plan.banned, model.genre_mask(request.genres),
                             request.offset + request.k)
        indices, best = indices[request.offset:], best[request.offset:]
        ids = model.items.ids[indices]
        body_open = (b'{"user_id":%d,"items":%s,"model_version":%d,"variant":"%s",'
                     b'"source":"%s"' % (request.user_id, items_json(model, indices, best),
                                          model.version, variant.encode(), source.encode()))
        id_list = ",".join(map(str, ids.tolist())).encode()
        child(SERVED, source, variant).inc()
        self.impressions.log(pending.request_id, request.user_id, id_list, model.version,
                             variant, source)
        return body_open, id_list + b"|" + source.encode() + b"\n" + body_open

    async def _scores(self, model: LoadedModel, plan: Plan, ticket: Ticket) -> np.ndarray:
        """Every item's score for the plan's user: the popular list, a trained user's row
        (in one product with the concurrent misses, where the model scores from itself alone),
        or from the user's interactions (fold-in, item-based models)."""
        if plan.source == "popular":
            return model.popularity
        recommender = model.recommender
        if plan.user >= 0 and recommender.scores_trained_alone:
            return await self.batch.score(ticket, recommender, plan.user)
        items = np.fromiter(plan.interactions, dtype=np.int64, count=len(plan.interactions))
        values = np.fromiter(plan.interactions.values(), dtype=np.float32,
                             count=len(plan.interactions))
        return recommender.score_user(plan.user, items, values)

    @staticmethod
    def _plan(model: LoadedModel, request: ListRequest, extra: History) -> Plan:
        """The user's row, interactions (snapshot train row merged with `extra`, the
        history since), banned items and the path that answers them."""
        user = model.users.position(request.user_id)
        values = merged_row(model.train, user, model.items, extra)
        banned = np.fromiter(values, dtype=np.int64, count=len(values))  # every seen item
        if request.exclude:
            excluded = model.items.to_index(np.asarray(request.exclude, dtype=np.int64),
                                            allow_unknown=True)
            banned = np.concatenate([banned, excluded[excluded >= 0]])
        interactions = {c: v for c, v in values.items() if v is not None}
        source = ("model" if user >= 0 else "fold-in" if interactions else "popular")
        return Plan(user, interactions, banned, source)

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
