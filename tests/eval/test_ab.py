"""A/B analysis: the z-test and sample size against hand-computed values, and on real rows."""

from __future__ import annotations

import datetime as dt
import math

import pytest

from services.eval.ab import ab_status, minimum_sample, z_test
from shared.db import Feedback, Impression, session_scope


def test_z_test_by_hand() -> None:
    # 100/1000 against 130/1000: pooled 0.115, se = sqrt(.115*.885*(2/1000)) = 0.014267
    z, p = z_test(100, 1000, 130, 1000)
    assert z == pytest.approx(0.03 / math.sqrt(0.115 * 0.885 * 0.002), rel=1e-9)
    assert p == pytest.approx(0.0355, abs=5e-4)
    assert z_test(0, 0, 5, 10) == (0.0, 1.0)


def test_minimum_sample_matches_the_textbook_formula() -> None:
    # p1 = 0.10, p2 = 0.11, alpha 0.05, power 0.8: about 14,750 per arm.
    assert 14_600 <= minimum_sample(0.10, 0.10, 0.05, 0.8) <= 14_900
    assert minimum_sample(0.10, 0.5, 0.05, 0.8) < minimum_sample(0.10, 0.1, 0.05, 0.8)


def test_status_from_impressions_and_feedback(pg_url: str, use_settings) -> None:  # type: ignore[no-untyped-def]
    use_settings(DATABASE_URL=pg_url, ONLINE_K="1", AB_MIN_EFFECT="1.0")
    now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    with session_scope() as session:
        for n in range(400):
            variant = "champion" if n % 2 else "challenger"
            session.add(Impression(request_id=f"r{n}", user_id=n, movie_id=7, position=1,
                                   model_version=1 if variant == "champion" else 2,
                                   variant=variant, source="model", served_at=now))
            clicked = (n % 10 == 1) if variant == "champion" else (n % 4 == 0)
            if clicked:
                session.add(Feedback(event_id=f"f{n}", user_id=n, movie_id=7, type="click",
                                     request_id=f"r{n}", occurred_at=now))
    status = ab_status(since=now - dt.timedelta(minutes=1))
    champion, challenger = status["arms"]["champion"], status["arms"]["challenger"]
    assert (champion["impressions"], champion["clicks"]) == (200, 40)
    assert (challenger["impressions"], challenger["clicks"]) == (200, 100)
    assert status["p_value"] < 0.05 and status["enough_sample"]
    assert status["winner"] == "challenger"
