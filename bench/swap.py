"""Serve loads and hot-swaps a MovieLens-25M-scale model under load, with no failed request.

In one run, on a scratch database with the real Postgres, RabbitMQ (a virtual host of the
run's own) and Redis:
1. two 64-factor ALS models of ML-25M's shape (162,541 users x 59,047 items; the snapshot's
   train split holds `--ratings` x 0.75 interactions) are written as artifacts on one
   snapshot and registered; the first is promoted;
2. `recsys serve --workers W` starts: load seconds from start to ready, and each worker's
   resident memory serving it;
3. wrk drives `GET /recommendations/{user}` over many users (mostly cache misses) while the
   second model is promoted: the swap's seconds until every worker answers with it, the
   peak resident memory of any worker during the swap, and every non-2xx or socket error.
Baselines from the same run: the bare read of the same artifacts (np.load and sha256 of both
files) against serve's load, and the arrays' own size against each worker's memory.
Last line, one JSON object: {"users", "items", "workers", "model_mb", "load_seconds",
"bare_load_seconds", "load_ratio", "rss_per_worker_mb", "rss_ratio", "swap_seconds",
"peak_swap_rss_mb", "requests", "failed"}.

    python bench/swap.py [--ratings N] [--workers W] [--duration S]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import psycopg2

from bench.common import (
    configure_environment,
    libpq_dsn,
    scratch_database,
    session_pids,
    wait_until,
)
from bench.evaluate import generate
from bench.loop import DEFAULT_ADMIN_URL, DEFAULT_BROKER_URL, DEFAULT_REDIS_URL, private_vhost
from bench.serve import (
    API_KEY,
    ensure_wrk,
    free_port,
    lua_script,
    recsys_command,
    run_wrk,
    serving_version,
    start_child,
)

USERS, ITEMS, FACTORS = 162_541, 59_047, 64
GENRES = ("Action", "Comedy", "Drama", "Romance", "Thriller")
LUA_USERS = r"""
function request()
  local c = next_count()
  return wrk.format("GET", "/recommendations/" .. (1 + (c * 7919) % NUSERS) .. "?k=10")
