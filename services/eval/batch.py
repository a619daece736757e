"""Recommendations for many users at once, written to Parquet, CSV or JSON Lines.

Each user gets the list serve's `GET /recommendations/{user_id}` would give them: every
item they rated or gave feedback on is left out (the version's snapshot train row merged
with their ratings and feedback in the database), a user the model lacks but who has
interactions is folded in, and a user with none gets the popular list (train interaction
counts); a genre filter keeps items of any of the genres. The version is resolved as
`recsys eval` resolves it (services/eval/versions.py).

Users are taken in chunks of BATCH_CHUNK_USERS: a chunk's history is read in one query a
table (a chunk of `all` by its range of ids; a binary COPY on Postgres) and merged into
the train rows as arrays by serve's rule (shared/history.py `merge_cells`), scored in
blocks of at most SCORE_BLOCK_CELLS cells, and written as one Parquet part file beside
the output (`<output>.parts/`), recorded in a manifest. A rerun with the same arguments
skips the recorded parts; other arguments discard them and start over. When every chunk
is written, the parts are combined into the output one at a time.

Memory: the model and snapshot arrays, two chunks' histories (the next one is read while
one is scored), one score block ranked in
place by `rank_rows`, the ranking serve lists with (SCORE_BLOCK_CELLS x 12 bytes: the
float32 scores and their int64 argpartition indices) and one chunk's rows (chunk x k x 32
bytes); combining holds one part at a time.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import scipy.sparse as sp
from sqlalchemy import text

from services.eval.offline import EvaluationError
from services.eval.versions import load_snapshot_arrays, resolve_version
from shared.artifacts import arrays_to_csr, read_artifact
from shared.db import get_engine, session_scope
from shared.db.copy import read_columns
from shared.features import IdIndex
from shared.history import event_value_sql, merge_cells
from shared.recommenders import SCORE_BLOCK_CELLS, Recommender, from_arrays, rank_rows, seen_cells
from shared.settings import get_settings

FORMATS = {".parquet": "parquet", ".csv": "csv", ".jsonl": "jsonl"}
COLUMNS = ("user_id", "rank", "movie_id", "score", "model_version")
SCHEMA = pa.schema([("user_id", pa.int64()), ("rank", pa.int32()), ("movie_id", pa.int64()),
                    ("score", pa.float64()), ("model_version", pa.int32())])
MANIFEST = "manifest.json"
Progress = Callable[[int, int], None]  # (users done, users in all)


class BatchError(EvaluationError):
    """A batch cannot run as asked; the message names the input."""


@dataclass(frozen=True)
class Batch:
    """A loaded version with what scoring its users needs."""

    record: dict[str, Any]
    recommender: Recommender
    users: IdIndex  # the model's users (and the snapshot train rows)
    items: IdIndex
    train: sp.csr_matrix
    popularity: np.ndarray
    genre_names: tuple[str, ...]
    item_genres: np.ndarray


def output_format(output: str | Path) -> str:
    """parquet, csv or jsonl by the file's extension; BatchError for any other."""
    suffix = Path(output).suffix.lower()
    if suffix not in FORMATS:
        raise BatchError(f"--output {output}: unknown extension {suffix or '(none)'!r}; use "
                         f"{', '.join(FORMATS)}")
    return FORMATS[suffix]


def parse_users(spec: str | list[int]) -> list[int] | None:
    """None for `all`; the ids of `ID,ID`, a list, or a file of one id per line (an
    optional `user_id` header line, blank lines ignored), in order, duplicates dropped."""
    if isinstance(spec, list):
        ids = [int(u) for u in spec]
    else:
        text_spec = spec.strip()
        if text_spec.lower() == "all":
            return None
        parts = [p.strip() for p in text_spec.split(",") if p.strip()]
        if parts and all(p.isdigit() for p in parts):
            ids = [int(p) for p in parts]
        else:
            ids = _users_file(Path(text_spec))
    if not ids:
        raise BatchError(f"--users {spec!r} names no user")
    bad = [u for u in ids if u < 1]
    if bad:
        raise BatchError(f"--users: user id {bad[0]} is not a positive whole number")
    return list(dict.fromkeys(ids))


def _users_file(path: Path) -> list[int]:
    if not path.is_file():
        raise BatchError(f"--users {str(path)!r} is not 'all', a comma-separated list of "
                         "user ids, or an existing file of user ids")
    ids = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        value = line.strip().strip(",")
        if not value or (number == 1 and value.lower() == "user_id"):
            continue
        if not value.isdigit() or int(value) < 1:
            raise BatchError(f"--users file {path}, line {number}: {value[:40]!r} is not a "
                             "user id (one positive whole number per line)")
        ids.append(int(value))
    if not ids:
        raise BatchError(f"--users file {path} holds no user id")
    return ids


