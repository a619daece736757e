"""Benchmark `recsys serve` under load from wrk, against a bare one-Redis-GET endpoint.

In one run, against one Postgres server, one RabbitMQ and one Redis (loopback only):

1. setup (not timed): a scratch database, migrated with `recsys db upgrade`; ml-100k
   ingested, snapshotted, ALS (64 factors, a few iterations) fitted, registered and
   promoted, as tests/serve/conftest.py builds its registry;
2. `recsys serve --workers W` (a subprocess) and `uvicorn bench.bare_app:app --workers W`
   (one Redis GET of a stored real response, returned, both ways FastAPI code reads
   Redis), both on 127.0.0.1;
3. wrk (a separate process, `-t2 -c16 -d10s` by default, a Lua script reporting the
   p50/p99 from wrk's own latency histogram) drives, in turn:
   bare      GET /bare/{user} and GET /bare-async/{user} over 16 users (a sync route
             with redis-py, an async one with redis.asyncio); the faster is the floor;
   hits      GET /recommendations/{user}?k=10 over the same 16 users, pre-warmed;
   miss-100k GET /recommendations/{user}?k=..&offset=.. where every (user, k, offset) is
             new, so every request misses (history read, scoring, ranking, cache store),
             after a second of unmeasured misses on other keys (connections opened);
   miss-60k  the same after a synthetic 60,000-item x 64-factor model (ml-100k's users,
             train rows and weighting; random factors; movies rows for the new ids) is
             registered and promoted: serve hot-swaps to it (restarted if it does not);
             it also prints how many trained users shared each matrix product;
   bare-score GET /bare-score/{user}?k=..&offset=.. on the same keys, served by the bare
             app (same worker count) holding the same 60,000 x 64 float32 factors: one
             product and a top k + offset, no cache, history, feedback or exclusions;
             measured just before the 60k misses, its app stopped before they run;
   feedback  POST /feedback with a real `recsys worker ingest` storing the events, twice:
             one unique click per request, then batches of --feedback-batch clicks per
             request (the endpoint takes a JSON array); after each load the benchmark
             waits for the worker to drain and counts that load's rows (by request_id)
             in `feedback`. The JSON's feedback_events_per_s is the batched figure (the
             single-event one is printed, and is feedback_single_events_per_s).
4. impression cost: serve has no switch to turn impression logging off, so the cost is
   measured in this process: CPU seconds of `ImpressionLogger.log` plus its `flush`
   (shipping batches to the real broker) per list, over the CPU seconds serve's processes
   spent per cache-hit request during the hits run. Under CPU saturation that ratio is the
   share of throughput impressions cost.

The cache keys of the run live under a fresh CACHE_PREFIX in Redis db 14 (by default) and
are deleted afterwards; nothing else in Redis is touched. Subprocesses run in sessions of
their own and are stopped by session; the scratch database is dropped whatever happens.
wrk comes from Debian: when missing it is installed with apt-get (CI runs as root).

Human-readable lines first; the last stdout line is one JSON object: hit_rps, bare_rps,
hit_ratio, miss_p99_ms_100k, miss_p99_ms_60k_items, impression_cost,
feedback_events_per_s, feedback_lost; then feedback_single_events_per_s, feedback_batch
and, unless --latency-connections is 0, miss_p99_ms_60k_items_quiet (the same misses
with that few connections: latency without queueing) and quiet_connections; then
miss_ratio_60k and miss_p99_ratio_60k (serve's large-catalogue misses against the bare
scoring route: throughput over the route's, p99 over the route's) with miss_rps_60k,
bare_score_rps_60k and bare_score_p99_ms_60k.

    python bench/serve.py                       # 10 s per load, 60,000 items
    python bench/serve.py --duration 1 --items 2000
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import psycopg2
from sqlalchemy.engine import URL, make_url

from bench.common import (
    configure_environment,
    libpq_dsn,
    scratch_database,
    session_pids,
    verdict,
    wait_for_sole_worker,
    wait_until,
)
from bench.ingest import DEFAULT_ADMIN_URL, migrate, recsys_command

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ML100K = REPO_ROOT.parent / "shared" / "datasets" / "ml-100k"
DEFAULT_BROKER_URL = "amqp://guest:guest@127.0.0.1:5672//"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/14"
API_KEY = "bench-serve-key"
HOST = "127.0.0.1"
HIT_USERS = 16
TARGET_HIT_RATIO = 0.8
TARGET_MISS_P99_MS = 25.0
TARGET_MISS_RATIO = 0.5
TARGET_MISS_P99_RATIO = 2.0
TARGET_IMPRESSION_COST = 0.10
TARGET_FEEDBACK_RATE = 1000.0
CLK_TCK = os.sysconf("SC_CLK_TCK")
MARK = "BENCHJSON "



# ---- wrk ------------------------------------------------------------------------------------

# Shared by every script: per-thread ids from setup, a summary line from done(). wrk's
# latency histogram is in microseconds; `accepted` counts 202s where a script counts them.
LUA_COMMON = r"""
local threads = {}
local counter = 0
accepted = 0
function setup(thread)
  thread:set("id", #threads)
  thread:set("nthreads", NTHREADS)
  table.insert(threads, thread)
end
function done(summary, latency, requests)
  local ok = 0
  for _, t in ipairs(threads) do ok = ok + (t:get("accepted") or 0) end
  io.write(string.format(
    '%s{"requests":%d,"duration_us":%d,"p50_us":%d,"p99_us":%d,"max_us":%d,' ..
    '"non2xx":%d,"connect":%d,"read":%d,"write":%d,"timeout":%d,"accepted":%d}\n',
    MARK, summary.requests, summary.duration, latency:percentile(50),
    latency:percentile(99), latency.max, summary.errors.status, summary.errors.connect,
    summary.errors.read, summary.errors.write, summary.errors.timeout, ok))
end
local function next_count()
  local c = counter * nthreads + id
  counter = counter + 1
  return c
end
"""

LUA_CYCLE = r"""
local users = {USERS}
function request()
  local c = next_count()
  return wrk.format("GET", PREFIX .. users[(c % #users) + 1] .. "?k=10")
end
"""

# Every (user, k, offset) once: users vary fastest, then k in 5..50, then offset in 0..9
# (943 x 46 x 10 = 433,780 lists). Measured loads start at 0 and 200,000, the warm-ups at
# WARM_START.
WARM_START = 400_000
LUA_MISS = r"""
local users = {USERS}
function request()
  local c = next_count() + START
  local rest = math.floor(c / #users)
  local k = 5 + rest % 46
  local offset = math.floor(rest / 46) % 10
  return wrk.format("GET", PREFIX .. users[(c % #users) + 1] .. "?k=" .. k ..
                    "&offset=" .. offset)
end
"""

# BATCH events per request: one JSON object when 1, else an array; `accepted` counts events.
LUA_FEEDBACK = r"""
local headers = {["Content-Type"] = "application/json", ["X-API-Key"] = "APIKEY"}
local function event(c)
  return string.format('{"user_id":%d,"movie_id":%d,"type":"click","request_id":"TAG-%d"}',
                       1 + c % NUSERS, 1 + c % NMOVIES, c)
end
function request()
  local c = next_count() * BATCH
  local body = event(c)
  if BATCH > 1 then
    local events = {}
    for i = 0, BATCH - 1 do events[#events + 1] = event(c + i) end
    body = "[" .. table.concat(events, ",") .. "]"
  end
  return wrk.format("POST", "/feedback", headers, body)
end
function response(status, headers, body)
  if status == 202 then accepted = accepted + BATCH end
end
"""


@dataclass
class Load:
    """One wrk run."""

    name: str
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    errors: dict[str, int]
    accepted: int
    connections: int = 0

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def events_per_s(self) -> float:
        """Accepted events per second (feedback loads count events in `accepted`)."""
        return self.accepted / self.seconds if self.seconds else 0.0

    def line(self) -> str:
        bad = {k: v for k, v in self.errors.items() if v}
        return (f"{self.name}: {self.rps:,.0f} requests/s ({self.requests:,} in "
                f"{self.seconds:.1f} s), p50 {self.p50_ms:.2f} ms, p99 {self.p99_ms:.2f} ms, "
                f"max {self.max_ms:.1f} ms" + (f", errors {bad}" if bad else ""))


def ensure_wrk() -> str:
    """wrk's path; installed from Debian with apt-get when missing (CI runs as root)."""
    found = shutil.which("wrk")
    if found:
        return found
    print("wrk not found: installing it with apt-get (Debian package `wrk`)")
    subprocess.run(["apt-get", "update", "-qq"], check=False, capture_output=True)
    done = subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], capture_output=True,
                          text=True, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    found = shutil.which("wrk")
    if not found:
        raise SystemExit(f"wrk is missing and apt-get could not install it:\n{done.stderr}")
    return found


def lua_script(folder: Path, name: str, body: str, threads: int, **values: Any) -> Path:
    text = LUA_COMMON.replace("NTHREADS", str(threads)) + body
    for key, value in values.items():
        text = text.replace(key, str(value))
    text = text.replace("MARK", json.dumps(MARK))
    path = folder / f"{name}.lua"
    path.write_text(text)
    return path


def run_wrk(wrk: str, name: str, url: str, script: Path, threads: int, connections: int,
            duration: float) -> Load:
    """wrk against one loopback URL for `duration` seconds; its summary line parsed."""
    seconds = max(1, round(duration))
    threads = max(1, min(threads, connections))  # wrk needs a connection per thread
    done = subprocess.run([wrk, f"-t{threads}", f"-c{connections}", f"-d{seconds}s",
                           "--latency", "--timeout", "10s", "-s", str(script), url],
                          capture_output=True, text=True, timeout=seconds + 120)
    found = [line for line in done.stdout.splitlines() if line.startswith(MARK)]
    if done.returncode or not found:
        raise SystemExit(f"wrk failed for {name} ({done.returncode}):\n{done.stdout}\n"
                         f"{done.stderr}")
    raw = json.loads(found[-1][len(MARK):])
    return Load(name, raw["requests"], raw["duration_us"] / 1e6, raw["p50_us"] / 1e3,
                raw["p99_us"] / 1e3, raw["max_us"] / 1e3,
                {k: raw[k] for k in ("non2xx", "connect", "read", "write", "timeout")},
                raw["accepted"], connections)


# ---- processes ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def session_cpu_seconds(sid: int) -> float:
    """user + system CPU seconds of every live process of a session."""
    total = 0
    for pid in session_pids(sid):
        with suppress(OSError):
            raw = Path(f"/proc/{pid}/stat").read_text()
            fields = raw[raw.rfind(")") + 2:].split()
            total += int(fields[11]) + int(fields[12])
    return total / CLK_TCK


@dataclass
class Child:
    """A subprocess leading its own session, with its log."""

    name: str
    process: subprocess.Popen[bytes]
    log: Path
    handle: Any = field(repr=False)

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM to the session, SIGKILL to whatever is left after `timeout`."""
        with suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        for pid in session_pids(self.process.pid):
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.handle.close()


def start_child(name: str, args: list[str], env: dict[str, str], folder: Path) -> Child:
    log = folder / f"{name}.log"
    handle = log.open("ab")
    process = subprocess.Popen(args, env=env, cwd=REPO_ROOT, stdin=subprocess.DEVNULL,
                               stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
    return Child(name, process, log, handle)


def http(method: str, url: str, body: Any = None, timeout: float = 10.0
         ) -> tuple[int, bytes]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers={
        "X-API-Key": API_KEY, "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()
    except (urllib.error.URLError, OSError):
        return 0, b""



def serving_version(base: str) -> int | None:
    status, body = http("GET", f"{base}/readyz", timeout=5.0)
    if status != 200:
        return None
    return json.loads(body).get("models", {}).get("champion")


def warm_misses(wrk: str, url: str, scripts: Path, users: str, common: dict[str, Any]
                ) -> None:
    """One second of misses, not measured, on keys the measured loads never ask for:
    each worker's database and cache connections are open before the clock starts."""
    run_wrk(wrk, "warm-up misses", url, lua_script(
        scripts, "miss-warm", LUA_MISS, common["threads"], USERS=users, START=WARM_START,
        PREFIX='"/recommendations/"'), **{**common, "duration": 1})


def score_batches(base: str) -> tuple[float, float]:
    """(trained users scored, matrix products) so far, from serve's /metrics (every
    worker's samples)."""
    status, body = http("GET", f"{base}/metrics")
    found = dict.fromkeys(("_sum", "_count"), 0.0)
    for line in body.decode().splitlines() if status == 200 else ():
        for suffix in found:
            if line.startswith(f"recsys_serve_score_batch_users{suffix} "):
                found[suffix] = float(line.split()[1])
    return found["_sum"], found["_count"]


def wait_serving(base: str, version: int, child: Child, timeout: float = 120.0) -> None:
    """Until 20 answers in a row (any worker) serve `version`."""
    streak = 0

    def check() -> bool:
        nonlocal streak
        streak = streak + 1 if serving_version(base) == version else 0
        return streak >= 20

    wait_until(check, timeout, f"serve to answer with version {version}", child, 0.05)


# ---- setup ----------------------------------------------------------------------------------


def start_serve(children: list[Child], env: dict[str, str], folder: Path, workers: int,
                version: int) -> tuple[Child, str]:
    """`recsys serve --workers W` on a free port of HOST (added to `children`, so it is
    stopped with them), once it serves `version`; the child and its base URL."""
    port = free_port()
    base = f"http://{HOST}:{port}"
    serve = start_child("serve", [*recsys_command(), "serve", "--host", HOST, "--port",
                                  str(port), "--workers", str(workers), "--log-level",
                                  "warning"], env, folder)
    children.append(serve)
    wait_serving(base, version, serve)
    return serve, base



@dataclass
class Built:
    """The registered ml-100k model and what the synthetic one is made from."""

    version: int
    snapshot_id: str
    model_path: str
    model_sha: str
    snapshot_path: str
    snapshot_sha: str
    users: list[int]
    movies: int  # highest ml-100k movie id


def build_ml100k(source: Path, factors: int, iterations: int) -> Built:
    """ml-100k ingested, snapshotted, ALS fitted, registered and promoted (in-process)."""
    from services.ingest.ingest import ingest_source
    from services.registry import registry
    from services.train.training import fit_on_snapshot, load_snapshot
    from services.transform.snapshot import SnapshotParams, build_snapshot
    from shared.db.session import get_engine

    ingest_source(str(source))
    snapshot = build_snapshot(SnapshotParams.from_settings())
    data = load_snapshot(snapshot)
    fitted = fit_on_snapshot(data, "als", {"factors": factors, "iterations": iterations})
    version = registry.register(snapshot["snapshot_id"], "als", fitted["params"],
                                fitted["artifact_path"], fitted["sha256"])["version"]
    registry.promote(version, reason="serve benchmark")
    users = [int(u) for u in data.arrays["user_ids"]]
    items = np.asarray(data.arrays["item_ids"])
    get_engine().dispose()
    return Built(version, snapshot["snapshot_id"], fitted["artifact_path"], fitted["sha256"],
                 snapshot["artifact_path"], snapshot["sha256"], users, int(items.max()))


def register_synthetic(built: Built, n_items: int, factors: int, database: URL,
                       seed: int) -> tuple[int, str, str]:
    """A 60,000-item (n_items) ALS model over ml-100k's users, registered and promoted;
    (version, artifact path, sha256).

    Snapshot: ml-100k's train rows with the columns moved to movie id - 1 in a catalogue of
    movie ids 1..n_items, its genres, and Zipf-like counts for the new items. Model: the
    ml-100k model's arrays (weighting, hyper-parameters, user ids) with random factors of
    the new shape. Movies rows are added for the new ids."""
    from services.registry import registry
    from shared.artifacts import arrays_to_csr, csr_to_arrays, read_artifact, write_artifact
    from shared.db import Snapshot, session_scope
    from shared.db.session import get_engine

    rng = np.random.default_rng(seed)
    model, _ = read_artifact(built.model_path, built.model_sha)
    snap, _ = read_artifact(built.snapshot_path, built.snapshot_sha)
    old_ids = np.asarray(snap["item_ids"], dtype=np.int64)
    train = arrays_to_csr("train", snap).tocoo()
    import scipy.sparse as sp

    wide = sp.csr_matrix((train.data, (train.row, old_ids[train.col] - 1)),
                         shape=(train.shape[0], n_items))
    wide.sort_indices()
    counts = np.zeros(n_items, dtype=np.asarray(snap["item_train_count"]).dtype)
    counts[old_ids - 1] = snap["item_train_count"]
    new = np.setdiff1d(np.arange(n_items), old_ids - 1)
    counts[new] = np.minimum(rng.zipf(2.0, new.size), 500)
    old_genres = np.asarray(snap["item_genres"], dtype=bool)
    genres = rng.random((n_items, old_genres.shape[1])) < 0.12
    genres[old_ids - 1] = old_genres
    item_ids = np.arange(1, n_items + 1, dtype=np.int64)
    snap_arrays = {**csr_to_arrays("train", wide), "user_ids": snap["user_ids"],
                   "item_ids": item_ids, "genre_names": snap["genre_names"],
                   "item_train_count": counts, "item_genres": genres}
    snap_ref = write_artifact("snapshots", snap_arrays, {
        "kind": "snapshot", "synthetic": True, "based_on": built.snapshot_id,
        "items": n_items})
    snapshot_id = f"bench-synthetic-{n_items}-{snap_ref.sha256[:16]}"
    with session_scope() as session:
        session.add(Snapshot(id=snapshot_id, ratings_fingerprint=snap_ref.sha256,
                             protocol="random", params={"synthetic": True},
                             counts={"items": n_items, "train": int(wide.nnz)},
                             artifact_path=snap_ref.path, sha256=snap_ref.sha256))
    n_users = np.asarray(model["user_factors"]).shape[0]
    scale = 1.0 / np.sqrt(factors)
    model_arrays = {**model, "n_items": np.array(n_items), "item_ids": item_ids,
                    "user_factors": (rng.standard_normal((n_users, factors)) * scale
                                     ).astype(np.float32),
                    "item_factors": (rng.standard_normal((n_items, factors)) * scale
                                     ).astype(np.float32)}
    model_ref = write_artifact("models", model_arrays, {
        "kind": "model", "algorithm": "als", "synthetic": True, "snapshot_id": snapshot_id})
    # Movies for the new ids, their genres as the snapshot has them.
    names = [str(g) for g in snap["genre_names"]]
    lines = io.StringIO()
    for index in new.tolist():
        joined = "|".join(names[g] for g in np.flatnonzero(genres[index]).tolist())
        lines.write(f"{index + 1}\tSynthetic movie {index + 1}\t{joined}\n")
    lines.seek(0)
    conn = psycopg2.connect(libpq_dsn(database))
    try:
        with conn.cursor() as cursor:
            cursor.copy_expert("COPY movie (id, title, genres) FROM STDIN", lines)
        conn.commit()
    finally:
        conn.close()
    version = registry.register(snapshot_id, "als", {"synthetic": True, "items": n_items},
                                model_ref.path, model_ref.sha256)["version"]
    registry.promote(version, reason="serve benchmark: synthetic catalogue")
    get_engine().dispose()
    return int(version), model_ref.path, model_ref.sha256


# ---- ingest worker --------------------------------------------------------------------------


def ingest_nodes() -> int:
    from shared.celery_app import ServiceQueue, answering_workers

    return answering_workers(ServiceQueue.INGEST)


def purge_ingest_queue() -> int:
    from shared.celery_app import ServiceQueue, purge_queues

    return purge_queues(ServiceQueue.INGEST)


def start_ingest_worker(env: dict[str, str], folder: Path, concurrency: int,
                        wait_others: float) -> Child:
    """`recsys worker ingest` alone on the broker (another would take our events)."""
    wait_for_sole_worker("ingest", wait_others, "they would take our events")
    purged = purge_ingest_queue()
    if purged:
        print(f"purged {purged} message(s) from the ingest queue (impressions of this run's "
              "load, or stale ones)")
    worker = start_child("worker-ingest", [*recsys_command(), "worker", "ingest",
                                           "--concurrency", str(concurrency)], env, folder)
    wait_until(lambda: " ready." in worker.log.read_text(errors="replace")
               and ingest_nodes() == 1, 120, "the ingest worker to answer", worker, 0.5)
    return worker


def stored_feedback(database: URL, tag: str) -> int:
    try:
        conn = psycopg2.connect(libpq_dsn(database), connect_timeout=5)
    except psycopg2.OperationalError:
        return -1
    try:
        with conn.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM feedback WHERE request_id LIKE %s",
                           (f"{tag}-%",))
            return int(cursor.fetchone()[0])
    finally:
        conn.close()


def feedback_load(wrk: str, url: str, scripts: Path, common: dict[str, Any], database: URL,
                  tag: str, batch: int, users: int, movies: int, worker: Child,
                  drain_timeout: float) -> tuple[Load, int]:
    """POST /feedback under wrk, `batch` events per request, then wait until the ingest
    worker has stored them; (the load, accepted events not found in Postgres)."""
    load = run_wrk(wrk, f"POST /feedback, {batch} event(s) per request", url, lua_script(
        scripts, f"feedback{batch}", LUA_FEEDBACK, common["threads"], APIKEY=API_KEY, TAG=tag,
        NUSERS=users, NMOVIES=movies, BATCH=batch), **common)
    load_end = time.perf_counter()
    print(load.line() + f"; 202 Accepted: {load.accepted:,} events "
          f"({load.events_per_s:,.0f} events/s)")
    last, stalled = -1, time.monotonic()
    deadline = time.monotonic() + drain_timeout
    stored = 0
    # Requests still in flight when wrk stopped were accepted too, uncounted by wrk (up to
    # one per connection): wait until the count also stops moving.
    drained_at = load_end
    while time.monotonic() < deadline:
        stored = stored_feedback(database, tag)
        if stored != last:
            last, stalled = stored, time.monotonic()
            drained_at = time.perf_counter()
        quiet = time.monotonic() - stalled
        if stored >= load.accepted and quiet > 2.0:
            break
        if quiet > 60:
            break  # no progress for a minute: count what is there
        if not worker.alive():
            print(f"warning: the ingest worker exited:\n{worker.tail()}")
            break
        time.sleep(0.25)
    drained = drained_at - load_end
    lost = max(0, load.accepted - stored)
    end_to_end = stored / (load.seconds + drained) if stored else 0.0
    print(f"  stored: {stored:,} ({max(0, stored - load.accepted)} in flight when wrk "
          f"stopped) of {load.accepted:,} accepted, the last {drained:.1f} s after the load "
          f"ended ({end_to_end:,.0f} events/s accepted to stored); lost {lost}")
    return load, lost


# ---- impressions ----------------------------------------------------------------------------


def impression_cpu_per_list(items: bytes, version: int, lists: int, batch: int
                            ) -> tuple[float, float, float]:
    """CPU seconds per list of ImpressionLogger.log and of its flush to the real broker.
    (log s, flush s, flush wall s per list)"""
    from services.serve.feedback import send_to_ingest
    from services.serve.impressions import ImpressionLogger

    logger = ImpressionLogger(lambda chunk: send_to_ingest("ingest.impressions", "lists", chunk),
                              3600.0, batch, max_pending=lists + 1)
    ids = [secrets.token_hex(16) for _ in range(lists)]  # serve makes the id anyway
    send_to_ingest("ingest.impressions", "lists", [])  # connect outside the clock
    cpu = time.thread_time()
    for request_id in ids:
        logger.log(request_id, 1, items, version, "champion", "model")
    logged = time.thread_time() - cpu
    cpu, wall = time.thread_time(), time.perf_counter()
    sent = logger.flush()
    flushed, flush_wall = time.thread_time() - cpu, time.perf_counter() - wall
    if sent != lists:
        raise SystemExit(f"impression flush sent {sent} of {lists} lists")
    return logged / lists, flushed / lists, flush_wall / lists


# ---- profiling (optional) -------------------------------------------------------------------


def start_py_spy(py_spy: str | None, serve: Child, folder: Path, duration: float
                 ) -> tuple[subprocess.Popen[bytes], Path] | None:
    """py-spy sampling serve and its workers (collapsed stacks) during the next load."""
    if not py_spy:
        return None
    out = folder / "miss60.txt"
    process = subprocess.Popen([py_spy, "record", "--pid", str(serve.process.pid),
                                "--subprocesses", "--format", "raw", "--rate", "200",
                                "--duration", str(max(1, round(duration))), "--nonblocking",
                                "--output", str(out)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return process, out


def report_py_spy(process: subprocess.Popen[bytes], out: Path, top: int = 25) -> None:
    """Inclusive share of samples per function (stack frames), the largest first."""
    process.wait(timeout=120)
    inclusive: dict[str, int] = {}
    total = 0
    for line in out.read_text(errors="replace").splitlines() if out.exists() else []:
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        total += int(count)
        for frame in {f.split(" (")[0] + " (" + f.split(" (")[-1].split(":")[0].rsplit("/", 1)[-1]
                      + ")" for f in stack.split(";")}:
            inclusive[frame] = inclusive.get(frame, 0) + int(count)
    if not total:
        print("py-spy: no samples")
        return
    print(f"py-spy, serve workers during the {out.stem} load ({total} samples), inclusive:")
    for frame, count in sorted(inclusive.items(), key=lambda kv: -kv[1])[:top]:
        print(f"  {count / total:6.1%}  {frame}")


# ---- the run --------------------------------------------------------------------------------


def delete_prefix(redis_url: str, prefix: str) -> int:
    import redis

    client = redis.Redis.from_url(redis_url)
    deleted = 0
    try:
        batch = []
        for key in client.scan_iter(match=f"{prefix}:*", count=1000):
            batch.append(key)
            if len(batch) >= 500:
                deleted += client.delete(*batch)
                batch = []
        if batch:
            deleted += client.delete(*batch)
    finally:
        client.close()
    return deleted


def summarise(bare: Load, hit: Load, miss100: Load, miss60: Load, quiet60: Load | None,
              single: Load, batched: Load, batch: int, impression_cost: float, lost: int,
              bare_miss: Load) -> dict[str, Any]:
    quiet = ({"miss_p99_ms_60k_items_quiet": round(quiet60.p99_ms, 2),
              "quiet_connections": quiet60.connections} if quiet60 is not None else {})
    return {"hit_rps": round(hit.rps, 1), "bare_rps": round(bare.rps, 1),
            "hit_ratio": round(hit.rps / bare.rps, 3) if bare.rps else 0.0,
            "miss_p99_ms_100k": round(miss100.p99_ms, 2),
            "miss_p99_ms_60k_items": round(miss60.p99_ms, 2),
            "impression_cost": round(impression_cost, 4),
            "feedback_events_per_s": round(batched.events_per_s, 1),
            "feedback_lost": lost,
            "feedback_single_events_per_s": round(single.events_per_s, 1),
            "feedback_batch": batch, **quiet,
            "miss_ratio_60k": round(miss60.rps / bare_miss.rps, 3) if bare_miss.rps else 0.0,
            "miss_p99_ratio_60k": (round(miss60.p99_ms / bare_miss.p99_ms, 3)
                                   if bare_miss.p99_ms else 0.0),
            "miss_rps_60k": round(miss60.rps, 1), "bare_score_rps_60k": round(bare_miss.rps, 1),
            "bare_score_p99_ms_60k": round(bare_miss.p99_ms, 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per wrk load")
    parser.add_argument("--threads", type=int, default=2, help="wrk threads")
    parser.add_argument("--connections", type=int, default=16, help="wrk connections")
    parser.add_argument("--workers", type=int, default=2,
                        help="uvicorn workers of serve and of the bare app")
    parser.add_argument("--items", type=int, default=60_000,
                        help="catalogue of the synthetic model")
    parser.add_argument("--factors", type=int, default=64)
    parser.add_argument("--iterations", type=int, default=3, help="ALS iterations (ml-100k)")
    parser.add_argument("--latency-connections", type=int, default=2,
                        help="also run the misses with this few connections (latency without "
                             "queueing; 0 skips); the JSON keeps the fixed-load figures")
    parser.add_argument("--ingest-concurrency", type=int, default=1,
                        help="processes of `recsys worker ingest` (its CLI default is 1)")
    parser.add_argument("--impression-lists", type=int, default=20_000)
    parser.add_argument("--ml100k", type=Path, default=Path(os.environ.get(
        "ML100K_PATH", DEFAULT_ML100K)))
    parser.add_argument("--database-url", default=DEFAULT_ADMIN_URL,
                        help="admin URL; a scratch database is created beside it")
    parser.add_argument("--broker-url", default=DEFAULT_BROKER_URL)
    parser.add_argument("--redis-url", default=DEFAULT_REDIS_URL,
                        help="Redis for serve's cache and the bare app (keys under a fresh "
                             "prefix, deleted afterwards)")
    parser.add_argument("--feedback-batch", type=int, default=10,
                        help="events per POST /feedback in the batched load")
    parser.add_argument("--drain-timeout", type=float, default=300.0,
                        help="seconds to wait for the ingest worker to store the feedback")
    parser.add_argument("--wait-others", type=float, default=300.0,
                        help="seconds to wait for other ingest workers on the broker to stop")
    parser.add_argument("--py-spy", default=None,
                        help="path of py-spy: sample serve during the large-catalogue misses")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--workdir", type=Path, default=None,
                        help="scratch folder (artifacts, logs); a temp dir when omitted")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    for url in (args.database_url, args.broker_url, args.redis_url):
        host = make_url(url).host if url.startswith("postgres") else re.sub(
            r"^\w+://([^@/]*@)?([^:/]+).*$", r"\2", url)
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise SystemExit(f"only loopback services: {url}")
    if not (args.ml100k / "u.data").exists():
        raise SystemExit(f"ml-100k not found at {args.ml100k}; pass --ml100k")
    wrk = ensure_wrk()
    print(f"wrk {wrk}: -t{args.threads} -c{args.connections} -d{max(1, round(args.duration))}s; "
          f"{args.workers} uvicorn workers each for serve and bare; {os.cpu_count()} CPUs")

    folder = Path(tempfile.mkdtemp(prefix="bench-serve-", dir=args.workdir))
    prefix = f"bsv{secrets.token_hex(4)}"
    tag = f"bench-{secrets.token_hex(4)}"
    children: list[Child] = []
    try:
        with scratch_database(args.database_url, "serve") as database:
            url = database.render_as_string(hide_password=False)
            print(f"scratch database {database.database} on {database.host}:{database.port}")
            env = {"DATABASE_URL": url, "BROKER_URL": args.broker_url,
                   "REDIS_URL": args.redis_url, "MODEL_PATH": str(folder / "models"),
                   "DATA_PATH": str(folder / "data"), "API_KEY": API_KEY,
                   "CACHE_PREFIX": prefix, "TRAIN_THREADS": "2", "MODEL_VERSION": "latest",
                   "ENVIRONMENT": "development"}
            configure_environment(env)
            child_env = {**os.environ, **env}
            child_env.pop("PROMETHEUS_MULTIPROC_DIR", None)
            migrate(database, folder)

            clock = time.perf_counter()
            built = build_ml100k(args.ml100k, args.factors, args.iterations)
            print(f"setup: ml-100k ingested, snapshotted, ALS {args.factors} factors x "
                  f"{args.iterations} iterations fitted, version {built.version} promoted in "
                  f"{time.perf_counter() - clock:.1f} s ({len(built.users)} users)")

            serve_port, bare_port = free_port(), free_port()
            serve_url, bare_url = f"http://{HOST}:{serve_port}", f"http://{HOST}:{bare_port}"
            serve = start_child("serve", [*recsys_command(), "serve", "--host", HOST, "--port",
                                          str(serve_port), "--workers", str(args.workers),
                                          "--log-level", "warning"], child_env, folder)
            children.append(serve)
            wait_serving(serve_url, built.version, serve)

            # The bare app's value: a real response of the hit URL (same size).
            status, body = http("GET", f"{serve_url}/recommendations/{built.users[0]}?k=10")
            if status != 200:
                raise SystemExit(f"GET /recommendations answered {status}: {body[:300]!r}")
            bare_key = f"{prefix}:bare"
            import redis

            with redis.Redis.from_url(args.redis_url) as client:
                client.set(bare_key, body)
            bare = start_child("bare", [sys.executable, "-m", "uvicorn", "bench.bare_app:app",
                                        "--host", HOST, "--port", str(bare_port), "--workers",
                                        str(args.workers), "--log-level", "warning",
                                        "--no-access-log"],
                               {**child_env, "BARE_REDIS_URL": args.redis_url,
                                "BARE_KEY": bare_key}, folder)
            children.append(bare)
            wait_until(lambda: http("GET", f"{bare_url}/bare/1")[0] == 200, 60,
                       "the bare app", bare)
            print(f"response size {len(body)} bytes (k=10); serve {serve_url}, bare {bare_url}")

            hit_users = built.users[:HIT_USERS]
            for user in hit_users:  # pre-warm: the first GET stores, the next one hits
                for _ in range(2):
                    status, _ = http("GET", f"{serve_url}/recommendations/{user}?k=10")
                    if status != 200:
                        raise SystemExit(f"warming user {user}: {status}")
            users_lua = ",".join(map(str, hit_users))
            scripts = folder / "lua"
            scripts.mkdir()
            common = {"threads": args.threads, "connections": args.connections,
                      "duration": args.duration}
            for route in ("bare", "bare-async"):
                warm = lua_script(scripts, f"warm-{route}", LUA_CYCLE, args.threads,
                                  USERS=users_lua, PREFIX=f'"/{route}/"')
                run_wrk(wrk, f"warm-up {route}", bare_url, warm, **{**common, "duration": 1})
            warm = lua_script(scripts, "warm-hit", LUA_CYCLE, args.threads, USERS=users_lua,
                              PREFIX='"/recommendations/"')
            run_wrk(wrk, "warm-up hits", serve_url, warm, **{**common, "duration": 1})

            bare_loads = []
            for route, how in (("bare", "sync route, redis-py"),
                               ("bare-async", "async route, redis.asyncio")):
                bare_loads.append(run_wrk(wrk, f"bare (one Redis GET; {how})", bare_url,
                                          lua_script(scripts, route, LUA_CYCLE, args.threads,
                                                     USERS=users_lua, PREFIX=f'"/{route}/"'),
                                          **common))
                print(bare_loads[-1].line())
            bare_load = max(bare_loads, key=lambda load: load.rps)  # the faster is the floor
            cpu = session_cpu_seconds(serve.process.pid)
            hit_load = run_wrk(wrk, "cache hits", serve_url, lua_script(
                scripts, "hit", LUA_CYCLE, args.threads, USERS=users_lua,
                PREFIX='"/recommendations/"'), **common)
            hit_cpu = (session_cpu_seconds(serve.process.pid) - cpu) / max(1, hit_load.requests)
            print(hit_load.line())
            hit_met = hit_load.rps >= TARGET_HIT_RATIO * bare_load.rps
            print(f"hit/bare throughput {hit_load.rps / bare_load.rps:.3f} (target >= "
                  f"{TARGET_HIT_RATIO}: {verdict(hit_met)}); serve CPU per hit "
                  f"{hit_cpu * 1e3:.3f} ms")

            all_users = ",".join(map(str, built.users))
            warm_misses(wrk, serve_url, scripts, all_users, common)
            miss100 = run_wrk(wrk, "cache misses, ml-100k catalogue", serve_url, lua_script(
                scripts, "miss100", LUA_MISS, args.threads, USERS=all_users, START=0,
                PREFIX='"/recommendations/"'), **common)
            print(miss100.line())
            if args.latency_connections:
                quiet100 = run_wrk(wrk, f"cache misses, ml-100k, {args.latency_connections} "
                                   "connections", serve_url, lua_script(
                                       scripts, "miss100q", LUA_MISS, args.threads,
                                       USERS=all_users, START=200_000,
                                       PREFIX='"/recommendations/"'),
                                   **{**common, "connections": args.latency_connections})
                print(quiet100.line())

            clock = time.perf_counter()
            version, model_path, model_sha = register_synthetic(
                built, args.items, args.factors, database, args.seed)
            try:
                wait_serving(serve_url, version, serve, timeout=60.0)
                how = "hot-swapped"
            except SystemExit as error:
                print(f"warning: serve did not hot-swap ({error}); restarting it")
                serve.stop()
                serve = start_child("serve", [*recsys_command(), "serve", "--host", HOST,
                                              "--port", str(serve_port), "--workers",
                                              str(args.workers), "--log-level", "warning"],
                                    child_env, folder)
                children.append(serve)
                wait_serving(serve_url, version, serve)
                how = "restarted"
            print(f"synthetic model: {args.items:,} items x {args.factors} factors, version "
                  f"{version}, registered, promoted and {how} in "
                  f"{time.perf_counter() - clock:.1f} s")
            # The miss floor: the same product and top-k on the same factors, nothing else.
            bare.stop()  # the hit floor is measured; its port serves the miss floor next
            children.remove(bare)
            scorer = start_child("bare-score", [
                sys.executable, "-m", "uvicorn", "bench.bare_app:app", "--host", HOST,
                "--port", str(bare_port), "--workers", str(args.workers), "--log-level",
                "warning", "--no-access-log"], {**child_env, "BARE_REDIS_URL": args.redis_url,
                                                "BARE_KEY": bare_key, "BARE_MODEL": model_path,
                                                "BARE_MODEL_SHA": model_sha}, folder)
            children.append(scorer)
            wait_until(lambda: http("GET", f"{bare_url}/bare-score/{built.users[0]}")[0] == 200,
                       120, "the bare scoring app", scorer)
            score_script = lua_script(scripts, "bare-score", LUA_MISS, args.threads,
                                      USERS=all_users, START=0, PREFIX='"/bare-score/"')
            run_wrk(wrk, "warm-up bare scoring", bare_url, lua_script(
                scripts, "bare-score-warm", LUA_MISS, args.threads, USERS=all_users,
                START=WARM_START, PREFIX='"/bare-score/"'), **{**common, "duration": 1})
            bare_miss = run_wrk(wrk, f"bare scoring (one product, top k; {args.items:,} "
                                "items)", bare_url, score_script, **common)
            print(bare_miss.line())
            scorer.stop()  # idle, but out of serve's way
            children.remove(scorer)
            spy = start_py_spy(args.py_spy, serve, folder, args.duration)
            warm_misses(wrk, serve_url, scripts, all_users, common)
            users_before, products_before = score_batches(serve_url)
            miss60 = run_wrk(wrk, f"cache misses, {args.items:,}-item catalogue", serve_url,
                             lua_script(scripts, "miss60", LUA_MISS, args.threads,
                                        USERS=all_users, START=0,
                                        PREFIX='"/recommendations/"'), **common)
            print(miss60.line())
            miss_ratio = miss60.rps / bare_miss.rps if bare_miss.rps else 0.0
            p99_ratio = miss60.p99_ms / bare_miss.p99_ms if bare_miss.p99_ms else 0.0
            print(f"miss/bare scoring at {args.items:,} items: throughput {miss_ratio:.3f} "
                  f"(target >= {TARGET_MISS_RATIO}: {verdict(miss_ratio >= TARGET_MISS_RATIO)})"
                  f", p99 {p99_ratio:.3f} (target <= {TARGET_MISS_P99_RATIO}: "
                  f"{verdict(p99_ratio <= TARGET_MISS_P99_RATIO)})")
            users, products = (now - before for now, before in zip(
                score_batches(serve_url), (users_before, products_before), strict=True))
            if products:
                print(f"  scoring: {users:,.0f} trained users in {products:,.0f} matrix "
                      f"products ({users / products:.2f} users per product)")
            if spy is not None:
                report_py_spy(*spy)
            quiet60 = None
            if args.latency_connections:
                quiet60 = run_wrk(wrk, f"cache misses, {args.items:,} items, "
                                  f"{args.latency_connections} connections", serve_url,
                                  lua_script(scripts, "miss60q", LUA_MISS, args.threads,
                                             USERS=all_users, START=200_000,
                                             PREFIX='"/recommendations/"'),
                                  **{**common, "connections": args.latency_connections})
                print(quiet60.line())
            print(f"miss p99: {miss100.p99_ms:.2f} ms at ml-100k, {miss60.p99_ms:.2f} ms at "
                  f"{args.items:,} items with {args.connections} connections (target < "
                  f"{TARGET_MISS_P99_MS:.0f} ms at 60,000: "
                  f"{verdict(miss60.p99_ms < TARGET_MISS_P99_MS)})" + (
                      f"; {quiet60.p99_ms:.2f} ms with {args.latency_connections} "
                      f"({verdict(quiet60.p99_ms < TARGET_MISS_P99_MS)})" if quiet60 else ""))

            # Impressions: log + flush per list, in this process, against serve's CPU per hit.
            head = body.split(b'"items":', 1)[1]
            items = ",".join(re.findall(r'"movie_id":(\d+)', head.decode())).encode()
            log_s, flush_s, flush_wall = impression_cpu_per_list(
                items, built.version, args.impression_lists, 200)
            impression_cost = (log_s + flush_s) / hit_cpu if hit_cpu > 0 else 0.0
            print(f"impressions: log() {log_s * 1e6:.1f} us CPU, flush to RabbitMQ "
                  f"{flush_s * 1e6:.1f} us CPU ({flush_wall * 1e6:.1f} us wall) per list, "
                  f"batches of 200; serve CPU per hit {hit_cpu * 1e6:.0f} us -> impression "
                  f"cost {impression_cost:.1%} of hit throughput (target < "
                  f"{TARGET_IMPRESSION_COST:.0%}: "
                  f"{verdict(impression_cost < TARGET_IMPRESSION_COST)})")

            worker = start_ingest_worker(child_env, folder, args.ingest_concurrency,
                                         args.wait_others)
            children.append(worker)
            loads, lost = [], 0
            for batch in (1, args.feedback_batch):
                load, missing = feedback_load(wrk, serve_url, scripts, common, database,
                                              f"{tag}-b{batch}", batch, len(built.users),
                                              built.movies, worker, args.drain_timeout)
                loads.append(load)
                lost += missing
            single, batched = loads
            print(f"feedback target >= {TARGET_FEEDBACK_RATE:,.0f} events/s with none lost: "
                  f"{verdict(batched.events_per_s >= TARGET_FEEDBACK_RATE and lost == 0)} "
                  f"in batches of {args.feedback_batch} ({batched.events_per_s:,.0f} events/s), "
                  f"{verdict(single.events_per_s >= TARGET_FEEDBACK_RATE and lost == 0)} one "
                  f"event per request ({single.events_per_s:,.0f} events/s)")
            figures = summarise(bare_load, hit_load, miss100, miss60, quiet60, single, batched,
                                args.feedback_batch, impression_cost, lost, bare_miss)
            for child in reversed(children):
                child.stop()
            children.clear()
    finally:
        for child in reversed(children):
            with suppress(Exception):
                child.stop()
        with suppress(Exception):
            deleted = delete_prefix(args.redis_url, prefix)
            print(f"deleted {deleted} Redis keys under {prefix}:")
        shutil.rmtree(folder, ignore_errors=True)
    sys.stdout.write(json.dumps(figures) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
