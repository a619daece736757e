"""Benchmark transform's ratings load and `train.fit` (ALS) against bare baselines.

In one run, against one Postgres server, one RabbitMQ and one Redis: generate (or reuse)
a MovieLens-25M-shaped data set, create a scratch database, migrate it with `recsys db
upgrade` and fill it with a bare COPY of the CSV files (setup, not timed). Then time

(a) load: transform's `load_ratings(engine)` (binary COPY parsed into numpy) plus the
    users x items CSR built the way snapshots build it (`IdIndex` + `interactions_csr`),
    against a bare `COPY (SELECT user_id, movie_id, rating, rated_at FROM rating) TO STDOUT
    WITH (FORMAT binary)` through psycopg2 into a sink that only counts bytes;
(b) fit: `train.fit` (ALS, 64 factors, 15 iterations) sent to a real `recsys worker train`
    process, submit to result, against a bare `implicit` CPU ALS `.fit()` of the snapshot's
    train matrix with the weighting and parameters the worker resolves, in this process.

The snapshot the worker reads is built in-process with `build_snapshot`, as the transform
worker would. Peak RSS is VmHWM: of this process around the load (reset first via
/proc/self/clear_refs) and of every process of the worker's session (Celery runs the task
in a prefork child). With --repeat > 1 the order alternates and the best time of each
counts. Human-readable lines first; the last stdout line is one JSON object: rows,
load_ratio and fit_ratio (ours / bare) and peak_rss_mb.

    python bench/train.py --ratings 2000000
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import psycopg2
import scipy.sparse as sp
import sqlalchemy.exc
from sqlalchemy import Engine, text
from sqlalchemy.engine import URL

from bench.common import (
    configure_environment,
    libpq_dsn,
    scratch_database,
    session_pids,
    verdict,
    wait_for_sole_worker,
)
from bench.datagen import DEFAULT_WORKDIR, ML25M_RATINGS, Dataset, ensure_dataset
from bench.ingest import COPY_SQL, DEFAULT_ADMIN_URL, migrate, recsys_command

DEFAULT_BROKER_URL = "amqp://guest:guest@127.0.0.1:5672//"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
MOVIES_COPY_SQL = "COPY movie (id, title, genres) FROM STDIN WITH (FORMAT csv, HEADER true)"
NO_GENRES = "(no genres listed)"  # ingest stores it as no genres; setup does the same
BARE_COLUMNS = "user_id, movie_id, rating, rated_at"  # what load_ratings selects
BARE_COPY_SQL = f"COPY (SELECT {BARE_COLUMNS} FROM rating) TO STDOUT WITH (FORMAT binary)"
# Binary COPY framing: 19-byte header, 2-byte trailer, and per row a 2-byte field count
# plus a 4-byte length before each field (int4, int4, float4, int8).
BINARY_HEADER, BINARY_TRAILER = 19, 2
BINARY_ROW = 2 + (4 + 4) + (4 + 4) + (4 + 4) + (4 + 8)
ALGORITHM = "als"
TARGET_LOAD_RATIO = 2.0
TARGET_FIT_RATIO = 1.1
POLL_SECONDS = 0.02  # task state polling; well under the seconds a fit takes
RSS_POLL_SECONDS = 0.2
# What a Postgres restart by another job on this shared machine looks like to us.
DB_ERRORS: tuple[type[BaseException], ...] = (
    psycopg2.OperationalError, psycopg2.InterfaceError,
    sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError)
DB_ATTEMPTS = 4
T = TypeVar("T")


# ---- small helpers --------------------------------------------------------------------------



def wait_for_server(database: URL, timeout: float = 180.0) -> None:
    """Block until the database accepts connections again."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            psycopg2.connect(libpq_dsn(database), connect_timeout=5).close()
            return
        except psycopg2.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(2.0)


