"""The default pipeline on a 10,000-movie catalogue against ml-100k's, in one run.

Runs `recsys pipeline --stages all --json` on embedded defaults (SQLite, tasks in one
process, no servers), first on ml-100k (`--reference`, 1,682 movies), then on a data set
`bench/datagen.py` generates with ml-100k's size and a catalogue of `--movies` movies
(ml-latest-small's shape: 100,836 ratings of 9,742 movies by 610 users). Target: the
catalogue's run within 3x the reference's. Per run it prints the wall time, the items
the snapshot kept (movies with a rating) and the champion; the last line is one JSON
object: {"reference_seconds", "catalogue_seconds", "ratio", "reference", "catalogue"},
each of the last two with "ratings", "items", "champion", "ndcg@10" and "trained" (each
algorithm's test nDCG@10).

    python bench/catalogue.py [--reference DIR] [--ratings N] [--movies M] [--users U]
                              [--algorithms a,b] [--trials N] [--runs reference,catalogue]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd

from bench.datagen import ML25M_MAX_MOVIE_ID, ML25M_MOVIES, REPO_ROOT, Shape, generate

DEFAULT_REFERENCE = Path(os.environ.get("ML100K_PATH",
                                        REPO_ROOT.parent / "shared" / "datasets" / "ml-100k"))
TARGET_RATIO = 3.0


def log(message: str) -> None:
    print(message, flush=True)


def catalogue_shape(ratings: int, users: int, movies: int, seed: int) -> Shape:
    """`ratings` ratings by `users` users over `movies` movies, ids as sparse as ml-25m's."""
    if users <= 0 or movies <= 0:
        raise SystemExit(f"--users and --movies must be positive, got {users} and {movies}")
    max_id = max(movies, round(movies * ML25M_MAX_MOVIE_ID / ML25M_MOVIES))
    shape = Shape(ratings, users, movies, max_id, seed)
    if users * shape.user_cap < ratings:
        raise SystemExit(f"--ratings {ratings} do not fit {users} users x {movies} movies")
    return shape


def run_pipeline(source: Path, workdir: Path, options: list[str]) -> dict[str, Any]:
    """`recsys pipeline --stages all` on embedded defaults; its JSON and wall time."""
    workdir.mkdir(parents=True)
    env = {k: v for k, v in os.environ.items()
           if k not in ("DATABASE_URL", "BROKER_URL", "REDIS_URL")}
    env.update(DATA_PATH=str(workdir / "data"), MODEL_PATH=str(workdir / "models"),
               DATA_SOURCE=str(source))
    # The checkout's own code (the working directory comes first on the module path).
    command = [sys.executable, "-m", "recsys.cli", "pipeline", "--stages", "all", "--json",
               *options]
    clock = time.perf_counter()
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - clock
    if done.returncode != 0:
        raise SystemExit(f"pipeline on {source} failed ({done.returncode}):\n{done.stderr}")
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    return {"seconds": seconds, "summary": summary}


def rated(source: Path) -> tuple[int, int]:
    """Ratings and rated movies of an ml-100k (u.data) or ml-25m (ratings.csv) layout."""
    if (source / "u.data").is_file():
        movies = pd.read_csv(source / "u.data", sep="\t", usecols=[1], header=None)[1]
    else:
        movies = pd.read_csv(source / "ratings.csv", usecols=["movieId"])["movieId"]
    return len(movies), int(movies.nunique())


def describe(run: dict[str, Any], source: Path) -> dict[str, Any]:
    summary = run["summary"]
    champion = summary["champion"]
    ratings, items = rated(source)
    return {"ratings": ratings, "items": items, "champion": champion["algorithm"],
            "ndcg@10": champion["metrics"].get("ndcg@10"),
            "trained": {m["algorithm"]: m["metrics"].get("ndcg@10")
                        for m in summary.get("models", [])}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", type=Path, default=DEFAULT_REFERENCE,
                        help="The reference data set (ml-100k; default ML100K_PATH).")
    parser.add_argument("--ratings", type=int, default=100_836)
    parser.add_argument("--movies", type=int, default=9_742)
    parser.add_argument("--users", type=int, default=610)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--algorithms", default=None,
                        help="Comma-separated algorithms (default: the default list).")
    parser.add_argument("--trials", type=int, default=None)
    parser.add_argument("--runs", default="reference,catalogue",
                        help="Which runs: reference, catalogue or both (the ratio needs both).")
    args = parser.parse_args(argv)
    runs_asked = [r.strip() for r in args.runs.split(",") if r.strip()]
    if not runs_asked or set(runs_asked) - {"reference", "catalogue"}:
        raise SystemExit(f"--runs {args.runs!r}: runs are reference and catalogue")
    shape = catalogue_shape(args.ratings, args.users, args.movies, args.seed)
    if not (args.reference / "u.data").is_file():
        raise SystemExit(f"--reference {args.reference}: no u.data there (ml-100k's layout)")
    options = [*(["--algorithms", args.algorithms] if args.algorithms else []),
               *(["--trials", str(args.trials)] if args.trials else [])]

    scratch = Path(tempfile.mkdtemp(prefix="recsys-bench-catalogue-"))
    try:
        clock = time.perf_counter()
        dataset = generate(shape, scratch / shape.name)
        log(f"generated {dataset.root.name}: {shape.ratings:,} ratings, {shape.users:,} "
            f"users, {shape.movies:,} movies ({time.perf_counter() - clock:.1f} s)")
        sources = {label: source for label, source in
                   (("reference", args.reference), ("catalogue", dataset.root))
                   if label in runs_asked}
        runs = {label: run_pipeline(source, scratch / label, options)
                for label, source in sources.items()}
        described = {label: describe(runs[label], source) for label, source in sources.items()}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    for label, run in runs.items():
        log(f"{label}: {run['seconds']:.1f} s, {described[label]['items']} items, champion "
            f"{described[label]['champion']} (nDCG@10 {described[label]['ndcg@10']})")
    seconds = {label: round(run["seconds"], 2) for label, run in runs.items()}
    ratio = None
    if len(runs) == 2:
        ratio = runs["catalogue"]["seconds"] / runs["reference"]["seconds"]
        log(f"catalogue / reference: {ratio:.2f} x (target <= {TARGET_RATIO}: "
            f"{'met' if ratio <= TARGET_RATIO else 'missed'})")
    print(json.dumps({"reference_seconds": seconds.get("reference"),
                      "catalogue_seconds": seconds.get("catalogue"),
                      "ratio": None if ratio is None else round(ratio, 3), **described}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
