"""Online figures from impressions and feedback in the real Postgres, checked by hand."""

from __future__ import annotations

import datetime as dt

import pytest
from sqlalchemy import select

from services.eval.online import compute_online, window_figures
from shared.db import Feedback, Impression, OnlineMetric, session_scope
from shared.events import get_event_bus

T0 = dt.datetime(2026, 1, 1, 12, 0, tzinfo=dt.UTC)


def served(request: str, user: int, items: list[int], version: int | None, variant: str,
           at: dt.datetime) -> list[Impression]:
    return [Impression(request_id=request, user_id=user, movie_id=m, position=p,
                       model_version=version, variant=variant, source="model", served_at=at)
            for p, m in enumerate(items, start=1)]


def event(n: int, user: int, movie: int, kind: str, at: dt.datetime, request: str | None = None,
          value: float | None = None) -> Feedback:
    return Feedback(event_id=f"e{n}", user_id=user, movie_id=movie, type=kind, value=value,
                    request_id=request, occurred_at=at)


@pytest.fixture
def data(pg_url: str, use_settings) -> str:  # type: ignore[no-untyped-def]
    use_settings(DATABASE_URL=pg_url, ONLINE_K="3", ONLINE_MATCH_SECONDS="600")
    with session_scope() as session:
        session.add_all(served("r1", 1, [10, 11, 12, 13], 5, "champion", T0))
        session.add_all(served("r2", 2, [10, 14, 15], 5, "champion", T0))
        session.add_all(served("r3", 3, [20, 21, 22], 6, "challenger", T0))
        session.add_all(served("old", 4, [10, 11, 12], 5, "champion", T0 - dt.timedelta(days=1)))
        session.add_all([
            event(1, 1, 11, "click", T0 + dt.timedelta(seconds=5), "r1"),     # r1 pos 2
            event(2, 1, 11, "rating", T0 + dt.timedelta(seconds=9), "r1", 4.0),
            event(3, 1, 13, "click", T0 + dt.timedelta(seconds=9), "r1"),     # pos 4 > k
            event(4, 2, 15, "watch", T0 + dt.timedelta(seconds=60)),          # no request id
            event(5, 2, 14, "click", T0 + dt.timedelta(hours=2)),             # too late
            event(6, 3, 22, "view", T0 + dt.timedelta(seconds=5), "r3"),      # not engagement
            event(7, 3, 21, "rating", T0 + dt.timedelta(seconds=5), "r3", 2.0),
        ])
    return pg_url


def test_window_figures_by_hand(data: str) -> None:
    figures = window_figures(T0 - dt.timedelta(minutes=1), T0 + dt.timedelta(hours=1), 3, 600)
    champion, challenger = figures[1], figures[0]
    assert (champion["variant"], champion["model_version"]) == ("champion", 5)
    assert (champion["impressions"], champion["lists"], champion["clicks"]) == (6, 2, 2)
    assert champion["ctr"] == pytest.approx(2 / 6)
    assert champion["hit_rate"] == 1.0
    assert champion["mean_click_position"] == pytest.approx((2 + 3) / 2)
    assert champion["feedback"] == 3 and champion["satisfaction"] == pytest.approx(4.0)
    assert (challenger["clicks"], challenger["feedback"]) == (1, 2)
    assert challenger["ctr"] == pytest.approx(1 / 3) and challenger["satisfaction"] == 2.0


def test_compute_stores_and_publishes(data: str) -> None:
    seen = []
    get_event_bus().subscribe("metrics.online", seen.append)
    end = T0 + dt.timedelta(minutes=30)
    first = compute_online(end=end, window_seconds=3600)
    compute_online(end=end, window_seconds=3600)  # recomputing replaces, never duplicates
    with session_scope() as session:
        rows = session.scalars(select(OnlineMetric).order_by(OnlineMetric.variant)).all()
    assert [(r.variant, r.model_version, r.clicks) for r in rows] == [
        ("challenger", 6, 1), ("champion", 5, 2)]
    assert seen[-1].payload["figures"] == first["figures"]