def with_db_retries(call: Callable[[], T], what: str, database: URL,
                    engine: Engine | None = None) -> T:
    """Run `call`; if Postgres went away under it, wait for it and run it again.

    Other jobs restart the shared Postgres; an interrupted step is redone from scratch
    (every step here is idempotent), so no timing ever spans a restart.
    """
    for attempt in range(1, DB_ATTEMPTS + 1):
        try:
            return call()
        except DB_ERRORS as error:
            if attempt == DB_ATTEMPTS:
                raise
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error)
            print(f"warning: {what} interrupted ({reason}); waiting for Postgres, then redoing it")
            if engine is not None:
                engine.dispose()  # its pooled connections died with the server
            wait_for_server(database)
    raise AssertionError("unreachable")


def _status_kib(pid: int | str, key: str) -> int | None:
    """A `kB` field of /proc/<pid>/status, or None when the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def reset_peak_rss() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0); False if refused."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        return False
    return True


def own_peak_rss_mb() -> float:
    return (_status_kib("self", "VmHWM") or 0) / 1024


class SessionRssPoller:
    """Polls VmHWM of every process in a session, keeping each pid's highest value."""

    def __init__(self, sid: int, interval: float = RSS_POLL_SECONDS) -> None:
        self.sid, self.interval = sid, interval
        self.peaks_kib: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-poller", daemon=True)

    def sample(self) -> None:
        for pid in session_pids(self.sid):
            kib = _status_kib(pid, "VmHWM")
            if kib is not None:
                self.peaks_kib[pid] = max(kib, self.peaks_kib.get(pid, 0))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def peak_mb(self, main: bool) -> float:
        """Peak of the main process (main=True) or of its largest child."""
        values = [kib for pid, kib in self.peaks_kib.items() if (pid == self.sid) == main]
        return max(values, default=0) / 1024


# ---- setup ----------------------------------------------------------------------------------


def fill_database(dataset: Dataset, database: URL) -> tuple[int, float]:
    """Bare COPY of movies.csv and ratings.csv, then VACUUM and CHECKPOINT. (rows, seconds)

    VACUUM FREEZE sets the hint bits now: otherwise the first timed read of fresh rows
    would write every page back, and whichever contender went first would pay for it.
    """
    clock = time.perf_counter()
    conn = psycopg2.connect(libpq_dsn(database))
    try:
        with conn.cursor() as cursor:
            cursor.execute("TRUNCATE rating, movie")  # idempotent: a retry starts empty
            with dataset.movies_csv.open("rb") as handle:
                cursor.copy_expert(MOVIES_COPY_SQL, handle, size=1 << 20)
            cursor.execute("UPDATE movie SET genres = '' WHERE genres = %s", (NO_GENRES,))
            with dataset.ratings_csv.open("rb") as handle:
                cursor.copy_expert(COPY_SQL, handle, size=1 << 20)
            rows = cursor.rowcount
        conn.commit()
        conn.autocommit = True  # VACUUM cannot run in a transaction
        with conn.cursor() as cursor:
            cursor.execute("VACUUM (FREEZE, ANALYZE) rating, movie")
            try:
                cursor.execute("CHECKPOINT")
            except psycopg2.Error:
                pass  # not superuser: the runs are still comparable, just noisier
    finally:
        conn.close()
    if rows != dataset.shape.ratings:
        raise SystemExit(f"setup COPY loaded {rows} of {dataset.shape.ratings} ratings")
    return rows, time.perf_counter() - clock


# ---- (a) load -------------------------------------------------------------------------------


@dataclass
class LoadRun:
    """One timed load into a CSR (ours)."""

    seconds: float
    copy_s: float  # load_ratings: binary COPY parsed into a frame
    index_s: float  # IdIndex over users and items
    csr_s: float  # interactions_csr
    peak_rss_mb: float
    baseline_rss_mb: float  # RSS before the load began
    shape: tuple[int, int]
    nnz: int


@dataclass
class BareLoadRun:
    """One timed bare COPY TO STDOUT."""

    seconds: float
    rows: int
    bytes: int


class CountingSink:
    """A file-like COPY target that keeps nothing: counts bytes and write calls."""

    def __init__(self) -> None:
        self.bytes = 0
        self.writes = 0

    def write(self, data: bytes) -> int:
        self.bytes += len(data)
        self.writes += 1
        return len(data)


