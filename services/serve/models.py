"""The models serve answers with, and their atomic hot swap.

A `LoadedModel` is immutable: the model, its id maps, its snapshot's train rows and item
counts, and each item's metadata pre-serialised. `ModelStore.state` is one reference to
an immutable `ServingState`; a request reads it once and uses that object throughout, so
a swap (one reference assignment) can never mix two versions inside one answer.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import threading
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp
from sqlalchemy import Engine, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from services.serve.metrics import MODEL_LOADS, MODEL_VERSION
from shared.artifacts import ArtifactError, arrays_to_csr, read_artifact
from shared.db import ModelAlias, ModelVersion, Movie, Snapshot
from shared.errors import RecsysError
from shared.features import IdIndex
from shared.recommenders import Recommender, from_arrays
from shared.settings import Settings

log = logging.getLogger(__name__)
MODEL_NAME = "recsys"  # the registry's model name


class ModelLoadError(RecsysError):
    """A version cannot be served: missing, damaged, or not matching its checksum."""


class UnknownGenre(ValueError):
    """A genre filter names a genre the model's data does not have."""


@dataclass(frozen=True, eq=False)
class LoadedModel:
    """One registered version, ready to score."""

    version: int
    algorithm: str
    sha256: str
    snapshot_id: str
    recommender: Recommender
    users: IdIndex
    items: IdIndex
    train: sp.csr_matrix  # raw snapshot train rows, users x items
    popularity: np.ndarray  # train interactions per item, float32
    genre_names: tuple[str, ...]
    genre_columns: dict[str, int]  # lower-case name -> column of item_genres
    item_genres: np.ndarray  # items x genres, bool
    item_json: tuple[bytes, ...]  # '{"movie_id":..,"genres":[..],"score":' per item

    def canonical_genres(self, genres: tuple[str, ...]) -> tuple[str, ...]:
        """The genres as the data spells them (any case accepted); UnknownGenre names an
        unknown one."""
        unknown = [g for g in genres if g.lower() not in self.genre_columns]
        if unknown:
            raise UnknownGenre(f"unknown genre {unknown[0]!r}; genres are "
                             f"{', '.join(self.genre_names)}")
        return tuple(sorted({self.genre_names[self.genre_columns[g.lower()]] for g in genres}))

    def genre_mask(self, genres: tuple[str, ...]) -> np.ndarray | None:
        """Items having any of `genres`, or None when there is no filter."""
        if not genres:
            return None
        self.canonical_genres(genres)
        columns = [self.genre_columns[g.lower()] for g in genres]
        return self.item_genres[:, columns].any(axis=1)


@dataclass(frozen=True)
class ServingState:
    """What this process serves: one model per variant (champion, challenger or pinned)."""

    models: dict[str, LoadedModel] = field(default_factory=dict)
    challenger_share: float = 0.0

    @property
    def primary(self) -> LoadedModel | None:
        return self.models.get("pinned") or self.models.get("champion")

    def choose(self, user_id: int) -> tuple[str, LoadedModel] | None:
        """The variant that answers this user: a stable hash of the id splits the traffic."""
        challenger = self.models.get("challenger")
        if challenger is not None and self.challenger_share > 0:
            bucket = zlib.crc32(str(user_id).encode()) / 2**32
            if bucket < self.challenger_share:
                return "challenger", challenger
        for variant in ("pinned", "champion"):
            if variant in self.models:
                return variant, self.models[variant]
        return None

    def versions(self) -> dict[str, int]:
        return {variant: model.version for variant, model in self.models.items()}


def _item_json(movie_id: int, movie: tuple[str, int | None, str] | None) -> bytes:
    title, year, genres = movie or ("", None, "")
    head = {"movie_id": movie_id, "title": title, "year": year,
            "genres": [g for g in genres.split("|") if g]}
    text = json.dumps(head, ensure_ascii=False, separators=(",", ":"))
    return (text[:-1] + ',"score":').encode()


