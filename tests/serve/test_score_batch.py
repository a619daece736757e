"""Batched scoring of concurrent misses, the history read on the event loop, and the
frozen heap: each gives the answers the one-at-a-time path gives."""

from __future__ import annotations

import asyncio
import datetime as dt
import gc

import numpy as np
import pytest
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY
from sqlalchemy import insert

from services.serve.history import HistoryReader, serve_engine
from services.serve.recommend import ScoreBatch
from shared.db import Feedback
from shared.features import Weighting
from shared.recommenders import FactorModel
from shared.settings import get_settings

N_ITEMS = 20_000  # above ScoreBatch's gather_from_items: a product worth waiting for


def factor_model(n_items: int = N_ITEMS, users: int = 50, factors: int = 16) -> FactorModel:
    rng = np.random.default_rng(7)
    return FactorModel("als", Weighting("none"), rng.standard_normal((users, factors)),
                       rng.standard_normal((n_items, factors)), 0.1, 1.0)


def batches_observed() -> float:
    return REGISTRY.get_sample_value("recsys_serve_score_batch_users_count") or 0.0


async def miss(batch: ScoreBatch, model: FactorModel, user: int, reads: asyncio.Event,
               log: list[int]) -> np.ndarray:
    """A miss as serve runs one: a ticket, a read to wait for, then its scores."""
    with batch.ticket() as ticket:
        await reads.wait()
        log.append(user)
        return await batch.score(ticket, model, user)


def test_concurrent_misses_share_one_product_and_get_their_own_rows() -> None:
    model = factor_model()
    expected = {u: model.item_factors @ model.user_factors[u] for u in (3, 9, 27, 41)}

    async def run() -> list[np.ndarray]:
        batch = ScoreBatch(max_wait=3600.0)  # never by the timer: by everyone joining
        reads, log = asyncio.Event(), []
        tasks = [asyncio.create_task(miss(batch, model, u, reads, log)) for u in expected]
        await asyncio.sleep(0)
        reads.set()
        return await asyncio.wait_for(asyncio.gather(*tasks), 60)

    before = batches_observed()
    rows = asyncio.run(run())
    assert batches_observed() == before + 1  # four users, one product
    for (user, want), got in zip(expected.items(), rows, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        assert got.flags.c_contiguous and got.shape == (N_ITEMS,)
        np.testing.assert_allclose(model.score_user(user, np.empty(0), np.empty(0)), want,
                                   rtol=1e-5, atol=1e-5)


def test_a_batch_waits_for_misses_still_reading_and_not_for_one_that_leaves() -> None:
    model = factor_model()

    async def run() -> tuple[list[int], int]:
        batch = ScoreBatch(max_wait=3600.0, gather_from=2)
        fast, slow, log = asyncio.Event(), asyncio.Event(), []
        first = [asyncio.create_task(miss(batch, model, u, fast, log)) for u in (1, 2)]
        late = asyncio.create_task(miss(batch, model, 3, slow, log))

        async def leaves() -> None:  # goes another way (say, a fold-in) without joining
            with batch.ticket():
                await slow.wait()

        gone = asyncio.create_task(leaves())
        await asyncio.sleep(0)  # every miss has its ticket
        fast.set()
        for _ in range(5):
            await asyncio.sleep(0)
        waited = sum(task.done() for task in first)  # still waiting for 3 and the leaver
        slow.set()
        await asyncio.wait_for(asyncio.gather(*first, late, gone), 60)
        return log, waited

    before = batches_observed()
    log, waited = asyncio.run(run())
    assert waited == 0 and sorted(log) == [1, 2, 3]
    assert batches_observed() == before + 1


def test_a_lone_miss_and_a_small_catalogue_never_wait() -> None:
    """With a wait of an hour, either would hang here (wait_for fails it instead)."""

    async def run(model: FactorModel, users: list[int]) -> list[np.ndarray]:
        batch = ScoreBatch(max_wait=3600.0, gather_from=4)
        hold, ready, log = asyncio.Event(), asyncio.Event(), []
        ready.set()
        held = [asyncio.create_task(miss(batch, model, u, hold, log)) for u in (40, 41)]
        done = [asyncio.create_task(miss(batch, model, u, ready, log)) for u in users]
        rows = await asyncio.wait_for(asyncio.gather(*done), 60)
        hold.set()
        await asyncio.wait_for(asyncio.gather(*held), 60)
        return rows

    # Three misses in flight, under gather_from: the one that has read is scored at once.
    large = factor_model()
    (row,) = asyncio.run(run(large, [5]))
    np.testing.assert_allclose(row, large.item_factors @ large.user_factors[5],
                               rtol=1e-5, atol=1e-5)
    # Four in flight, but a 500-item product costs less than any wait.
    small = factor_model(n_items=500)
    rows = asyncio.run(run(small, [5, 6]))
    for user, got in zip((5, 6), rows, strict=True):
        np.testing.assert_allclose(got, small.item_factors @ small.user_factors[user],
                                   rtol=1e-5, atol=1e-5)


def test_a_failed_product_fails_every_request_in_it() -> None:
    model = factor_model()

    async def run() -> list[BaseException | np.ndarray]:
        batch = ScoreBatch(max_wait=3600.0)
        reads, log = asyncio.Event(), []
        tasks = [asyncio.create_task(miss(batch, model, u, reads, log))
                 for u in (1, 2, 10_000)]  # no user 10,000: the product raises
        await asyncio.sleep(0)
        reads.set()
        return await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 60)

    outcomes = asyncio.run(run())
    assert all(isinstance(outcome, IndexError) for outcome in outcomes)


def test_the_history_read_on_the_event_loop_equals_the_blocking_read(serve_env: dict[str, str]
                                                                      ) -> None:
    reader = HistoryReader(serve_engine(get_settings()), implicit_rating=4.0)
    rated, _ = reader.interactions(7)
    rated_movie = next(iter(rated))
    clicked, viewed = [m for m in range(1, 1683) if m not in rated][:2]
    at = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    with reader.engine.begin() as conn:  # feedback after the ratings: later events win
        conn.execute(insert(Feedback), [
            {"event_id": "h1", "user_id": 7, "movie_id": clicked, "type": "click",
             "value": None, "occurred_at": at},
            {"event_id": "h2", "user_id": 7, "movie_id": viewed, "type": "view",
             "value": None, "occurred_at": at},
            {"event_id": "h3", "user_id": 7, "movie_id": rated_movie, "type": "rating",
             "value": 2.5, "occurred_at": at}])

    async def read(users: list[int]) -> list[tuple[dict, bool]]:
        try:
            return [await reader.ainteractions(user) for user in users]
        finally:
            await reader.aclose()

    users = [7, 1, 500, 99_999]
    blocking = [reader.interactions(user) for user in users]
    awaited = asyncio.run(read(users))
    assert awaited == blocking
    history, answered = awaited[0]
    assert answered and len(history) == len(rated) + 2
    assert history[clicked] == 4.0 and history[viewed] is None and history[rated_movie] == 2.5
    assert awaited[3] == ({}, True)  # a user with no history
    reader.engine.dispose()


def test_serve_freezes_its_heap_after_loading(client: TestClient) -> None:
    assert client.get("/readyz").json()["ready"]
    assert gc.get_freeze_count() > 0


@pytest.fixture(autouse=True)
def _thaw() -> None:
    yield
    gc.unfreeze()  # the test process goes back to collecting as usual