def time_our_load(engine: Engine, rows: int) -> LoadRun:
    """load_ratings + IdIndex + interactions_csr, as snapshots use them."""
    from services.transform.loading import load_ratings
    from shared.features import IdIndex, interactions_csr

    gc.collect()
    reset_peak_rss()
    baseline = (_status_kib("self", "VmRSS") or 0) / 1024
    clock = time.perf_counter()
    frame = load_ratings(engine)
    loaded = time.perf_counter()
    users = IdIndex.from_values(frame["user_id"])
    items = IdIndex.from_values(frame["movie_id"])
    indexed = time.perf_counter()
    matrix = interactions_csr(frame, users, items)
    done = time.perf_counter()
    peak = own_peak_rss_mb()
    if len(frame) != rows or matrix.nnz != rows:
        raise SystemExit(f"load_ratings gave {len(frame)} rows and a CSR of {matrix.nnz} "
                         f"entries; expected {rows}")
    return LoadRun(done - clock, loaded - clock, indexed - loaded, done - indexed, peak,
                   baseline, matrix.shape, matrix.nnz)


def time_bare_load(database: URL, rows: int) -> BareLoadRun:
    """The floor: psycopg2 binary COPY TO STDOUT of the same columns, bytes discarded."""
    conn = psycopg2.connect(libpq_dsn(database))  # connected outside the clock, like ours
    try:
        sink = CountingSink()
        with conn.cursor() as cursor:
            clock = time.perf_counter()
            cursor.copy_expert(BARE_COPY_SQL, sink, size=1 << 20)
            conn.commit()
            seconds = time.perf_counter() - clock
    finally:
        conn.close()
    got = (sink.bytes - BINARY_HEADER - BINARY_TRAILER) // BINARY_ROW
    if got != rows:
        raise SystemExit(f"bare COPY returned {sink.bytes} bytes = {got} rows; expected {rows}")
    return BareLoadRun(seconds, got, sink.bytes)


def time_psql_floor(database: URL) -> float | None:
    """psql's \\copy of the same query to /dev/null: the server + libpq floor, no Python."""
    psql = shutil.which("psql")
    if psql is None:
        return None
    command = f"\\copy (SELECT {BARE_COLUMNS} FROM rating) TO '/dev/null' WITH (FORMAT binary)"
    clock = time.perf_counter()
    done = subprocess.run([psql, "-X", "-q", "-d", libpq_dsn(database), "-c", command],
                          capture_output=True)
    seconds = time.perf_counter() - clock
    return seconds if done.returncode == 0 else None


def profile_interactions_csr(engine: Engine) -> dict[str, float]:
    """Seconds of each step inside interactions_csr (replayed here) for attribution."""
    from services.transform.loading import load_ratings
    from shared.features import IdIndex

    frame = load_ratings(engine)
    users = IdIndex.from_values(frame["user_id"])
    items = IdIndex.from_values(frame["movie_id"])
    steps: dict[str, float] = {}

    def timed(name: str, call: Callable[[], Any]) -> Any:
        clock = time.perf_counter()
        value = call()
        steps[name] = time.perf_counter() - clock
        return value

    timed("frame.duplicated([user, item]).any()",
          lambda: frame.duplicated(["user_id", "movie_id"]).any())
    rows = timed("users.to_index", lambda: users.to_index(frame["user_id"].to_numpy()))
    cols = timed("items.to_index", lambda: items.to_index(frame["movie_id"].to_numpy()))
    values = frame["rating"].to_numpy(dtype=np.float32)
    matrix = timed("csr_matrix((v, (r, c)))", lambda: sp.csr_matrix(
        (values, (rows, cols)), shape=(len(users), len(items))))
    timed("sort_indices", matrix.sort_indices)
    return steps


# ---- (b) fit --------------------------------------------------------------------------------


