"""What the pages show, read from the tables the services write (read only)."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import desc, func, select
from sqlalchemy.orm import Session

from shared.db import (
    AliasChange,
    Feedback,
    Impression,
    IngestBatch,
    ModelAlias,
    ModelVersion,
    Movie,
    Rating,
    RetrainDecision,
    Snapshot,
)
from shared.retrain import running_retrain

MODEL_NAME = "recsys"  # the registry's model name
RECENT = dt.timedelta(minutes=5)  # the window of the "recent rate" of live counts
RECENT_INGEST = dt.timedelta(days=1)  # ratings and movies arrive in batches, not a stream


def _utc(moment: dt.datetime | None) -> dt.datetime | None:
    return moment.replace(tzinfo=dt.UTC) if moment and moment.tzinfo is None else moment


def counts(session: Session, now: dt.datetime) -> dict[str, dict[str, Any]]:
    """Totals with their recent rate: events per minute over the last 5 minutes (feedback,
    impressions, active users), rows loaded over the last day (ratings, movies)."""
    since, since_ingest = now - RECENT, now - RECENT_INGEST
    loaded = session.execute(select(func.coalesce(func.sum(IngestBatch.ratings), 0),
                                    func.coalesce(func.sum(IngestBatch.movies), 0))
                             .where(IngestBatch.finished_at >= since_ingest)).one()
    feedback_recent = session.scalar(select(func.count()).select_from(Feedback)
                                     .where(Feedback.received_at >= since)) or 0
    impressions_recent = session.scalar(select(func.count()).select_from(Impression)
                                        .where(Impression.served_at >= since)) or 0
    active = session.scalar(select(func.count(func.distinct(Impression.user_id)))
                            .where(Impression.served_at >= since)) or 0
    minutes = RECENT.total_seconds() / 60
    return {
        "ratings": {"total": session.scalar(select(func.count()).select_from(Rating)) or 0,
                    "recent": f"+{int(loaded[0]):,} loaded in the last 24 h"},
        "users": {"total": session.scalar(select(func.count(func.distinct(Rating.user_id))))
                  or 0, "recent": f"{active:,} served in the last 5 min"},
        "movies": {"total": session.scalar(select(func.count()).select_from(Movie)) or 0,
                   "recent": f"+{int(loaded[1]):,} loaded in the last 24 h"},
        "feedback": {"total": session.scalar(select(func.count()).select_from(Feedback)) or 0,
                     "recent": f"{feedback_recent / minutes:,.1f}/min over 5 min"},
        "impressions": {"total": session.scalar(select(func.count()).select_from(Impression))
                        or 0, "recent": f"{impressions_recent / minutes:,.1f}/min over 5 min"},
    }


def aliases(session: Session) -> dict[str, int]:
    return {a.alias: a.version for a in session.scalars(
        select(ModelAlias).where(ModelAlias.name == MODEL_NAME))}


def roles(session: Session) -> dict[str, dict[str, Any] | None]:
    """Champion and challenger: version, algorithm and offline nDCG@10 (None: no alias)."""
    found: dict[str, dict[str, Any] | None] = {}
    held = aliases(session)
    for alias in ("champion", "challenger"):
        number = held.get(alias)
        row = None if number is None else session.scalars(select(ModelVersion).where(
            ModelVersion.name == MODEL_NAME, ModelVersion.version == number)).first()
        found[alias] = None if row is None else {
            "version": row.version, "algorithm": row.algorithm,
            "ndcg10": (row.metrics or {}).get("ndcg@10")}
    return found


def last_retrain(session: Session) -> dict[str, Any]:
    """The newest fired retrain decision (its rule and reason), and a retrain running now."""
    fired = session.scalars(select(RetrainDecision).where(
        RetrainDecision.fired.is_(True), RetrainDecision.action == "retrain")
        .order_by(desc(RetrainDecision.created_at), desc(RetrainDecision.id)).limit(1)).first()
    running = running_retrain()
    return {"decision": None if fired is None else {
                "rule": fired.rule, "reason": fired.reason, "task_id": fired.task_id,
                "at": _utc(fired.created_at)},
            "running": None if running is None else running.as_dict()}


def decisions(session: Session, limit: int = 500) -> list[RetrainDecision]:
    """Every decision of the retrain policy, newest first."""
    return list(session.scalars(select(RetrainDecision).order_by(
        desc(RetrainDecision.last_at), desc(RetrainDecision.id)).limit(limit)))


def lineage(session: Session) -> dict[str, dict[str, Any]]:
    """Each snapshot's protocol, counts and creation time, by id."""
    return {s.id: {"protocol": s.protocol, "counts": s.counts, "params": s.params,
                   "created_at": _utc(s.created_at)} for s in session.scalars(select(Snapshot))}


def alias_history(session: Session) -> list[AliasChange]:
    return list(session.scalars(select(AliasChange).where(AliasChange.name == MODEL_NAME)
                                .order_by(desc(AliasChange.id))))


def titles(session: Session, movie_ids: list[int]) -> dict[int, Movie]:
    if not movie_ids:
        return {}
    return {m.id: m for m in session.scalars(select(Movie).where(Movie.id.in_(movie_ids)))}


def user_ratings(session: Session, user_id: int) -> list[dict[str, Any]]:
    """The user's ratings, newest first, with titles and times."""
    rows = session.execute(select(Rating.movie_id, Rating.rating, Rating.rated_at, Movie.title)
                           .join(Movie, Movie.id == Rating.movie_id, isouter=True)
                           .where(Rating.user_id == user_id)
                           .order_by(desc(Rating.rated_at), Rating.movie_id)).all()
    return [{"movie_id": r.movie_id, "rating": r.rating, "title": r.title or "",
             "at": dt.datetime.fromtimestamp(r.rated_at, dt.UTC)} for r in rows]


def user_feedback(session: Session, user_id: int) -> list[dict[str, Any]]:
    rows = session.execute(select(Feedback.movie_id, Feedback.type, Feedback.value,
                                  Feedback.occurred_at, Movie.title)
                           .join(Movie, Movie.id == Feedback.movie_id, isouter=True)
                           .where(Feedback.user_id == user_id)
                           .order_by(desc(Feedback.occurred_at))).all()
    return [{"movie_id": r.movie_id, "type": r.type, "value": r.value, "title": r.title or "",
             "at": _utc(r.occurred_at)} for r in rows]


def item_counts(session: Session, movie_id: int) -> dict[str, Any]:
    ratings = session.execute(select(func.count(), func.avg(Rating.rating))
                              .where(Rating.movie_id == movie_id)).one()
    by_type = dict(session.execute(select(Feedback.type, func.count())
                                   .where(Feedback.movie_id == movie_id)
                                   .group_by(Feedback.type)).all())
    impressions = session.scalar(select(func.count()).select_from(Impression)
                                 .where(Impression.movie_id == movie_id)) or 0
    return {"ratings": ratings[0] or 0, "mean_rating": ratings[1], "feedback": by_type,
            "impressions": impressions}


def served_to_most(session: Session, movie_id: int, limit: int = 10) -> list[tuple[int, int]]:
    """(user id, times the movie was in a list served to them), most first."""
    times = func.count().label("times")
    return [(r.user_id, r.times) for r in session.execute(
        select(Impression.user_id, times).where(Impression.movie_id == movie_id)
        .group_by(Impression.user_id).order_by(desc(times), Impression.user_id).limit(limit))]
