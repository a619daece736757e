"""The whole pipeline at MovieLens-25M size, against its bare parts, in one run.

On a generated ML-25M-shaped data set (`bench/datagen.py`), with the real Postgres,
RabbitMQ and Redis, every stage a real worker process of `recsys stack` and serve running,
each run is timed from the start of ingest until serve answers `GET /recommendations`
with the run's new champion:
- `fixed`: `--algorithms als --trials 1`;
- `default`: every default algorithm under `--tune-budget` seconds.
Each run gets a scratch database of its own, so both start from an empty registry.
In the same run, the bare parts on the same data: a bare `COPY` of ratings.csv into the
same table, a bare `implicit` ALS fit (64 factors, 15 iterations) of the same train
matrix, and a bare numpy top-10 of every test user from those factors.
Targets: fixed <= 1.5 x the bare parts; default within the budget + 1.5 x the bare parts,
no process above 12 GB. Per stage it prints wall time and peak RSS; the last line is one
JSON object: {"rows", "fixed_seconds", "bare_seconds", "fixed_ratio", "default_seconds",
"tune_budget_s", "default_within_budget", "peak_rss_mb", "champion"}.

    python bench/pipeline.py [--ratings N] [--tune-budget S] [--runs fixed,default]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx
import numpy as np
import psycopg2

from bench.common import (
    bare_top_k,
    configure_environment,
    libpq_dsn,
    scratch_database,
    session_pids,
    wait_until,
)
from bench.datagen import ML25M_RATINGS, ensure_dataset
from bench.loop import (
    DEFAULT_ADMIN_URL,
    DEFAULT_BROKER_URL,
    DEFAULT_REDIS_URL,
    SERVE,
    port_open,
    private_vhost,
)

API_KEY = "bench-pipeline-key"
ALS = {"factors": 64, "iterations": 15}
K = 10
RUNS = {"fixed": {"algorithms": ["als"], "trials": 1}, "default": {}}


def log(message: str) -> None:
    print(message, flush=True)


def _hwm_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


class Peaks:
    """Highest VmHWM seen per stack service (every process of its session)."""

    def __init__(self, sessions: dict[str, int]) -> None:
        self.sessions, self.kib = sessions, dict.fromkeys(sessions, 0)

    def sample(self) -> None:
        for name, sid in self.sessions.items():
            for pid in session_pids(sid):
                self.kib[name] = max(self.kib[name], _hwm_kib(pid))

    def mb(self, name: str) -> float:
        return self.kib.get(name, 0) / 1024


def run_once(label: str, dataset: Any, args: argparse.Namespace, broker_url: str,
             workdir: Path) -> dict[str, Any]:
    """One pipeline run on a fresh database and stack; ingest start -> served champion."""
    from recsys.stack import down, up
    from shared.celery_app import ServiceQueue, app, purge_queues
    from shared.db import migrate
    from shared.pipeline import build_chain, select_stages

    options = {"source": str(dataset.root), **RUNS[label]}
    with scratch_database(args.database_url, f"pipeline_{label}") as url:
        env = {"DATABASE_URL": url.render_as_string(hide_password=False),
               "BROKER_URL": broker_url, "REDIS_URL": args.redis_url,
               "DATA_PATH": str(workdir / label / "data"),
               "MODEL_PATH": str(workdir / label / "models"), "DATA_SOURCE": str(dataset.root),
               "API_KEY": API_KEY, "CACHE_PREFIX": f"benchpipe{uuid.uuid4().hex[:8]}",
               "ALS_RANK": str(ALS["factors"]), "ALS_ITERATIONS": str(ALS["iterations"]),
               "MODEL_POLL_SECONDS": "2", "RETRAIN_MIN_FEEDBACK": "100000000",
               "RETRAIN_LOW_WINDOWS": "1000"}
        if label == "default":
            env["TUNE_BUDGET_SECONDS"] = str(args.tune_budget)
        configure_environment(env)
        migrate(env["DATABASE_URL"])
        purge_queues()
        wait_until(lambda: not port_open(8000), 300, "port 8000 (serve) to be free")
        state = workdir / label / "stack"
        # The benchmark runs the pipeline itself: no bootstrap.
        records = up(None, state_dir=state, env=env, without=("bootstrap",))
        try:
            sessions = {r["name"]: int(r["pid"]) for r in records if r.get("pid")
                        and r.get("state") == "started"}
            peaks = Peaks(sessions)
            queues = {q.value for q in ServiceQueue}
            wait_until(lambda: queues <= {node.split("@")[0] for reply in
                                          app.control.ping(timeout=1.0) for node in reply},
                       180, "the workers to answer")
            chosen = select_stages("all", None)
            started_at = dt.datetime.now(dt.UTC)
            clock = time.perf_counter()
            result = build_chain(chosen, options).apply_async()
            nodes, node = [], result
            while node is not None:
                nodes.append(node)
                node = node.parent
            nodes.reverse()
            ended: dict[str, float] = {}
            deadline = time.monotonic() + args.timeout
            while len(ended) < len(nodes):
                peaks.sample()
                for stage, task in zip(chosen, nodes, strict=True):
                    if stage.name not in ended and task.ready():
                        task.get(propagate=True)
                        ended[stage.name] = _finished(task, started_at,
                                                      time.perf_counter() - clock)
                if time.monotonic() > deadline:
                    raise SystemExit(f"{label}: the pipeline did not finish in {args.timeout} s")
                time.sleep(0.5)
            decision = nodes[-1].get()
            champion = decision["champion"]["version"]
            wait_until(lambda: (peaks.sample() or _served(1)) == champion, 600,
                       f"serve to answer with v{champion}", interval=0.2)
            seconds = time.perf_counter() - clock
            peaks.sample()
            train = nodes[[s.name for s in chosen].index("train")].get()
        finally:
            down(state_dir=state)
            from shared.db import get_engine

            get_engine().dispose()
    previous = 0.0
    stages = []
    for stage in chosen:
        stages.append({"stage": stage.name, "seconds": round(ended[stage.name] - previous, 2)})
        previous = ended[stage.name]
    stages.append({"stage": "serve swap", "seconds": round(seconds - previous, 2)})
    service_of = {"ingest": "ingest", "transform": "transform", "train": "train",
                  "register": "registry", "evaluate": "eval", "promote": "registry",
                  "serve swap": "serve"}
    for row in stages:
        row["peak_rss_mb"] = round(peaks.mb(service_of[row["stage"]]), 1)
        log(f"{label}: {row['stage']:<10} {row['seconds']:>9.2f} s   peak RSS "
            f"{row['peak_rss_mb']:>8.1f} MB ({service_of[row['stage']]})")
    for model in train:  # what the tuning budget did to each algorithm
        tuning = model.get("tuning") or {}
        log(f"{label}: trained {model['algorithm']:<15} "
            f"{'skipped' if model.get('skipped') else 'fitted':<8}"
            f"trials {tuning.get('trials_run', 0)}/{tuning.get('trials_cap', 0)}  "
            f"share {tuning.get('allowance_seconds')} s  fit {tuning.get('fit_seconds')} s  "
            f"slack {tuning.get('slack_seconds')} s  cut: {tuning.get('cut_reason')}")
    log(f"{label}: ingest start -> serve answers v{champion} "
        f"({decision['champion']['algorithm']}): {seconds:.2f} s")
    return {"seconds": seconds, "stages": stages, "champion": decision["champion"],
            "gate": decision.get("gate"), "train": train,
            "peak_rss_mb": max(peaks.kib.values(), default=0) / 1024}


def _finished(task: Any, started_at: dt.datetime, polled: float) -> float:
    """Seconds from the start to the task's end as its result backend recorded it (the
    poll's own time when the backend has no date)."""
    done = getattr(task, "date_done", None)
    if isinstance(done, str):
        done = dt.datetime.fromisoformat(done)
    if not isinstance(done, dt.datetime):
        return polled
    done = done if done.tzinfo else done.replace(tzinfo=dt.UTC)
    return min(max((done - started_at).total_seconds(), 0.0), polled)