def load_batch(model: str | int) -> Batch:
    """The version `model` names (number, `latest`, `challenger`) and its snapshot."""
    record = resolve_version(model)
    arrays, _ = read_artifact(record["artifact_path"], record["sha256"])
    _, snap = load_snapshot_arrays(record["snapshot"])
    items = IdIndex(np.asarray(arrays["item_ids"], dtype=np.int64))
    users = IdIndex(np.asarray(arrays["user_ids"], dtype=np.int64))
    if not np.array_equal(items.ids, snap["item_ids"]):
        raise BatchError(f"version {record['version']}: its item ids differ from its snapshot's")
    counts = snap.get("item_train_count")
    train = arrays_to_csr("train", snap)
    if counts is None:
        counts = np.diff(train.tocsc().indptr)
    names = tuple(str(g) for g in snap["genre_names"]) if "genre_names" in snap else ()
    genres = (np.asarray(snap["item_genres"], dtype=bool) if "item_genres" in snap
              else np.zeros((len(items), 0), dtype=bool))
    return Batch(record, from_arrays(arrays), users, items, train,
                 np.asarray(counts, dtype=np.float32), names, genres)


def genre_mask(batch: Batch, genres: list[str]) -> tuple[np.ndarray | None, list[str]]:
    """Items having any of `genres` (None: no filter) and the genres as the data spells them."""
    if not genres:
        return None, []
    lower = {name.lower(): i for i, name in enumerate(batch.genre_names)}
    unknown = [g for g in genres if g.lower() not in lower]
    if unknown:
        raise BatchError(f"--genres: unknown genre {unknown[0]!r}; genres are "
                         f"{', '.join(batch.genre_names)}")
    columns = sorted({lower[g.lower()] for g in genres})
    return batch.item_genres[:, columns].any(axis=1), [batch.genre_names[c] for c in columns]


def database_users() -> np.ndarray:
    """Every user with a rating or feedback in the database, ascending (one DISTINCT a
    table: on Postgres less than half the time of their UNION)."""
    with session_scope() as session:
        tables = [session.execute(text(f"SELECT DISTINCT user_id FROM {table}")).scalars().all()
                  for table in ("rating", "feedback")]
    return np.union1d(*(np.asarray(rows, dtype=np.int64) for rows in tables))


def _where(user_ids: np.ndarray, whole_range: bool) -> str:
    """The users' rows: their range of ids (`whole_range`) or the ids one by one; numbers
    only, written into the query (COPY takes no parameters)."""
    if whole_range:
        return f"user_id BETWEEN {int(user_ids[0])} AND {int(user_ids[-1])}"
    return f"user_id IN ({', '.join(str(int(u)) for u in user_ids.tolist())})"


def read_events(user_ids: np.ndarray, whole_range: bool = False) -> dict[str, np.ndarray]:
    """Every rating and feedback event of many users at once, oldest first as serve merges
    them (ratings by time, then feedback by time, ties in arrival order): arrays user_id,
    movie_id and value, NaN where an event adds no interaction (a view). One query a
    table, read on Postgres by a binary COPY (shared/db/copy.py). `whole_range`: `user_ids`
    is every user with a history between its first and last id (ascending), so the range
    is read instead of the list."""
    names = ("user_id", "movie_id", "value")
    if not user_ids.size:
        return {"user_id": np.empty(0, np.int32), "movie_id": np.empty(0, np.int32),
                "value": np.empty(0, np.float32)}
    engine = get_engine()
    where = _where(user_ids, whole_range)
    ratings = read_columns(engine, "SELECT user_id, movie_id, rating, rated_at FROM rating "
                                   f"WHERE {where}")
    by_time = np.argsort(ratings["order"], kind="stable")
    value = event_value_sql(get_settings().feedback_implicit_rating)
    if engine.dialect.name == "postgresql":  # COPY's fixed-width rows hold no NULL
        value = f"CAST(coalesce({value}, 'NaN') AS REAL)"
    feedback = read_columns(engine, f"SELECT user_id, movie_id, {value}, id FROM feedback "
                                    f"WHERE {where} ORDER BY occurred_at, id")
    return {name: np.concatenate((ratings[name][by_time], feedback[name])) for name in names}


