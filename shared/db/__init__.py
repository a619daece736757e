"""Database models, sessions and migrations shared by every service."""

from shared.db.models import (
    AliasChange,
    Base,
    Feedback,
    Impression,
    IngestBatch,
    IngestReject,
    ModelAlias,
    ModelVersion,
    Movie,
    Rating,
    Snapshot,
    Tag,
    TaskKey,
    UserProfile,
)
from shared.db.session import engine_for, get_engine, migrate, session_scope

__all__ = [
    "AliasChange",
    "Base",
    "Feedback",
    "Impression",
    "IngestBatch",
    "IngestReject",
    "ModelAlias",
    "ModelVersion",
    "Movie",
    "Rating",
    "Snapshot",
    "Tag",
    "TaskKey",
    "UserProfile",
    "engine_for",
    "get_engine",
    "migrate",
    "session_scope",
]
