"""Database models, sessions and migrations shared by every service."""

from shared.db.models import (
    Base,
    IngestBatch,
    IngestReject,
    Movie,
    Rating,
    Tag,
    TaskKey,
    UserProfile,
)
from shared.db.session import engine_for, get_engine, migrate, session_scope

__all__ = [
    "Base",
    "IngestBatch",
    "IngestReject",
    "Movie",
    "Rating",
    "Tag",
    "TaskKey",
    "UserProfile",
    "engine_for",
    "get_engine",
    "migrate",
    "session_scope",
]