def _rows(batch: Batch, positions: np.ndarray, user_ids: np.ndarray,
          events: dict[str, np.ndarray]) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    """(interactions, seen) of a chunk, users x items: each trained user's snapshot train
    row, gathered for all at once, with the database `events` merged in after it as
    serve's plan merges them (shared/history.py `merge_cells`, the array form of `merge`).
    Movies the model lacks drop."""
    train, shape = batch.train, (len(user_ids), len(batch.items))
    trained = np.flatnonzero(positions >= 0)
    lengths = np.zeros(user_ids.size, dtype=np.int64)
    lengths[trained] = np.diff(train.indptr)[positions[trained]]
    indptr = np.concatenate(([0], np.cumsum(lengths)))
    # Where each row's cells sit in the train arrays: its train row start, then one by one.
    source = (np.repeat(train.indptr[positions[trained]] - indptr[trained], lengths[trained])
              + np.arange(indptr[-1]))
    interactions = sp.csr_matrix((train.data[source].astype(np.float32),
                                  train.indices[source], indptr), shape=shape)
    if not events["user_id"].size:
        return interactions, interactions
    columns = batch.items.to_index(events["movie_id"], allow_unknown=True)
    order = np.argsort(user_ids, kind="stable")
    found = order[np.minimum(np.searchsorted(user_ids[order], events["user_id"]),
                             user_ids.size - 1)]
    keep = (user_ids[found] == events["user_id"]) & (columns >= 0)
    return merge_cells(
        np.concatenate((np.repeat(np.arange(user_ids.size), lengths), found[keep])),
        np.concatenate((interactions.indices, columns[keep])),
        np.concatenate((interactions.data, events["value"][keep])), shape)