def _served(user: int) -> int | None:
    try:
        response = httpx.get(f"{SERVE}/recommendations/{user}?k={K}", timeout=10)
    except httpx.HTTPError:
        return None
    return response.json().get("model_version") if response.status_code == 200 else None


def bare_parts(dataset: Any, args: argparse.Namespace) -> dict[str, float]:
    """COPY of ratings.csv, implicit ALS of the train matrix, numpy top-10 of test users."""
    from implicit.cpu.als import AlternatingLeastSquares
    from threadpoolctl import threadpool_limits

    from shared.db import migrate

    parts: dict[str, float] = {}
    with scratch_database(args.database_url, "pipeline_bare") as url:
        migrate(url.render_as_string(hide_password=False))
        conn = psycopg2.connect(libpq_dsn(url))
        try:
            with conn.cursor() as cursor, open(dataset.root / "ratings.csv", "rb") as handle:
                clock = time.perf_counter()
                cursor.copy_expert("COPY rating (user_id, movie_id, rating, rated_at) FROM STDIN "
                                   "WITH (FORMAT csv, HEADER true)", handle)
                conn.commit()
                parts["copy"] = time.perf_counter() - clock
        finally:
            conn.close()
    import pandas as pd
    import scipy.sparse as sp

    frame = pd.read_csv(dataset.root / "ratings.csv", dtype={"userId": np.int32,
                        "movieId": np.int32, "rating": np.float32, "timestamp": np.int64})
    users, user_index = np.unique(frame["userId"].to_numpy(), return_inverse=True)
    items, item_index = np.unique(frame["movieId"].to_numpy(), return_inverse=True)
    rng = np.random.default_rng(args.seed)
    test_cells = rng.random(len(frame)) > 0.75
    values = frame["rating"].to_numpy()
    train = sp.csr_matrix((values[~test_cells], (user_index[~test_cells],
                                                 item_index[~test_cells])),
                          shape=(users.size, items.size))
    test = sp.csr_matrix((values[test_cells], (user_index[test_cells], item_index[test_cells])),
                         shape=(users.size, items.size))
    del frame
    with threadpool_limits(1, "blas"):
        model = AlternatingLeastSquares(factors=ALS["factors"], iterations=ALS["iterations"],
                                        random_state=args.seed)
        clock = time.perf_counter()
        model.fit(train, show_progress=False)
        parts["fit"] = time.perf_counter() - clock
    user_factors, item_factors = model.user_factors, model.item_factors
    clock = time.perf_counter()
    test_users = np.flatnonzero(np.diff(test.indptr))
    bare_top_k(user_factors, item_factors, train, test_users, K)
    parts["top10"] = time.perf_counter() - clock
    for name, seconds in parts.items():
        log(f"bare {name}: {seconds:.2f} s")
    return parts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratings", type=int, default=ML25M_RATINGS)
    parser.add_argument("--tune-budget", type=float, default=900.0)
    parser.add_argument("--runs", default="fixed,default")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--timeout", type=float, default=7200.0)
    parser.add_argument("--workdir", type=Path, default=None,
                        help="Where generated data sets are kept (reused between runs).")
    parser.add_argument("--database-url", default=os.environ.get("BENCH_DATABASE_URL",
                                                                 DEFAULT_ADMIN_URL))
    parser.add_argument("--broker-url", default=os.environ.get("BENCH_BROKER_URL",
                                                               DEFAULT_BROKER_URL))
    parser.add_argument("--redis-url", default=os.environ.get("BENCH_REDIS_URL",
                                                              DEFAULT_REDIS_URL))
    args = parser.parse_args(argv)
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    unknown = [r for r in runs if r not in RUNS]
    if unknown or not runs:
        raise SystemExit(f"--runs {args.runs!r}: runs are {', '.join(RUNS)}")

    scratch = Path(tempfile.mkdtemp(prefix="recsys-bench-pipeline-"))
    try:
        data_dir = args.workdir or scratch / "datasets"
        clock = time.perf_counter()
        dataset, reused = ensure_dataset(args.ratings, args.seed, data_dir)
        log(f"{'reused' if reused else 'generated'} {dataset.root}: {dataset.shape.ratings:,} "
            f"ratings, {dataset.shape.users:,} users, {dataset.shape.movies:,} movies "
            f"({time.perf_counter() - clock:.1f} s)")
        bare = bare_parts(dataset, args)
        bare_seconds = sum(bare.values())
        results: dict[str, dict[str, Any]] = {}
        with private_vhost(args.broker_url) as broker_url:
            for label in runs:
                results[label] = run_once(label, dataset, args, broker_url, scratch / "runs")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    log(f"bare parts: {bare_seconds:.2f} s (COPY {bare['copy']:.2f} + ALS fit "
        f"{bare['fit']:.2f} + top-{K} {bare['top10']:.2f})")
    summary: dict[str, Any] = {"rows": dataset.shape.ratings, "fixed_seconds": None,
                               "bare_seconds": round(bare_seconds, 2), "fixed_ratio": None,
                               "default_seconds": None, "tune_budget_s": args.tune_budget,
                               "default_within_budget": None}
    if "fixed" in results:
        fixed = results["fixed"]["seconds"]
        ratio = fixed / bare_seconds
        log(f"fixed: {fixed:.2f} s = {ratio:.2f} x the bare parts (target <= 1.5: "
            f"{'met' if ratio <= 1.5 else 'missed'})")
        summary.update(fixed_seconds=round(fixed, 2), fixed_ratio=round(ratio, 3))
    if "default" in results:
        default = results["default"]["seconds"]
        limit = args.tune_budget + 1.5 * bare_seconds
        within = default <= limit
        log(f"default: {default:.2f} s against budget + 1.5 x bare = {limit:.2f} s "
            f"({'met' if within else 'missed'})")
        summary.update(default_seconds=round(default, 2), default_within_budget=within)
    champion_run = results.get("default") or results[runs[-1]]
    summary["peak_rss_mb"] = round(max(r["peak_rss_mb"] for r in results.values()), 1)
    summary["champion"] = {"algorithm": champion_run["champion"]["algorithm"],
                           "version": champion_run["champion"]["version"],
                           "ndcg@10": champion_run["champion"]["metrics"].get("ndcg@10")}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