end
"""


def status_kib(pid: int, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def worker_pids(sid: int) -> list[int]:
    """uvicorn's worker processes (spawned by multiprocessing) in serve's session."""
    found = []
    for pid in session_pids(sid):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if pid != sid and b"spawn_main" in command:
            found.append(pid)
    return found


def build_models(users: int, items: int, ratings: int, database_url: str, seed: int
                 ) -> tuple[list[int], list[tuple[str, str]], int]:
    """A snapshot and two ALS models of that shape, registered; the first promoted.
    Returns (versions, [(path, sha256)] of the first model and the snapshot, array bytes)."""
    from services.registry import registry
    from shared.artifacts import csr_to_arrays, write_artifact
    from shared.db import Snapshot, session_scope
    from shared.db.session import get_engine
    from shared.features import Weighting
    from shared.recommenders import FactorModel

    train, _ = generate(users, items, ratings, seed)
    rng = np.random.default_rng(seed)
    user_ids = np.arange(1, users + 1, dtype=np.int64)
    item_ids = np.arange(1, items + 1, dtype=np.int64)
    genres = rng.random((items, len(GENRES))) < 0.2
    snap = write_artifact("snapshots", {
        **csr_to_arrays("train", train), "user_ids": user_ids, "item_ids": item_ids,
        "genre_names": np.array(GENRES, dtype=np.str_), "item_genres": genres,
        "item_train_count": np.diff(train.tocsc().indptr).astype(np.int64)},
        {"kind": "snapshot", "synthetic": True})
    snapshot_id = f"bench-swap-{snap.sha256[:16]}"
    with session_scope() as session:
        session.add(Snapshot(id=snapshot_id, ratings_fingerprint=snap.sha256,
                             protocol="random", params={"synthetic": True},
                             counts={"users": users, "items": items, "train": int(train.nnz)},
                             artifact_path=snap.path, sha256=snap.sha256))
    lines = io.StringIO()
    for index in range(items):
        joined = "|".join(g for g, on in zip(GENRES, genres[index], strict=True) if on)
        lines.write(f"{index + 1}\tSynthetic movie {index + 1}\t{joined}\n")
    lines.seek(0)
    conn = psycopg2.connect(libpq_dsn(get_engine().url))
    try:
        with conn.cursor() as cursor:
            cursor.copy_expert("COPY movie (id, title, genres) FROM STDIN", lines)
        conn.commit()
    finally:
        conn.close()
    versions, refs, model_bytes = [], [], 0
    for copy in range(2):
        scale = 1.0 / np.sqrt(FACTORS)
        model = FactorModel("als", Weighting(),
                            (rng.standard_normal((users, FACTORS)) * scale).astype(np.float32),
                            (rng.standard_normal((items, FACTORS)) * scale).astype(np.float32),
                            0.01, 1.0)
        arrays = {**model.to_arrays(), "user_ids": user_ids, "item_ids": item_ids}
        model_bytes = sum(np.asarray(a).nbytes for a in arrays.values())
        ref = write_artifact("models", arrays, {"kind": "model", "algorithm": "als",
                                                "synthetic": True, "copy": copy})
        version = registry.register(snapshot_id, "als", {"synthetic": True, "copy": copy},
                                    ref.path, ref.sha256)["version"]
        versions.append(int(version))
        refs.append((ref.path, ref.sha256))
    registry.promote(versions[0], reason="swap benchmark")
    get_engine().dispose()
    snap_bytes = train.data.nbytes + train.indices.nbytes + train.indptr.nbytes
    return versions, [refs[0], (snap.path, snap.sha256)], model_bytes + snap_bytes


def bare_load(refs: list[tuple[str, str]], root: Path) -> float:
    """np.load of every array and a sha256 of each file, as serve's load reads them."""
    clock = time.perf_counter()
    for path, sha in refs:
        folder = root / path
        arrays_file = next(folder.glob("*.npz"))
        digest = hashlib.sha256()
        with arrays_file.open("rb") as handle:
            while chunk := handle.read(1 << 22):
                digest.update(chunk)
        if digest.hexdigest() != sha:
            raise SystemExit(f"artifact {path}: sha256 differs from the registry's")
        with np.load(arrays_file, allow_pickle=False) as data:
            _ = {name: data[name] for name in data.files}
    return time.perf_counter() - clock


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=USERS)
    parser.add_argument("--items", type=int, default=ITEMS)
    parser.add_argument("--ratings", type=int, default=25_000_095)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--duration", type=float, default=30.0,
                        help="seconds of load; the swap starts after a third of it")
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--database-url", default=os.environ.get("BENCH_DATABASE_URL",
                                                                 DEFAULT_ADMIN_URL))
    parser.add_argument("--broker-url", default=os.environ.get("BENCH_BROKER_URL",
                                                               DEFAULT_BROKER_URL))
    parser.add_argument("--redis-url", default=os.environ.get("BENCH_REDIS_URL",
                                                              DEFAULT_REDIS_URL))
    args = parser.parse_args(argv)
    wrk = ensure_wrk()
    from shared.db import migrate

    workdir = Path(tempfile.mkdtemp(prefix="recsys-bench-swap-"))
    serve = None
    try:
        with private_vhost(args.broker_url) as broker_url, \
                scratch_database(args.database_url, "swap") as url:
            database = url.render_as_string(hide_password=False)
            env = {"DATABASE_URL": database, "BROKER_URL": broker_url,
                   "REDIS_URL": args.redis_url, "DATA_PATH": str(workdir / "data"),
                   "MODEL_PATH": str(workdir / "models"), "API_KEY": API_KEY,
                   "CACHE_PREFIX": f"benchswap{uuid.uuid4().hex[:8]}",
                   "MODEL_POLL_SECONDS": "0"}
            configure_environment(env)
            migrate(database)
            clock = time.perf_counter()
            versions, refs, array_bytes = build_models(args.users, args.items, args.ratings,
                                                       database, args.seed)
            print(f"two {args.users:,} x {args.items:,} ALS models and their snapshot "
                  f"written and registered in {time.perf_counter() - clock:.1f} s "
                  f"({array_bytes / 2**20:.0f} MB of arrays to serve)", flush=True)
            bare = bare_load(refs, workdir / "models")
            port = free_port()
            base = f"http://127.0.0.1:{port}"
            clock = time.perf_counter()
            serve = start_child("serve", [*recsys_command(), "serve",
                                          "--host", "127.0.0.1", "--port", str(port),
                                          "--workers", str(args.workers)],
                                {**os.environ, **env}, workdir)
            wait_until(lambda: serving_version(base) == versions[0], 900,
                       f"serve to load v{versions[0]}", serve)
            load_seconds = time.perf_counter() - clock
            sid = serve.process.pid
            wait_until(lambda: len(worker_pids(sid)) >= args.workers, 60, "serve's workers",
                       serve)
            # Every worker has the model once each answered a request of its own.
            resident = [status_kib(pid, "VmRSS") / 1024 for pid in worker_pids(sid)]
            print(f"serve loaded v{versions[0]} in {load_seconds:.1f} s (bare read of the "
                  f"same artifacts {bare:.1f} s); resident per worker "
                  f"{', '.join(f'{r:.0f}' for r in resident)} MB", flush=True)

            script = lua_script(workdir, "users", LUA_USERS, 2, NUSERS=args.users)
            result: dict[str, object] = {}
            load = threading.Thread(target=lambda: result.update(load=run_wrk(
                wrk, "recommendations during the swap", base, script, 2, args.connections,
                args.duration)))
            load.start()
            time.sleep(args.duration / 3)
            from services.registry import registry

            peak = 0
            clock = time.perf_counter()
            registry.promote(versions[1], reason="swap benchmark: under load")
            streak = 0

            def swapped() -> bool:
                # /readyz lands on any worker: enough answers in a row naming the new
                # version mean every worker swapped.
                nonlocal peak, streak
                for pid in worker_pids(sid):
                    peak = max(peak, status_kib(pid, "VmRSS"))
                streak = streak + 1 if serving_version(base) == versions[1] else 0
                return streak >= 4 * args.workers

            wait_until(swapped, 600, f"every worker to serve v{versions[1]}", serve,
                       interval=0.1)
            swap_seconds = time.perf_counter() - clock
            while load.is_alive():
                for pid in worker_pids(sid):
                    peak = max(peak, status_kib(pid, "VmRSS"))
                time.sleep(0.1)
            load.join()
            measured = result["load"]
            failed = sum(measured.errors.values())  # type: ignore[attr-defined]
            print(measured.line(), flush=True)  # type: ignore[attr-defined]
            print(f"swap to v{versions[1]} under load: {swap_seconds:.1f} s; peak resident "
                  f"memory of a worker {peak / 1024:.0f} MB; failed requests {failed}",
                  flush=True)
    finally:
        if serve is not None:
            serve.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    rss = max(resident)
    print(json.dumps({
        "users": args.users, "items": args.items, "workers": args.workers,
        "model_mb": round(array_bytes / 2**20, 1), "load_seconds": round(load_seconds, 2),
        "bare_load_seconds": round(bare, 2), "load_ratio": round(load_seconds / bare, 2),
        "rss_per_worker_mb": round(rss, 1), "rss_ratio": round(rss / (array_bytes / 2**20), 2),
        "swap_seconds": round(swap_seconds, 2), "peak_swap_rss_mb": round(peak / 1024, 1),
        "requests": measured.requests, "failed": failed}))  # type: ignore[attr-defined]
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