def load_model(session: Session, row: ModelVersion, settings: Settings) -> LoadedModel:
    """Read a version's artifact and its snapshot, both verified against their sha256."""
    snapshot = session.get(Snapshot, row.snapshot_id)
    if snapshot is None:
        raise ModelLoadError(f"version {row.version}: snapshot {row.snapshot_id} is not recorded")
    try:
        arrays, _ = read_artifact(row.artifact_path, row.sha256, settings.model_path)
        snap, _ = read_artifact(snapshot.artifact_path, snapshot.sha256, settings.model_path)
        recommender = from_arrays(arrays)
        recommender.prepare_serving()
        train = arrays_to_csr("train", snap)
    except (ArtifactError, KeyError, ValueError) as error:
        raise ModelLoadError(f"version {row.version}: {error}") from None
    items = IdIndex(np.asarray(arrays["item_ids"], dtype=np.int64))
    if not np.array_equal(items.ids, snap["item_ids"]) or recommender.n_items != len(items):
        raise ModelLoadError(f"version {row.version}: its item ids differ from its snapshot's")
    # The whole catalogue in one read: cheaper than an IN list of every model item.
    movies = {movie_id: (title, year, genres) for movie_id, title, year, genres in
              session.execute(select(Movie.id, Movie.title, Movie.year, Movie.genres))}
    genre_names = tuple(str(g) for g in snap["genre_names"])
    return LoadedModel(
        version=row.version, algorithm=row.algorithm, sha256=row.sha256,
        snapshot_id=row.snapshot_id, recommender=recommender,
        users=IdIndex(np.asarray(arrays["user_ids"], dtype=np.int64)), items=items,
        train=train, popularity=np.asarray(snap["item_train_count"], dtype=np.float32),
        genre_names=genre_names,
        genre_columns={name.lower(): i for i, name in enumerate(genre_names)},
        item_genres=np.asarray(snap["item_genres"], dtype=bool),
        item_json=tuple(_item_json(int(i), movies.get(int(i))) for i in items.ids))


class ModelStore:
    """Loads the champion (and challenger, or the pinned version) and swaps atomically."""

    def __init__(self, settings: Settings, engine: Engine) -> None:
        self.settings = settings
        self.engine = engine
        self.state = ServingState(challenger_share=settings.challenger_traffic)
        self.last_error: str | None = None
        self.loaded_at: dt.datetime | None = None
        self._lock = threading.Lock()  # one refresh at a time; readers never take it

    def wanted(self, session: Session) -> dict[str, ModelVersion]:
        """The versions that should be served now, by variant."""
        pin = self.settings.model_version
        query = select(ModelVersion).where(ModelVersion.name == MODEL_NAME)
        if pin != "latest":
            row = session.scalars(query.where(ModelVersion.version == int(pin))).first()
            if row is None:
                raise ModelLoadError(f"MODEL_VERSION={pin}: model {MODEL_NAME!r} has no "
                                     f"version {pin}")
            return {"pinned": row}
        aliases = {a.alias: a.version for a in session.scalars(
            select(ModelAlias).where(ModelAlias.name == MODEL_NAME))}
        if "champion" not in aliases:
            raise ModelLoadError(f"model {MODEL_NAME!r} has no champion yet; run the pipeline "
                                 "or promote a version")
        variants = {"champion": aliases["champion"]}
        challenger = aliases.get("challenger")
        if self.settings.challenger_traffic > 0 and challenger not in (None, variants["champion"]):
            variants["challenger"] = challenger
        rows = {r.version: r for r in session.scalars(query.where(
            ModelVersion.version.in_(list(variants.values()))))}
        return {variant: rows[v] for variant, v in variants.items() if v in rows}

    def refresh(self, expected: dict[str, Any] | None = None) -> ServingState:
        """Load whatever the registry now wants served and swap it in; keep the old state
        (and record why) when that fails. `expected` is a model.promoted payload to check."""
        with self._lock:
            try:
                with Session(self.engine) as session:
                    wanted = self.wanted(session)
                    self._check_event(expected, wanted)
                    current = self.state.models
                    models = {}
                    for variant, row in wanted.items():
                        same = next((m for m in current.values() if m.version == row.version
                                     and m.sha256 == row.sha256), None)
                        models[variant] = same or load_model(session, row, self.settings)
            except (ModelLoadError, ArtifactError) as error:
                MODEL_LOADS.labels("failed").inc()
                self.last_error = str(error)
                log.error("model not (re)loaded, still serving %s: %s",
                          self.state.versions() or "nothing", error)
                return self.state
            except (SQLAlchemyError, OSError) as error:  # keep serving, try again later
                MODEL_LOADS.labels("failed").inc()
                self.last_error = f"registry unreadable: {str(error).splitlines()[0]}"
                log.error("model not (re)loaded: %s", self.last_error)
                return self.state
            if {v: m.version for v, m in models.items()} != self.state.versions():
                MODEL_LOADS.labels("loaded").inc()
                log.info("serving %s (was %s)", {v: m.version for v, m in models.items()},
                         self.state.versions() or "nothing")
                self.loaded_at = dt.datetime.now(dt.UTC)
            self.state = ServingState(models, self.settings.challenger_traffic)  # the swap
            self.last_error = None
            for variant in ("champion", "challenger", "pinned"):
                MODEL_VERSION.labels(variant).set(models[variant].version
                                                  if variant in models else 0)
            return self.state

    @staticmethod
    def _check_event(expected: dict[str, Any] | None, wanted: dict[str, ModelVersion]) -> None:
        """An event's checksum must be the registry's for that version."""
        if not expected or expected.get("version") is None or not expected.get("sha256"):
            return
        for row in wanted.values():
            if row.version == expected["version"] and row.sha256 != expected["sha256"]:
                raise ModelLoadError(f"model.promoted names sha256 {expected['sha256']} for "
                                     f"version {row.version}, the registry {row.sha256}")