def score_chunk(batch: Batch, user_ids: np.ndarray, k: int, exclude_seen: bool,
                mask: np.ndarray | None, events: dict[str, np.ndarray]) -> pa.Table:
    """The rows of one chunk of users, in user order then rank; `events`: their history
    (`read_events`)."""
    positions = batch.users.to_index(user_ids, allow_unknown=True)
    interactions, seen = _rows(batch, positions, user_ids, events)
    has_history = np.diff(interactions.indptr) > 0
    popular = (positions < 0) & ~has_history
    ids = np.full((user_ids.size, k), -1, dtype=np.int64)
    best = np.full((user_ids.size, k), -np.inf, dtype=np.float32)
    recommender = batch.recommender
    block = max(1, SCORE_BLOCK_CELLS // max(len(batch.items), 1))
    # Three groups, each scored as serve scores it: trained users from the model alone
    # (where it can), the others from their interactions (fold-in, item-based models),
    # and users with no interactions from the popular list. Each block of scores is
    # fresh, so the ranking masks and negates it in place.
    alone = recommender.scores_trained_alone
    groups = ((np.flatnonzero(positions >= 0) if alone else np.empty(0, np.int64), "trained"),
              (np.flatnonzero(~popular & ((positions < 0) if alone else True)), "history"),
              (np.flatnonzero(popular), "popular"))
    for members, path in groups:
        for start in range(0, members.size, block):
            rows = members[start:start + block]
            if path == "trained":
                scores = recommender.score_trained(positions[rows])
            elif path == "history":
                scores = recommender.score(positions[rows], interactions[rows])
            else:
                scores = np.broadcast_to(batch.popularity, (rows.size, len(batch.items)))
            banned = seen_cells(seen[rows]) if exclude_seen else None
            ids[rows], best[rows] = rank_rows(scores, k, banned, mask, in_place=True)
    keep = ids >= 0
    counts = keep.sum(axis=1)
    ranks = np.broadcast_to(np.arange(1, k + 1, dtype=np.int32), ids.shape)[keep]
    return pa.table({
        "user_id": pa.array(np.repeat(user_ids, counts), pa.int64()),
        "rank": pa.array(ranks, pa.int32()),
        "movie_id": pa.array(batch.items.ids[ids[keep]], pa.int64()),
        "score": pa.array(np.round(best[keep].astype(np.float64), 6), pa.float64()),
        "model_version": pa.array(np.full(int(keep.sum()), batch.record["version"], np.int32),
                                  pa.int32()),
    }, schema=SCHEMA)


def _atomic_json(path: Path, payload: dict[str, Any]) -> None:
    partial = path.with_suffix(".tmp")
    partial.write_text(json.dumps(payload, indent=1, sort_keys=True))
    os.replace(partial, path)


def _write_output(parts: Iterator[Path], output: Path, kind: str) -> None:
    """The parts combined into `output` (written beside it, then renamed into place)."""
    partial = output.with_name(output.name + ".partial")
    if kind == "parquet":
        with pq.ParquetWriter(partial, SCHEMA) as writer:
            for part in parts:
                writer.write_table(pq.read_table(part))
    elif kind == "csv":
        with pacsv.CSVWriter(partial, SCHEMA) as writer:
            for part in parts:
                writer.write_table(pq.read_table(part))
    else:
        with partial.open("w", encoding="utf-8") as handle:
            for part in parts:
                columns = pq.read_table(part).to_pydict()
                handle.writelines(
                    f'{{"user_id":{u},"rank":{r},"movie_id":{m},"score":{s!r},'
                    f'"model_version":{v}}}\n'
                    for u, r, m, s, v in zip(*(columns[c] for c in COLUMNS), strict=True))
    os.replace(partial, output)


def recommend_batch(users: str | list[int], k: int, output: str | Path,
                    model: str | int = "latest", exclude_seen: bool = True,
                    genres: list[str] | None = None, progress: Progress | None = None
                    ) -> dict[str, Any]:
    """Write every asked user's top `k` to `output` (format by extension), resumably;
    returns the summary: users, rows, output, model_version, seconds, resumed chunks."""
    started = time.perf_counter()
    if k < 1:
        raise BatchError(f"--k {k}: must be at least 1")
    output = Path(output)
    kind = output_format(output)
    if output.is_dir():
        raise BatchError(f"--output {output} is a directory; name a file")
    asked = parse_users(users)
    with ThreadPoolExecutor(1) as beside:  # the database's users while the model loads
        in_database = beside.submit(database_users) if asked is None else None
        batch = load_batch(model)
        user_ids = (np.asarray(asked, dtype=np.int64) if in_database is None
                    else np.union1d(batch.users.ids, in_database.result()))
    mask, genre_names = genre_mask(batch, list(genres or []))
    chunk_users = get_settings().batch_chunk_users
    arguments = {"users": hashlib.sha256(user_ids.tobytes()).hexdigest(),
                 "users_count": int(user_ids.size), "k": k, "exclude_seen": exclude_seen,
                 "genres": genre_names, "version": batch.record["version"],
                 "sha256": batch.record["sha256"], "chunk_users": chunk_users}
    output.parent.mkdir(parents=True, exist_ok=True)
    parts_dir = output.with_name(output.name + ".parts")
    manifest_path = parts_dir / MANIFEST
    manifest: dict[str, Any] = {"arguments": arguments, "chunks": {}}
    restarted = None
    if manifest_path.is_file():
        previous = json.loads(manifest_path.read_text())
        if previous.get("arguments") == arguments:
            manifest = previous
        else:
            changed = sorted(key for key in arguments
                             if previous.get("arguments", {}).get(key) != arguments[key])
            restarted = (f"the unfinished run in {parts_dir} had other arguments "
                         f"({', '.join(changed)}); starting over")
            shutil.rmtree(parts_dir)
    parts_dir.mkdir(exist_ok=True)
    chunks = range(0, user_ids.size, chunk_users)
    whole_range = asked is None
    todo = [number for number in range(len(chunks))
            if not (str(number) in manifest["chunks"]
                    and (parts_dir / f"part-{number:06d}.parquet").is_file())]
    resumed = len(chunks) - len(todo)
    rows = sum(int(manifest["chunks"][str(n)]["rows"]) for n in set(range(len(chunks)))
               - set(todo))

    def users_of(number: int) -> np.ndarray:
        return user_ids[chunks[number]:chunks[number] + chunk_users]

    users_done = int(user_ids.size) - sum(users_of(number).size for number in todo)
    if progress is not None and resumed:
        progress(users_done, int(user_ids.size))

    # The next chunk's history is read while this one is scored: the database works on
    # the query (its own process) while numpy ranks, so the read adds little time.
    with ThreadPoolExecutor(1) as reading:
        upcoming = (reading.submit(read_events, users_of(todo[0]), whole_range)
                    if todo else None)
        for position, number in enumerate(todo):
            assert upcoming is not None
            events = upcoming.result()
            upcoming = (reading.submit(read_events, users_of(todo[position + 1]), whole_range)
                        if position + 1 < len(todo) else None)
            table = score_chunk(batch, users_of(number), k, exclude_seen, mask, events)
            part = parts_dir / f"part-{number:06d}.parquet"
            partial = part.with_suffix(".tmp")
            pq.write_table(table, partial)
            os.replace(partial, part)
            manifest["chunks"][str(number)] = {"rows": table.num_rows}
            _atomic_json(manifest_path, manifest)
            rows += table.num_rows
            users_done += users_of(number).size
            if progress is not None:
                progress(users_done, int(user_ids.size))
    _write_output((parts_dir / f"part-{n:06d}.parquet" for n in range(len(chunks))), output,
                  kind)
    shutil.rmtree(parts_dir)
    summary: dict[str, Any] = {
        "users": int(user_ids.size), "rows": rows, "output": str(output.resolve()),
        "format": kind, "model_version": batch.record["version"], "k": k,
        "exclude_seen": exclude_seen, "genres": genre_names,
        "seconds": round(time.perf_counter() - started, 3), "chunks": len(chunks),
        "resumed_chunks": resumed}
    if restarted:
        summary["restarted"] = restarted
    return summary
