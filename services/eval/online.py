"""Online evaluation: what users did with the lists they were served, per model and variant.

Impressions are joined with the feedback that answers them: by request id, or, for
feedback that names none, by user and item within ONLINE_MATCH_SECONDS after serving.
One SQL aggregate per window does the work in the database; the figures are stored per
(window, model version, variant) and published as a `metrics.online` event. Lists served
without a model (the popular fallback) count under model version 0.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import Engine, text
from sqlalchemy.dialects import postgresql, sqlite

from shared.db import OnlineMetric, get_engine
from shared.events import get_event_bus
from shared.settings import get_settings

ENGAGED = ("click", "watch", "rating")  # feedback that counts as taking up a recommendation

_WINDOW_SQL = """
WITH served AS (
    SELECT coalesce(model_version, 0) AS mv, variant, count(*) AS impressions,
           -- every list has a position 1: lists counted without a DISTINCT over all rows
           sum(CASE WHEN position = 1 THEN 1 ELSE 0 END) AS lists
    FROM impression
    WHERE served_at >= :start AND served_at < :end AND position <= :k
    GROUP BY coalesce(model_version, 0), variant
), matched AS (
    -- Two equi-joins rather than one join on an OR, so each can be a hash join.
    SELECT i.request_id, i.position, coalesce(i.model_version, 0) AS mv, i.variant,
           f.type, f.value
    FROM feedback f JOIN impression i
      ON i.request_id = f.request_id AND i.movie_id = f.movie_id
    WHERE i.served_at >= :start AND i.served_at < :end AND i.position <= :k
    UNION ALL
    SELECT i.request_id, i.position, coalesce(i.model_version, 0) AS mv, i.variant,
           f.type, f.value
    FROM feedback f JOIN impression i ON i.user_id = f.user_id AND i.movie_id = f.movie_id
    WHERE f.request_id IS NULL AND f.occurred_at >= i.served_at
      AND f.occurred_at < {match_end}
      AND i.served_at >= :start AND i.served_at < :end AND i.position <= :k
), answered AS (
    SELECT request_id, position, mv, variant,
           max(CASE WHEN type IN ('click', 'watch', 'rating') THEN 1 ELSE 0 END) AS engaged,
           sum(CASE WHEN type = 'rating' THEN value END) AS rating_sum,
           sum(CASE WHEN type = 'rating' THEN 1 ELSE 0 END) AS ratings,
           count(*) AS events
    FROM matched GROUP BY request_id, position, mv, variant
), engaged AS (
    -- Only answered impressions reach here: a few rows, whatever the traffic.
    SELECT mv, variant, sum(engaged) AS clicks,
           count(DISTINCT CASE WHEN engaged = 1 THEN request_id END) AS lists_hit,
           sum(CASE WHEN engaged = 1 THEN position END) AS click_positions,
           sum(events) AS feedback, sum(rating_sum) AS rating_sum, sum(ratings) AS ratings
    FROM answered GROUP BY mv, variant
)
SELECT s.mv AS model_version, s.variant, s.impressions, s.lists,
       coalesce(e.clicks, 0) AS clicks, coalesce(e.lists_hit, 0) AS lists_hit,
       e.click_positions, coalesce(e.feedback, 0) AS feedback, e.rating_sum,
       coalesce(e.ratings, 0) AS ratings
FROM served s LEFT JOIN engaged e ON e.mv = s.mv AND e.variant = s.variant
"""


def _match_end(engine: Engine) -> str:
    if engine.dialect.name == "postgresql":
        return "i.served_at + make_interval(secs => :match)"
    return "datetime(i.served_at, '+' || :match || ' seconds')"


def window_figures(start: dt.datetime, end: dt.datetime, k: int, match_seconds: int,
                   engine: Engine | None = None) -> list[dict[str, Any]]:
    """Per model version and variant: CTR@k, hit rate, click position, volume, satisfaction."""
    engine = engine or get_engine()
    query = text(_WINDOW_SQL.format(match_end=_match_end(engine)))
    params = {"start": start, "end": end, "k": k, "match": match_seconds}
    if engine.dialect.name != "postgresql":  # SQLite compares the stored text form
        params.update(start=start.strftime("%Y-%m-%d %H:%M:%S.%f"),
                      end=end.strftime("%Y-%m-%d %H:%M:%S.%f"))
    with engine.connect() as conn:
        rows = conn.execute(query, params).mappings().all()
    figures = []
    for row in rows:
        impressions, lists, clicks = int(row["impressions"]), int(row["lists"]), int(row["clicks"])
        ratings = int(row["ratings"] or 0)
        figures.append({
            "model_version": row["model_version"], "variant": row["variant"], "k": k,
            "lists": lists, "impressions": impressions, "clicks": clicks,
            "ctr": clicks / impressions if impressions else 0.0,
            "hit_rate": int(row["lists_hit"]) / lists if lists else 0.0,
            "mean_click_position": float(row["click_positions"]) / clicks if clicks else None,
            "feedback": int(row["feedback"]),
            "satisfaction": float(row["rating_sum"]) / ratings if ratings else None,
        })
    return sorted(figures, key=lambda f: (f["variant"], f["model_version"] or 0))


def store_window(start: dt.datetime, end: dt.datetime, figures: list[dict[str, Any]],
                 engine: Engine | None = None) -> None:
    """Upsert one window's figures (recomputing a window replaces it)."""
    engine = engine or get_engine()
    rows = [{"window_start": start, "window_end": end, **f} for f in figures]
    if not rows:
        return
    dialect = postgresql if engine.dialect.name == "postgresql" else sqlite
    statement = dialect.insert(OnlineMetric.__table__)
    keys = ("window_start", "window_end", "model_version", "variant")
    statement = statement.on_conflict_do_update(
        index_elements=list(keys),
        set_={c: statement.excluded[c] for c in rows[0] if c not in keys})
    with engine.begin() as conn:
        conn.execute(statement, rows)


def compute_online(end: dt.datetime | None = None, window_seconds: int | None = None,
                   engine: Engine | None = None) -> dict[str, Any]:
    """Compute, store and publish the window ending at `end` (now by default)."""
    settings = get_settings()
    end = end or dt.datetime.now(dt.UTC)
    start = end - dt.timedelta(seconds=window_seconds or settings.online_window_seconds)
    figures = window_figures(start, end, settings.online_k, settings.online_match_seconds,
                             engine)
    store_window(start, end, figures, engine)
    payload = {"window_start": start.isoformat(), "window_end": end.isoformat(),
               "k": settings.online_k, "figures": figures}
    get_event_bus().publish("metrics.online", payload)
    return payload
