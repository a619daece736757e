"""Helpers for ingest tests: database fingerprints and fixture copies."""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

from sqlalchemy import text

from shared.db.session import engine_for

TABLES = ["movie", "rating", "user_profile", "tag", "ingest_batch", "ingest_reject"]


def db_state(url: str) -> dict[str, object]:
    """Row counts of every ingest table plus a digest of the ratings: equal means unchanged."""
    with engine_for(url).connect() as conn:
        state: dict[str, object] = {
            table: conn.execute(text(f"SELECT count(*) FROM {table}")).scalar_one()
            for table in TABLES
        }
        state["rating_sum"] = conn.execute(
            text(
                "SELECT coalesce(sum(user_id * 7 + movie_id * 13 + rated_at % 1000 + rating), 0) "
                "FROM rating"
            )
        ).scalar_one()
        state["titles"] = "|".join(
            conn.execute(text("SELECT title FROM movie ORDER BY id")).scalars()
        )
    return state


def copy_dataset(source: Path, target: Path) -> Path:
    """A writable copy of a data set folder, to damage in a test."""
    shutil.copytree(source, target)
    for path in target.rglob("*"):
        path.chmod(0o644)
    return target


def zip_dataset(source: Path, archive: Path, folder: str | None = None) -> Path:
    """Zip a data set folder the way GroupLens ships it (files inside one folder)."""
    folder = folder or source.name
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as handle:
        for path in sorted(source.iterdir()):
            handle.write(path, f"{folder}/{path.name}")
    return archive
