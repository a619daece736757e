"""A/B analysis of champion against challenger on online CTR: a two-proportion z-test.

Figures come from the served impressions and the feedback that answers them since the
challenger got its alias (the same join as the online windows). The result says whether
each arm has the sample the test needs to see the effect, and which arm wins, if any.
"""

from __future__ import annotations

import datetime as dt
import math
from statistics import NormalDist
from typing import Any

from sqlalchemy import func, select

from services.eval.online import window_figures
from shared.celery_app import app
from shared.db import AliasChange, ModelAlias, session_scope
from shared.settings import get_settings

MODEL_NAME = "recsys"


def z_test(clicks_a: int, n_a: int, clicks_b: int, n_b: int) -> tuple[float, float]:
    """(z, two-sided p) for H0: both arms have the same click-through rate."""
    if n_a == 0 or n_b == 0:
        return 0.0, 1.0
    pooled = (clicks_a + clicks_b) / (n_a + n_b)
    spread = math.sqrt(pooled * (1 - pooled) * (1 / n_a + 1 / n_b))
    if spread == 0:
        return 0.0, 1.0
    z = (clicks_b / n_b - clicks_a / n_a) / spread
    return z, math.erfc(abs(z) / math.sqrt(2))


def minimum_sample(p_a: float, relative_effect: float, alpha: float, power: float) -> int:
    """Impressions per arm to detect a relative CTR change of `relative_effect` from `p_a`."""
    p_b = min(max(p_a * (1 + relative_effect), 1e-9), 1 - 1e-9)
    p_a = min(max(p_a, 1e-9), 1 - 1e-9)
    if p_a == p_b:
        return 0
    normal = NormalDist()
    z_alpha, z_beta = normal.inv_cdf(1 - alpha / 2), normal.inv_cdf(power)
    mean = (p_a + p_b) / 2
    top = (z_alpha * math.sqrt(2 * mean * (1 - mean))
           + z_beta * math.sqrt(p_a * (1 - p_a) + p_b * (1 - p_b)))
    return math.ceil(top ** 2 / (p_a - p_b) ** 2)


def challenger_since() -> dt.datetime | None:
    with session_scope() as session:
        if session.get(ModelAlias, (MODEL_NAME, "challenger")) is None:
            return None
        return session.scalar(select(func.max(AliasChange.created_at)).where(
            AliasChange.name == MODEL_NAME, AliasChange.alias == "challenger"))


def ab_status(since: dt.datetime | None = None, until: dt.datetime | None = None
              ) -> dict[str, Any]:
    """Per-arm CTR, the z-test, the sample each arm needs, and the verdict."""
    settings = get_settings()
    until = until or dt.datetime.now(dt.UTC)
    since = since or challenger_since() or until - dt.timedelta(days=7)
    if since.tzinfo is None:
        since = since.replace(tzinfo=dt.UTC)
    figures = window_figures(since, until, settings.online_k, settings.online_match_seconds)
    arms: dict[str, dict[str, Any]] = {}
    for figure in figures:
        arm = arms.setdefault(figure["variant"], {"impressions": 0, "clicks": 0, "lists": 0,
                                                  "versions": []})
        arm["impressions"] += figure["impressions"]
        arm["clicks"] += figure["clicks"]
        arm["lists"] += figure["lists"]
        arm["versions"].append(figure["model_version"])
    for arm in arms.values():
        arm["ctr"] = arm["clicks"] / arm["impressions"] if arm["impressions"] else 0.0
    a = arms.get("champion", {"impressions": 0, "clicks": 0, "ctr": 0.0})
    b = arms.get("challenger", {"impressions": 0, "clicks": 0, "ctr": 0.0})
    z, p = z_test(a["clicks"], a["impressions"], b["clicks"], b["impressions"])
    needed = minimum_sample(a["ctr"] or 0.05, settings.ab_min_effect, settings.ab_alpha,
                            settings.ab_power)
    enough = min(a["impressions"], b["impressions"]) >= needed
    if not enough:
        verdict = "collecting"
    elif p >= settings.ab_alpha:
        verdict = "no difference"
    else:
        verdict = "challenger" if b["ctr"] > a["ctr"] else "champion"
    return {"since": since.isoformat(), "until": until.isoformat(), "k": settings.online_k,
            "arms": arms, "z": z, "p_value": p, "alpha": settings.ab_alpha,
            "min_sample_per_arm": needed, "enough_sample": enough, "winner": verdict}


def winner_promotion(status: dict[str, Any], force: bool = False) -> dict[str, Any] | None:
    """registry.promote's arguments that make the challenger champion when it won (or when
    forced); None when nothing should move."""
    if status["winner"] != "challenger" and not force:
        return None
    with session_scope() as session:
        challenger = session.get(ModelAlias, (MODEL_NAME, "challenger"))
        version = challenger.version if challenger else None
    if version is None:
        return None
    reason = (f"A/B: challenger CTR {status['arms'].get('challenger', {}).get('ctr', 0):.4f} "
              f"vs champion {status['arms'].get('champion', {}).get('ctr', 0):.4f}, "
              f"p={status['p_value']:.4g}" + (" (forced)" if force else ""))
    return {"version": version, "alias": "champion", "reason": reason}


def promote_winner(status: dict[str, Any], force: bool = False) -> dict[str, Any] | None:
    """Promote the challenger when it won (or when forced); None when nothing moves."""
    kwargs = winner_promotion(status, force)
    if kwargs is None:
        return None
    if app.conf.task_always_eager:
        return app.tasks["registry.promote"].apply(kwargs=kwargs).get()
    return app.send_task("registry.promote", kwargs=kwargs, queue="registry").get(timeout=60)
