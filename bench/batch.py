"""Batch recommendations at MovieLens-25M size: every user of a 64-factor model.

Builds a generated snapshot (162,541 users x 59,047 items, 25,000,095 interactions, the
train split of bench/evaluate.py's generator; users and items scale with `--ratings` as
bench/datagen.py scales ml-25m, unless given) and a 64-factor ALS model of the same shape,
registered and promoted, its train interactions stored as the database's ratings (as in
production, where every user's history is read and merged into their train row), in an
embedded database (SQLite under a scratch DATA_PATH) or, with `--database-url`, a scratch
database on that Postgres server (read by binary COPY, as in a deployment), then in a
fresh process each:
- `recsys recommend`'s domain function over `--users all`, top-10 to Parquet (history
  reads, seen-item masking, ranking as serve ranks, part files, manifest, the combine);
- the bare part: numpy top-10 of every user from the same factors, train items masked, in
  blocks of the same size.
Prints each stage's wall time and peak RSS (VmHWM), then one JSON object as its last line:
{"users", "rows", "seconds", "bare_seconds", "ratio", "peak_rss_mb"}. Target: ratio <= 1.5.

Memory the batch holds beyond the interpreter is bounded, whatever the number of users, by
24 bytes a train interaction (the snapshot's split, twice while its CSR is rebuilt), the
float32 factors, two chunks' database events (20 bytes each), one chunk's merge (56 bytes
a cell of its train rows and events), one score block of 2**24 cells ranked in place
(192 MB) and one chunk's rows (k x 32 bytes a user): the line "bound on batch memory"
prints it for the run (846 MB at full size).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import bare_top_k, scratch_database  # noqa: E402
from bench.datagen import ML25M_RATINGS, Shape  # noqa: E402
from bench.evaluate import generate, peak_rss_mb  # noqa: E402

FACTORS = 64
K = 10
GENRES = ("Action", "Comedy", "Drama", "Romance", "Thriller")


def environment(workdir: Path, database_url: str = "") -> dict[str, str]:
    """Settings in the scratch directory: the database is embedded unless given; no broker
    or cache is involved."""
    return {"DATA_PATH": str(workdir / "data"), "MODEL_PATH": str(workdir / "models"),
            "DATABASE_URL": database_url, "BROKER_URL": "", "REDIS_URL": ""}


def store_ratings(train: sp.csr_matrix, rows_per_batch: int = 1_000_000) -> None:
    """The train interactions as ratings (user and movie ids 1-based, rated_at the cell's
    position), by binary COPY on Postgres, in batches of inserts on SQLite."""
    from shared.db import get_engine
    from shared.db.copy import HEADER_BYTES, ROW

    users = (np.repeat(np.arange(train.shape[0]), np.diff(train.indptr)) + 1).astype(np.int32)
    movies = (train.indices + 1).astype(np.int32)
    engine = get_engine()
    if engine.dialect.name != "postgresql":
        with engine.begin() as conn:
            for start in range(0, train.nnz, rows_per_batch):
                end = min(start + rows_per_batch, train.nnz)
                conn.exec_driver_sql(
                    "INSERT INTO rating (user_id, movie_id, rating, rated_at) "
                    "VALUES (?, ?, ?, ?)",
                    list(zip(users[start:end].tolist(), movies[start:end].tolist(),
                             train.data[start:end].tolist(), range(start, end), strict=True)))
        return
    rows = np.empty(train.nnz, dtype=ROW)
    rows["fields"], rows["ul"], rows["ml"], rows["vl"], rows["ol"] = 4, 4, 4, 4, 8
    rows["user_id"], rows["movie_id"] = users, movies
    rows["value"], rows["order"] = train.data, np.arange(train.nnz)
    stream = io.BytesIO(HEADER_BYTES + rows.tobytes() + b"\xff\xff")
    del rows
    raw = engine.raw_connection()
    try:
        with raw.cursor() as cursor:
            cursor.copy_expert("COPY rating (user_id, movie_id, rating, rated_at) FROM STDIN "
                               "WITH (FORMAT binary)", stream, size=8 << 20)
            cursor.execute("ANALYZE rating")
        raw.commit()
    finally:
        raw.close()


def build(workdir: Path, database_url: str, users: int, items: int, rows: int, seed: int
          ) -> dict[str, str]:
    """The snapshot and model artifacts, registered, the model promoted to champion, and
    the train interactions stored as ratings."""
    os.environ.update(environment(workdir, database_url))
    from services.registry import registry
    from shared.artifacts import csr_to_arrays, write_artifact
    from shared.db import Snapshot, migrate, session_scope
    from shared.features import Weighting
    from shared.recommenders import FactorModel

    migrate()
    train, _ = generate(users, items, rows, seed)
    clock = time.perf_counter()
    store_ratings(train)
    print(f"stored {train.nnz:,} ratings in the database in {time.perf_counter() - clock:.1f} s",
          flush=True)
    rng = np.random.default_rng(seed + 1)
    arrays = {"user_ids": np.arange(1, users + 1, dtype=np.int64),
              "item_ids": np.arange(1, items + 1, dtype=np.int64),
              "genre_names": np.array(GENRES, dtype=np.str_),
              "item_genres": rng.random((items, len(GENRES))) < 0.2,
              "item_train_count": np.diff(train.tocsc().indptr).astype(np.int64),
              **csr_to_arrays("train", train)}
    snapshot = write_artifact("snapshots", arrays, {"kind": "snapshot", "synthetic": True})
    snapshot_id = f"bench-batch-{snapshot.sha256[:16]}"
    with session_scope() as session:
        session.add(Snapshot(id=snapshot_id, ratings_fingerprint=snapshot.sha256,
                             protocol="random", params={"synthetic": True},
                             counts={"users": users, "items": items, "train": int(train.nnz)},
                             artifact_path=snapshot.path, sha256=snapshot.sha256))
    scale = 1.0 / np.sqrt(FACTORS)
    model = FactorModel("als", Weighting(),
                        (rng.standard_normal((users, FACTORS)) * scale).astype(np.float32),
                        (rng.standard_normal((items, FACTORS)) * scale).astype(np.float32),
                        0.01, 1.0)
    artifact = write_artifact("models", {**model.to_arrays(), "user_ids": arrays["user_ids"],
                                         "item_ids": arrays["item_ids"]}, {"kind": "model"})
    version = registry.register(snapshot_id, "als", {"synthetic": True}, artifact.path,
                                artifact.sha256)["version"]
    registry.promote(version, reason="batch benchmark")
    return {"snapshot": snapshot.path, "snapshot_sha": snapshot.sha256,
            "model": artifact.path, "model_sha": artifact.sha256, "nnz": str(train.nnz)}


def stage(mode: str, refs: dict[str, str], workdir: Path) -> dict[str, float]:
    """One measurement, in this (fresh) process."""
    from services.eval.batch import recommend_batch
    from shared.artifacts import arrays_to_csr, read_artifact

    started = time.perf_counter()
    result: dict[str, float] = {}
    if mode == "bare":
        model, _ = read_artifact(refs["model"], refs["model_sha"])
        snapshot, _ = read_artifact(refs["snapshot"], refs["snapshot_sha"])
        user_factors, item_factors = model["user_factors"], model["item_factors"]
        train = arrays_to_csr("train", snapshot)
        bare_top_k(user_factors, item_factors, train, np.arange(user_factors.shape[0]), K,
                   ordered=True)
        result["rows"] = float(user_factors.shape[0] * K)
    else:
        summary = recommend_batch("all", K, workdir / "batch.parquet")
        result["rows"] = float(summary["rows"])
        result["users"] = float(summary["users"])
    result["seconds"] = time.perf_counter() - started
    result["peak_rss_mb"] = peak_rss_mb()
    return result


def run_stage(mode: str, refs: dict[str, str], workdir: Path, database_url: str
              ) -> dict[str, float]:
    done = subprocess.run(
        [sys.executable, __file__, "--stage", mode, "--refs", json.dumps(refs),
         "--workdir", str(workdir)],
        capture_output=True, text=True,
        env={**os.environ, **environment(workdir, database_url)})
    if done.returncode != 0:
        raise SystemExit(f"{mode} stage failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratings", type=int, default=ML25M_RATINGS)
    parser.add_argument("--users", type=int, default=None,
                        help="Users (default: ml-25m's share at --ratings, 162,541 at 25M).")
    parser.add_argument("--items", type=int, default=None,
                        help="Items (default: ml-25m's share at --ratings, 59,047 at 25M).")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--database-url", default="",
                        help="A Postgres server (admin URL) to hold the registry and ratings "
                        "in a scratch database, dropped afterwards (default: embedded SQLite).")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--stage", choices=("batch", "bare"), default=None)
    parser.add_argument("--refs", default=None)
    args = parser.parse_args()
    if args.stage:
        print(json.dumps(stage(args.stage, json.loads(args.refs), args.workdir)))
        return
    if args.users is None or args.items is None:
        try:
            shape = Shape.scaled(args.ratings, args.seed)
        except ValueError as error:
            parser.error(f"--ratings {args.ratings}: {error}")
        args.users = shape.users if args.users is None else args.users
        args.items = shape.movies if args.items is None else args.items
    if min(args.users, args.items, args.ratings) < 1:
        parser.error("--users, --items and --ratings must be positive")

    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(dir=args.workdir)))
        database = (stack.enter_context(scratch_database(args.database_url, "batch"))
                    .render_as_string(hide_password=False) if args.database_url else "")
        clock = time.perf_counter()
        refs = build(workdir, database, args.users, args.items, args.ratings, args.seed)
        print(f"generated {args.users:,} users x {args.items:,} items, {int(refs['nnz']):,} "
              f"train interactions in {time.perf_counter() - clock:.1f} s")
        batch = run_stage("batch", refs, workdir, database)
        print(f"recommend --users all --k {K} to Parquet: {batch['seconds']:.2f} s, "
              f"{int(batch['rows']):,} rows, peak RSS {batch['peak_rss_mb']:.0f} MB")
        bare = run_stage("bare", refs, workdir, database)
        print(f"bare numpy top-{K} of every user: {bare['seconds']:.2f} s, peak RSS "
              f"{bare['peak_rss_mb']:.0f} MB")
        from shared.settings import get_settings

        chunk = get_settings().batch_chunk_users
        nnz = int(refs["nnz"])
        # What the batch holds beyond the interpreter: the snapshot's train split (12 bytes
        # an interaction, twice while the CSR is rebuilt), the factors, two chunks' database
        # events as read (20 bytes each: the next chunk's is read while one is scored), one
        # chunk's merge (56 bytes a cell of its train rows and events: flat keys, their
        # sort and the merged CSR), one score block of 2**24 cells ranked in place (4 bytes
        # a float32 score, 8 its argpartition index) and one chunk's rows (k x 32 bytes a
        # user). Every stored rating is one database event here.
        per_user = nnz / args.users
        bound = (24 * nnz + 4 * FACTORS * (args.users + args.items)
                 + (2 * 20 + 56 * 2) * per_user * chunk
                 + 3 * 4 * (1 << 24) + 32 * K * chunk) / 2**20
        print(f"bound on batch memory beyond the interpreter: {bound:.0f} MB "
              f"(chunks of {chunk:,} users)")
        print(json.dumps({
            "users": int(batch["users"]), "rows": int(batch["rows"]),
            "seconds": round(batch["seconds"], 3), "bare_seconds": round(bare["seconds"], 3),
            "ratio": round(batch["seconds"] / bare["seconds"], 3),
            "peak_rss_mb": round(batch["peak_rss_mb"], 1)}))


if __name__ == "__main__":
    main()
