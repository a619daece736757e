"""SQLAlchemy 2.0 models. Alembic migrations own the schema; these mirror it."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    JSON,
    REAL,
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


def _now() -> Any:
    return mapped_column(DateTime(timezone=True), server_default=func.now(), nullable=False)


class Movie(Base):
    __tablename__ = "movie"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    title: Mapped[str] = mapped_column(Text, nullable=False)
    year: Mapped[int | None] = mapped_column(Integer)
    genres: Mapped[str] = mapped_column(Text, nullable=False, default="")  # '|'-joined
    imdb_id: Mapped[int | None] = mapped_column(BigInteger)
    tmdb_id: Mapped[int | None] = mapped_column(BigInteger)


class UserProfile(Base):
    __tablename__ = "user_profile"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    age: Mapped[int | None] = mapped_column(Integer)
    gender: Mapped[str | None] = mapped_column(String(8))
    occupation: Mapped[str | None] = mapped_column(String(64))
    zip_code: Mapped[str | None] = mapped_column(String(16))


class Rating(Base):
    """One explicit rating. No foreign key: ingest validates movie ids before loading,
    and a per-row trigger would double the cost of a bulk COPY."""

    __tablename__ = "rating"

    user_id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    movie_id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    rated_at: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    rating: Mapped[float] = mapped_column(REAL, nullable=False)


class Tag(Base):
    __tablename__ = "tag"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    user_id: Mapped[int] = mapped_column(Integer, nullable=False)
    movie_id: Mapped[int] = mapped_column(Integer, nullable=False, index=True)
    tag: Mapped[str] = mapped_column(Text, nullable=False)
    tagged_at: Mapped[int] = mapped_column(BigInteger, nullable=False)


class IngestBatch(Base):
    __tablename__ = "ingest_batch"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    source: Mapped[str] = mapped_column(Text, nullable=False)
    dataset: Mapped[str] = mapped_column(String(32), nullable=False)
    sha256: Mapped[str] = mapped_column(String(64), nullable=False, unique=True)
    status: Mapped[str] = mapped_column(String(16), nullable=False)
    lenient: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    ratings: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)
    movies: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    users: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    tags: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)
    rejected: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)
    timings: Mapped[dict[str, float]] = mapped_column(JSON, nullable=False, default=dict)
    started_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[dt.datetime] = _now()


class IngestReject(Base):
    """A row that `--lenient` ingest left out, with the reason."""

    __tablename__ = "ingest_reject"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    batch_id: Mapped[int] = mapped_column(
        ForeignKey("ingest_batch.id", ondelete="CASCADE"), nullable=False, index=True
    )
    file: Mapped[str] = mapped_column(Text, nullable=False)
    line: Mapped[int] = mapped_column(BigInteger, nullable=False)
    reason: Mapped[str] = mapped_column(Text, nullable=False)
    raw: Mapped[str] = mapped_column(Text, nullable=False, default="")


class TaskKey(Base):
    """Idempotency key of a task: a redelivered task finds its earlier result here."""

    __tablename__ = "task_key"

    key: Mapped[str] = mapped_column(String(200), primary_key=True)
    task_name: Mapped[str] = mapped_column(String(100), nullable=False)
    result: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False, default=dict)
    created_at: Mapped[dt.datetime] = _now()


class Snapshot(Base):
    """A dataset snapshot: id maps, CSR splits and statistics, stored in the artifact store.

    The id is a hash of the ratings' fingerprint and the settings that made it, so the
    same ratings with the same settings always name the same snapshot."""

    __tablename__ = "snapshot"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    ratings_fingerprint: Mapped[str] = mapped_column(String(64), nullable=False)
    protocol: Mapped[str] = mapped_column(String(32), nullable=False)
    params: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False, default=dict)
    counts: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False, default=dict)
    artifact_path: Mapped[str] = mapped_column(Text, nullable=False)
    sha256: Mapped[str] = mapped_column(String(64), nullable=False)
    task_id: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = _now()


class ModelVersion(Base):
    """One registered model: what made it, where its arrays are, how it scored."""

    __tablename__ = "model_version"
    __table_args__ = (UniqueConstraint("name", "version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), nullable=False)
    version: Mapped[int] = mapped_column(Integer, nullable=False)
    algorithm: Mapped[str] = mapped_column(String(32), nullable=False)
    params: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False, default=dict)
    snapshot_id: Mapped[str] = mapped_column(ForeignKey("snapshot.id"), nullable=False,
                                             index=True)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False, default=dict)
    artifact_path: Mapped[str] = mapped_column(Text, nullable=False)
    sha256: Mapped[str] = mapped_column(String(64), nullable=False)
    fit_key: Mapped[str] = mapped_column(String(64), nullable=False, unique=True)
    task_id: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = _now()


class ModelAlias(Base):
    """MLflow-style alias (champion, challenger) pointing at one version of a model."""

    __tablename__ = "model_alias"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    alias: Mapped[str] = mapped_column(String(32), primary_key=True)
    version: Mapped[int] = mapped_column(Integer, nullable=False)
    updated_at: Mapped[dt.datetime] = _now()


class AliasChange(Base):
    """Every move of an alias, so rollback knows where it came from and why."""

    __tablename__ = "alias_change"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), nullable=False)
    alias: Mapped[str] = mapped_column(String(32), nullable=False)
    from_version: Mapped[int | None] = mapped_column(Integer)
    to_version: Mapped[int | None] = mapped_column(Integer)
    action: Mapped[str] = mapped_column(String(16), nullable=False)
    reason: Mapped[str] = mapped_column(Text, nullable=False, default="")
    created_at: Mapped[dt.datetime] = _now()


class Feedback(Base):
    """A user's reaction to a movie, posted to serve and persisted by the ingest service.

    `event_id` is the client's (or derived from its Idempotency-Key, or assigned by serve
    when it accepts the event), so a redelivered message, an event shipped again from
    serve's outbox, or a client's retry stores the event once."""

    __tablename__ = "feedback"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    event_id: Mapped[str] = mapped_column(String(64), nullable=False, unique=True)
    user_id: Mapped[int] = mapped_column(Integer, nullable=False, index=True)
    movie_id: Mapped[int] = mapped_column(Integer, nullable=False)
    type: Mapped[str] = mapped_column(String(16), nullable=False)
    value: Mapped[float | None] = mapped_column(REAL)
    request_id: Mapped[str | None] = mapped_column(String(64), index=True)
    occurred_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    received_at: Mapped[dt.datetime] = _now()


class Impression(Base):
    """One item of one served recommendation list, for the online metrics."""

    __tablename__ = "impression"
    __table_args__ = (UniqueConstraint("request_id", "position"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    request_id: Mapped[str] = mapped_column(String(64), nullable=False)
    user_id: Mapped[int] = mapped_column(Integer, nullable=False, index=True)
    movie_id: Mapped[int] = mapped_column(Integer, nullable=False)
    position: Mapped[int] = mapped_column(Integer, nullable=False)
    model_version: Mapped[int | None] = mapped_column(Integer)
    variant: Mapped[str] = mapped_column(String(16), nullable=False)
    source: Mapped[str] = mapped_column(String(16), nullable=False)
    served_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), nullable=False,
                                                   index=True)


class OnlineMetric(Base):
    """Online figures of one model version and variant over one time window."""

    __tablename__ = "online_metric"
    __table_args__ = (UniqueConstraint("window_start", "window_end", "model_version",
                                       "variant"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    window_start: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), nullable=False,
                                                      index=True)
    window_end: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    model_version: Mapped[int | None] = mapped_column(Integer)
    variant: Mapped[str] = mapped_column(String(16), nullable=False)
    k: Mapped[int] = mapped_column(Integer, nullable=False)
    lists: Mapped[int] = mapped_column(Integer, nullable=False)
    impressions: Mapped[int] = mapped_column(Integer, nullable=False)
    clicks: Mapped[int] = mapped_column(Integer, nullable=False)
    ctr: Mapped[float] = mapped_column(REAL, nullable=False)
    hit_rate: Mapped[float] = mapped_column(REAL, nullable=False)
    mean_click_position: Mapped[float | None] = mapped_column(REAL)
    feedback: Mapped[int] = mapped_column(Integer, nullable=False)
    satisfaction: Mapped[float | None] = mapped_column(REAL)
    computed_at: Mapped[dt.datetime] = _now()


class RetrainDecision(Base):
    """What the retrain policy decided on an event, and why.

    A retrain held back because another one runs is one row per rule and running retrain
    (`held_by`, that retrain's lock holder): `count` events, the first at `created_at`,
    the last at `last_at`. Every other decision is a row of its own (`count` 1)."""

    __tablename__ = "retrain_decision"
    __table_args__ = (
        Index("uq_retrain_decision_held", "rule", "action", "held_by", unique=True,
              postgresql_where=text("held_by IS NOT NULL"),
              sqlite_where=text("held_by IS NOT NULL")),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    rule: Mapped[str] = mapped_column(String(32), nullable=False)
    fired: Mapped[bool] = mapped_column(Boolean, nullable=False)
    action: Mapped[str] = mapped_column(String(16), nullable=False)  # retrain, rollback, none
    reason: Mapped[str] = mapped_column(Text, nullable=False)
    task_id: Mapped[str | None] = mapped_column(String(64))
    details: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False, default=dict)
    created_at: Mapped[dt.datetime] = _now()
    count: Mapped[int] = mapped_column(Integer, nullable=False, server_default=text("1"))
    last_at: Mapped[dt.datetime] = _now()
    held_by: Mapped[str | None] = mapped_column(String(64))


class PolicyLock(Base):
    """A named lock with an expiry: one retrain at a time, however many events fire."""

    __tablename__ = "policy_lock"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    holder: Mapped[str] = mapped_column(String(64), nullable=False)
    acquired_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    expires_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    task_id: Mapped[str | None] = mapped_column(String(64))  # the chain's last task