@dataclass
class WorkerFitRun:
    """One `train.fit` through the worker, submit to result."""

    seconds: float
    queued_s: float | None  # submit -> STARTED seen
    validation_s: float | None  # STARTED -> PROGRESS "fit": load snapshot, validation fit, eval
    final_s: float | None  # PROGRESS "fit" -> SUCCESS: train fit, model artifact, result
    task_seconds: float  # the result's `seconds` (fit_on_snapshot)
    log_seconds: float | None  # the worker log's "succeeded in" (the whole task body)
    result: dict[str, Any]


class TakenElsewhere(Exception):
    """Another train worker on the broker took the benchmark's task."""


@dataclass
class BareFitRun:
    """One bare implicit ALS fit."""

    seconds: float


@dataclass
class Worker:
    """A `recsys worker train` process (session leader) and its log."""

    process: subprocess.Popen[bytes]
    log: Path
    rss: SessionRssPoller
    handle: BinaryIO = field(repr=False)



# Every `recsys worker train` on a host is named `train@<host>`: a second one cannot even
# start (its pidbox queue is locked), and any other would take our tasks.
TRAIN_WORKER_CLASH = "same node name; they would also take our tasks"


def train_nodes() -> int:
    from shared.celery_app import ServiceQueue, answering_workers

    return answering_workers(ServiceQueue.TRAIN)


def purge_train_queue() -> int:
    from shared.celery_app import ServiceQueue, purge_queues

    return purge_queues(ServiceQueue.TRAIN)


def start_worker(env: dict[str, str], log: Path, wait_others: float,
                 timeout: float = 120.0, attempts: int = 3) -> Worker:
    """Start `recsys worker train` in a session of its own; wait until it answers a ping."""
    for attempt in range(1, attempts + 1):
        wait_for_sole_worker("train", wait_others, TRAIN_WORKER_CLASH, poll=5.0)
        handle = log.open("ab")
        process = subprocess.Popen([*recsys_command(), "worker", "train"], env=env,
                                   stdin=subprocess.DEVNULL, stdout=handle,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        rss = SessionRssPoller(process.pid)
        rss.start()
        worker = Worker(process, log, rss, handle)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                break
            if " ready." in log.read_text(errors="replace") and train_nodes() == 1:
                return worker
            time.sleep(0.5)
        stop_worker(worker)
        if attempt < attempts:  # most likely another train worker appeared: wait it out
            print(f"warning: recsys worker train did not come up (attempt {attempt}); "
                  f"retrying:\n{log_tail(log, 3)}")
    raise SystemExit(f"recsys worker train did not come up in {attempts} attempts:\n"
                     f"{log_tail(log)}")


def stop_worker(worker: Worker, timeout: float = 30.0) -> None:
    """SIGTERM to the worker's session (warm shutdown), SIGKILL after `timeout`."""
    worker.rss.stop()
    try:
        os.killpg(worker.process.pid, signal.SIGTERM)
        worker.process.wait(timeout=timeout)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(worker.process.pid, signal.SIGKILL)
        worker.process.wait()
    # Pool children left behind after the leader exited: kill them by session, not name.
    for pid in session_pids(worker.process.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    worker.handle.close()


def log_tail(log: Path, lines: int = 20) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def time_worker_fit(worker: Worker, snapshot: dict[str, Any], overrides: dict[str, Any],
                    timeout: float) -> WorkerFitRun:
    """Send train.fit to the worker; time submit to result, with the task's stage changes."""
    from shared.celery_app import TRANSIENT_ERRORS, app

    clock = time.perf_counter()
    result = app.send_task("train.fit", args=[snapshot],
                           kwargs={"algorithm": ALGORITHM, "params": overrides}, queue="train")
    started = progress = None
    deadline = clock + timeout
    while True:
        try:
            state = result.state  # one Redis GET; the poll costs nothing next to a fit
        except TRANSIENT_ERRORS as error:  # another job restarted Redis: keep waiting
            print(f"warning: task state unavailable ({type(error).__name__}); retrying")
            state = "UNKNOWN"
            time.sleep(1.0)
        now = time.perf_counter()
        if state == "STARTED" and started is None:
            started = now
        elif state == "PROGRESS" and progress is None:
            started = started or now
            progress = now
        elif state in {"SUCCESS", "FAILURE", "REVOKED"}:
            break
        if now > deadline:
            raise SystemExit(f"train.fit did not finish in {timeout:.0f} s:\n"
                             f"{log_tail(worker.log)}")
        if worker.process.poll() is not None:
            raise SystemExit(f"the train worker died:\n{log_tail(worker.log)}")
        time.sleep(POLL_SECONDS)
    seconds = now - clock
    if state != "SUCCESS":
        raise SystemExit(f"train.fit ended {state}: {result.info!r}\n{log_tail(worker.log)}")
    payload = result.get(timeout=30)
    text_log = worker.log.read_text(errors="replace")
    if f"train.fit[{result.id}] received" not in text_log:
        raise TakenElsewhere(f"train.fit {result.id} was run by another train worker")
    match = re.search(rf"{re.escape(result.id)}\] succeeded in ([0-9.]+)s", text_log)
    return WorkerFitRun(
        seconds,
        (started - clock) if started else None,
        (progress - started) if (progress and started) else None,
        (now - progress) if progress else None,
        float(payload["seconds"]),
        float(match.group(1)) if match else None,
        payload,
    )


def resolve_params(overrides: dict[str, Any]) -> dict[str, Any]:
    """The parameters fit_on_snapshot resolves for these overrides (settings in force)."""
    from services.train.algorithms import ALGORITHMS
    from services.train.training import default_params

    spec = ALGORITHMS[ALGORITHM]
    return spec.resolve_params({**default_params(ALGORITHM), **overrides})


def weighted_train_matrix(snapshot: dict[str, Any], params: dict[str, Any]) -> sp.csr_matrix:
    """The snapshot's train split weighted as fit_algorithm weights it (float32 first)."""
    from services.train.training import load_snapshot
    from shared.features import Weighting

    raw = load_snapshot(snapshot).matrix("train")
    _, matrix = Weighting.from_params(dict(params)).fit_transform(
        sp.csr_matrix(raw, dtype=np.float32))
    return matrix


def time_bare_fit(matrix: sp.csr_matrix, params: dict[str, Any], seed: int,
                  threads: int) -> BareFitRun:
    """implicit's CPU ALS on the weighted matrix: only `.fit()` is timed."""
    from implicit.cpu.als import AlternatingLeastSquares
    from threadpoolctl import threadpool_limits

    # One BLAS thread, as implicit itself recommends (and the product sets): its own
    # OpenMP threads already use every core.
    with threadpool_limits(1, "blas"):
        model = AlternatingLeastSquares(factors=int(params["factors"]),
                                        regularization=float(params["regularization"]),
                                        alpha=float(params["alpha"]),
                                        iterations=int(params["iterations"]),
                                        random_state=seed, num_threads=threads)
        clock = time.perf_counter()
        model.fit(matrix, show_progress=False)
        seconds = time.perf_counter() - clock
    return BareFitRun(seconds)


def profile_fit_steps(snapshot: dict[str, Any], params: dict[str, Any], seed: int,
                      threads: int) -> dict[str, float]:
    """Replay fit_on_snapshot's steps in this process, timing each (attribution only)."""
    from services.train.algorithms import fit_algorithm
    from services.train.training import load_snapshot
    from shared.artifacts import write_artifact
    from shared.recommenders import evaluate_model

    steps: dict[str, float] = {}
    clock = time.perf_counter()
    data = load_snapshot(snapshot)
    steps["load_snapshot (sha256 + npz read)"] = time.perf_counter() - clock
    pair = (data.matrix("validation_train"), data.matrix("validation_test"))
    clock = time.perf_counter()
    model = fit_algorithm(ALGORITHM, pair[0], params, seed, threads)
    steps["fit on validation_train"] = time.perf_counter() - clock
    clock = time.perf_counter()
    evaluate_model(model, pair[0], pair[1], (10,))
    steps["validation ndcg@10 (recommend every test user)"] = time.perf_counter() - clock
    clock = time.perf_counter()
    model = fit_algorithm(ALGORITHM, data.matrix("train"), params, seed, threads)
    steps["fit on train (incl. weighting)"] = time.perf_counter() - clock
    clock = time.perf_counter()
    arrays = {**model.to_arrays(), "user_ids": data.arrays["user_ids"],
              "item_ids": data.arrays["item_ids"]}
    write_artifact("models", arrays, {"kind": "model", "benchmark": "profile"})
    steps["write model artifact"] = time.perf_counter() - clock
    return steps


# ---- reporting and main ---------------------------------------------------------------------


def summarise(rows: int, ours: list[LoadRun], bare: list[BareLoadRun],
              fits: list[WorkerFitRun], bare_fits: list[BareFitRun],
              worker_rss: tuple[float, float]) -> dict[str, Any]:
    """Print the human-readable summary; return the JSON figures (best time of each)."""
    load, floor = min(ours, key=lambda r: r.seconds), min(bare, key=lambda r: r.seconds)
    fit, bare_fit = min(fits, key=lambda r: r.seconds), min(bare_fits, key=lambda r: r.seconds)
    load_ratio, fit_ratio = load.seconds / floor.seconds, fit.seconds / bare_fit.seconds
    load_rss = max(r.peak_rss_mb for r in ours)
    child_rss, main_rss = worker_rss
    peak = max(load_rss, child_rss, main_rss)
    print(f"load into CSR: {load.seconds:.2f} s (best of {len(ours)}: load_ratings "
          f"{load.copy_s:.2f} s, IdIndex {load.index_s:.2f} s, interactions_csr "
          f"{load.csr_s:.2f} s); bare COPY {floor.seconds:.2f} s (best of {len(bare)})")
    print(f"ratio load/COPY: {load_ratio:.3f} (target <= {TARGET_LOAD_RATIO}: "
          f"{verdict(load_ratio <= TARGET_LOAD_RATIO)}; load_ratings alone: "
          f"{load.copy_s / floor.seconds:.3f})")
    print(f"train.fit via worker: {fit.seconds:.2f} s (best of {len(fits)}); bare implicit fit "
          f"{bare_fit.seconds:.2f} s (best of {len(bare_fits)})")
    final = f"; final-fit stage alone: {fit.final_s / bare_fit.seconds:.3f}" \
        if fit.final_s else ""
    print(f"ratio fit/bare: {fit_ratio:.3f} (target <= {TARGET_FIT_RATIO}: "
          f"{verdict(fit_ratio <= TARGET_FIT_RATIO)}{final})")
    print(f"peak RSS: load {load_rss:.1f} MB (this process, from {load.baseline_rss_mb:.1f} MB "
          f"before), train worker pool child {child_rss:.1f} MB, worker main {main_rss:.1f} MB")
    return {"rows": rows, "load_ratio": round(load_ratio, 4), "fit_ratio": round(fit_ratio, 4),
            "peak_rss_mb": round(peak, 1)}


def _stage(value: float | None) -> str:
    return "?" if value is None else f"{value:.2f} s"


def run_load_phase(engine: Engine, database: URL, rows: int, repeat: int
                   ) -> tuple[list[LoadRun], list[BareLoadRun]]:
    """Alternating timed loads, after one untimed bare COPY that warms the caches."""
    warm = with_db_retries(lambda: time_bare_load(database, rows), "warm-up COPY", database)
    print(f"warm-up bare COPY (untimed): {warm.seconds:.2f} s, {warm.bytes / 1e6:,.1f} MB")
    with engine.connect() as conn:  # a pooled connection, so neither side pays a connect
        conn.execute(text("SELECT 1"))
    ours: list[LoadRun] = []
    bare: list[BareLoadRun] = []
    for run in range(1, repeat + 1):
        order = ("ours", "bare") if run % 2 == 1 else ("bare", "ours")
        for contender in order:
            if contender == "ours":
                ours.append(with_db_retries(lambda: time_our_load(engine, rows),
                                            "load into CSR", database, engine))
                last = ours[-1]
                print(f"run {run}: load into CSR {last.seconds:.2f} s (load_ratings "
                      f"{last.copy_s:.2f} s, IdIndex {last.index_s:.2f} s, interactions_csr "
                      f"{last.csr_s:.2f} s), CSR {last.shape[0]:,} x {last.shape[1]:,}, "
                      f"peak RSS {last.peak_rss_mb:.1f} MB")
            else:
                bare.append(with_db_retries(lambda: time_bare_load(database, rows),
                                            "bare COPY", database))
                print(f"run {run}: bare COPY TO STDOUT (binary) {bare[-1].seconds:.2f} s")
            gc.collect()
    floor = time_psql_floor(database)
    if floor is not None:
        print(f"psql \\copy of the same query to /dev/null (no Python, incl. psql start): "
              f"{floor:.2f} s")
    return ours, bare


def run_fit_phase(worker: Worker, snapshot: dict[str, Any], overrides: dict[str, Any],
                  params: dict[str, Any], seed: int, threads: int, repeat: int,
                  timeout: float, wait_others: float
                  ) -> tuple[list[WorkerFitRun], list[BareFitRun]]:
    """Alternating worker and bare fits (never at once: both use every core)."""
    matrix = weighted_train_matrix(snapshot, params)
    print(f"train matrix {matrix.shape[0]:,} x {matrix.shape[1]:,}, {matrix.nnz:,} entries, "
          f"weighting {params['weighting']}; ALS factors {params['factors']}, iterations "
          f"{params['iterations']}, regularization {params['regularization']}, alpha "
          f"{params['alpha']}, seed {seed}, {threads} threads")
    fits: list[WorkerFitRun] = []
    bare: list[BareFitRun] = []
    for run in range(1, repeat + 1):
        order = ("worker", "bare") if run % 2 == 1 else ("bare", "worker")
        for contender in order:
            if contender == "worker":
                for attempt in range(1, 4):
                    try:
                        fits.append(time_worker_fit(worker, snapshot, overrides, timeout))
                        break
                    except TakenElsewhere as error:
                        if attempt == 3:
                            raise SystemExit(f"{error}, three times; stop it and rerun") \
                                from None
                        print(f"warning: {error}; waiting for it to stop, then redoing")
                        wait_for_sole_worker("train", wait_others, TRAIN_WORKER_CLASH, poll=5.0)
                last = fits[-1]
                if last.result["params"] != params:
                    raise SystemExit(f"the worker resolved {last.result['params']}, the bare "
                                     f"fit used {params}")
                print(f"run {run}: train.fit via worker {last.seconds:.2f} s submit-to-result "
                      f"(to STARTED {_stage(last.queued_s)}; load snapshot + validation fit + "
                      f"ndcg@10 {_stage(last.validation_s)}; final fit + model artifact + "
                      f"result {_stage(last.final_s)}; task `seconds` "
                      f"{last.task_seconds:.2f}; worker log: succeeded in "
                      f"{_stage(last.log_seconds)})")
            else:
                bare.append(time_bare_fit(matrix, params, seed, threads))
                print(f"run {run}: bare implicit ALS fit {bare[-1].seconds:.2f} s")
    return fits, bare


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratings", type=int, default=ML25M_RATINGS,
                        help="ratings to generate (users and movies scale with it)")
    parser.add_argument("--seed", type=int, default=42, help="data set seed")
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR,
                        help="cache of generated data sets; scratch artifacts go below it")
    parser.add_argument("--database-url", default=DEFAULT_ADMIN_URL,
                        help="admin URL; a scratch database is created beside it")
    parser.add_argument("--broker-url", default=DEFAULT_BROKER_URL)
    parser.add_argument("--redis-url", default=DEFAULT_REDIS_URL)
    parser.add_argument("--factors", type=int, default=64)
    parser.add_argument("--iterations", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2, help="TRAIN_THREADS and bare threads")
    parser.add_argument("--repeat", type=int, default=1,
                        help="timed runs of each contender, alternating which goes first")
    parser.add_argument("--timeout", type=float, default=3600.0, help="per train.fit, seconds")
    parser.add_argument("--wait-others", type=float, default=900.0,
                        help="seconds to wait for other train workers on the broker to stop")
    parser.add_argument("--profile", action="store_true",
                        help="also replay the steps of interactions_csr and train.fit "
                             "in-process, timing each")
    args = parser.parse_args(argv)
    # A SIGTERM unwinds like Ctrl-C, so the worker is stopped and the scratch db dropped.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    repeat = max(1, args.repeat)

    clock = time.perf_counter()
    dataset, reused = ensure_dataset(args.ratings, args.seed, workdir)
    shape = dataset.shape
    print(f"data set {dataset.root}: {shape.ratings:,} ratings, {shape.users:,} users, "
          f"{shape.movies:,} movies ({'reused' if reused else 'generated'} in "
          f"{time.perf_counter() - clock:.1f} s)")

    models = Path(tempfile.mkdtemp(prefix=".train-bench-models-", dir=workdir))
    worker: Worker | None = None
    try:
        with scratch_database(args.database_url) as database:
            url = database.render_as_string(hide_password=False)
            env = {"DATABASE_URL": url, "BROKER_URL": args.broker_url,
                   "REDIS_URL": args.redis_url, "MODEL_PATH": str(models),
                   "DATA_PATH": str(workdir), "TRAIN_THREADS": str(args.threads)}
            configure_environment(env)
            from services.transform.snapshot import SnapshotParams, build_snapshot
            from shared.db.session import engine_for
            from shared.settings import get_settings

            print(f"scratch database {database.database} on {database.host}:{database.port}")
            migrate(database, workdir)
            rows, seconds = with_db_retries(lambda: fill_database(dataset, database),
                                            "setup COPY", database)
            print(f"setup: bare COPY of {rows:,} ratings + VACUUM FREEZE: {seconds:.1f} s")
            engine = engine_for(url)
            try:
                ours, bare = run_load_phase(engine, database, rows, repeat)
                if args.profile:
                    steps = with_db_retries(lambda: profile_interactions_csr(engine),
                                            "interactions_csr profile", database, engine)
                    print("profile interactions_csr: " + ", ".join(
                        f"{name} {value:.2f} s" for name, value in steps.items()))
                gc.collect()
                clock = time.perf_counter()
                snapshot = with_db_retries(
                    lambda: build_snapshot(SnapshotParams.from_settings(), engine),
                    "snapshot build", database, engine)
                counts = snapshot["counts"]
                print(f"snapshot built in-process in {time.perf_counter() - clock:.1f} s: "
                      f"train {counts['train']:,}, validation_train "
                      f"{counts['validation_train']:,} ratings, {counts['users']:,} users, "
                      f"{counts['items']:,} items")
            finally:
                engine.dispose()
            gc.collect()

            overrides = {"factors": args.factors, "iterations": args.iterations}
            params = resolve_params(overrides)
            seed = get_settings().seed
            purged = purge_train_queue()
            if purged:
                print(f"purged {purged} stale message(s) from the train queue")
            clock = time.perf_counter()
            worker = start_worker({**os.environ, **env}, models / "worker-train.log",
                                  args.wait_others)
            print(f"train worker pid {worker.process.pid} answered in "
                  f"{time.perf_counter() - clock:.1f} s")
            fits, bare_fits = run_fit_phase(worker, snapshot, overrides, params, seed,
                                            args.threads, repeat, args.timeout,
                                            args.wait_others)
            worker.rss.sample()
            worker_rss = (worker.rss.peak_mb(main=False), worker.rss.peak_mb(main=True))
            stop_worker(worker)
            worker = None
            if args.profile:
                steps = profile_fit_steps(snapshot, params, seed, args.threads)
                print("profile train.fit steps (in-process replay): " + ", ".join(
                    f"{name} {value:.2f} s" for name, value in steps.items()))
    finally:
        if worker is not None:
            stop_worker(worker)
        shutil.rmtree(models, ignore_errors=True)
    figures = summarise(shape.ratings, ours, bare, fits, bare_fits, worker_rss)
    sys.stdout.write(json.dumps(figures) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
