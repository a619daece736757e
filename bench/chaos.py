"""Fault scenarios on the real services: what a broker, database or cache restart, a
malformed request, kill -9 of a worker mid-task or the whole stack down and up costs in
lost, duplicated and failed requests.

Every outage is of a private server this run starts on a free port (tests/servers.py);
the shared Postgres only lends a scratch database and the shared Redis a key prefix.
Each scenario prints its counts; the last line is one JSON object:
{"scenarios": {name: {"sent", "accepted", "persisted", "lost", "duplicated", "5xx",
"connection_errors", "outage_s"}}, "lost_total", "duplicated_total", "5xx_total"}.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `bench` and `tests` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx
import psycopg2
from sqlalchemy.engine import make_url

from bench.common import libpq_dsn, scratch_database
from tests.servers import (
    free_port,
    private_postgres,
    private_rabbitmq,
    private_redis,
    wait_until,
)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ADMIN_URL = os.environ.get("TEST_POSTGRES_URL",
                                   "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres")
DEFAULT_REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
# ml-100k beside the checkout (or beside the folder of worktrees holding it).
DEFAULT_DATA = Path(os.environ.get("ML100K_PATH", next(
    (path for path in (ROOT.parent / "shared" / "datasets" / "ml-100k",
                       ROOT.parents[1] / "shared" / "datasets" / "ml-100k")
     if (path / "u.data").exists()), ROOT.parent / "shared" / "datasets" / "ml-100k")))
API_KEY = "chaos-key"
TAG_USER = 1_000_000  # feedback of a scenario comes from users TAG_USER + request number
# Settings of the caller's shell that must not leak into the processes a scenario starts.
CLEARED = ("DATABASE_URL", "BROKER_URL", "REDIS_URL", "API_KEY", "MODEL_VERSION",
           "WORKER_METRICS_PORT", "ENVIRONMENT", "DATA_SOURCE")


def recsys() -> list[str]:
    beside = Path(sys.executable).parent / "recsys"
    return [str(beside)] if beside.exists() else [sys.executable, "-m", "recsys.cli"]


def base_env(work: Path, **settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in CLEARED}
    env.update({"DATA_PATH": str(work / "data"), "MODEL_PATH": str(work / "models"),
                "API_KEY": API_KEY, "CACHE_PREFIX": f"chaos{uuid.uuid4().hex[:8]}",
                "IMPRESSION_FLUSH_SECONDS": "0.2", "MODEL_POLL_SECONDS": "0",
                "PYTHONPATH": str(ROOT)})
    env.update(settings)
    return env


def run(argv: list[str], env: Mapping[str, str], timeout: float = 600) -> str:
    done = subprocess.run(argv, env=dict(env), capture_output=True, text=True, timeout=timeout,
                          cwd=env["DATA_PATH"] if Path(env["DATA_PATH"]).is_dir() else None)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[-3:])} failed: {done.stderr[-3000:]}")
    return done.stdout


@contextmanager
def process(argv: list[str], env: Mapping[str, str], log: Path) -> Iterator[subprocess.Popen]:
    """A service process in a session of its own, stopped (group and all) on exit."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as handle:
        proc = subprocess.Popen(argv, env=dict(env), stdout=handle, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        yield proc
    finally:
        for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue


@contextmanager
def serve(env: Mapping[str, str], log: Path) -> Iterator[str]:
    """`recsys serve` on a free port, answering /healthz."""
    port = free_port()
    with process([*recsys(), "serve", "--host", "127.0.0.1", "--port", str(port),
                  "--workers", "1", "--log-level", "warning"], env, log) as proc:
        url = f"http://127.0.0.1:{port}"

        def up() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"serve exited: {log.read_text()[-3000:]}")
            try:
                return httpx.get(url + "/healthz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(up, 90, "serve to answer")
        yield url


@contextmanager
def ingest_worker(env: Mapping[str, str], log: Path) -> Iterator[subprocess.Popen]:
    """`recsys worker ingest`, once it says it is ready."""
    with process([*recsys(), "worker", "ingest"], env, log) as proc:
        def ready() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"ingest worker exited: {log.read_text()[-3000:]}")
            return " ready." in log.read_text(errors="replace")

        wait_until(ready, 90, "the ingest worker to be ready")
        yield proc


class Load:
    """Requests in a loop on a thread until stopped; counts answers by kind."""

    def __init__(self, request: Callable[[httpx.Client, int], httpx.Response],
                 api_key: str = API_KEY, interval: float = 0.01) -> None:
        self.request = request
        self.api_key = api_key
        self.interval = interval
        self.sent = 0
        self.accepted: list[int] = []  # request numbers answered 2xx
        self.server_errors = 0
        self.connection_errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="chaos-load", daemon=True)

    def _run(self) -> None:
        with httpx.Client(headers={"X-API-Key": self.api_key}, timeout=30) as client:
            while not self._stop.is_set():
                number = self.sent
                self.sent += 1
                try:
                    response = self.request(client, number)
                except httpx.HTTPError:
                    self.connection_errors += 1
                    time.sleep(0.05)
                    continue
                if response.status_code >= 500:
                    self.server_errors += 1
                elif response.status_code < 300:
                    self.accepted.append(number)
                time.sleep(self.interval)  # a steady trickle, not a flood, on a shared machine

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(60)


def post_feedback(url: str) -> Callable[[httpx.Client, int], httpx.Response]:
    def request(client: httpx.Client, number: int) -> httpx.Response:
        return client.post(url + "/feedback", json={"user_id": TAG_USER + number,
                                                    "movie_id": 1 + number % 1000,
                                                    "type": "click"})
    return request


def stored_per_user(database_url: str) -> dict[int, int]:
    """Feedback rows per tagged user, {} while the database does not answer."""
    try:
        conn = psycopg2.connect(libpq_dsn(make_url(database_url)), connect_timeout=3)
    except psycopg2.OperationalError:
        return {}
    try:
        with conn.cursor() as cursor:
            cursor.execute("SELECT user_id, count(*) FROM feedback WHERE user_id >= %s "
                           "GROUP BY user_id", (TAG_USER,))
            return {int(user): int(count) for user, count in cursor.fetchall()}
    finally:
        conn.close()


def drained_counts(load: Load, database_url: str, outage_s: float,
                   timeout: float = 120.0) -> dict[str, Any]:
    """Wait until every accepted event is stored (or nothing more arrives), then count."""
    accepted = {TAG_USER + n for n in load.accepted}
    deadline = time.monotonic() + timeout
    stored: dict[int, int] = {}
    while time.monotonic() < deadline:
        stored = stored_per_user(database_url)
        if accepted <= stored.keys():
            break
        time.sleep(0.5)
    return {"sent": load.sent, "accepted": len(accepted),
            "persisted": sum(1 for user in accepted if user in stored),
            "lost": sum(1 for user in accepted if user not in stored),
            "duplicated": sum(stored.get(user, 1) - 1 for user in accepted if user in stored),
            "5xx": load.server_errors, "connection_errors": load.connection_errors,
            "outage_s": round(outage_s, 2)}


def _outage(stop: Callable[[], None], start: Callable[[], None], seconds: float) -> float:
    began = time.monotonic()
    stop()
    time.sleep(seconds)
    start()
    return time.monotonic() - began


def feedback_broker_restart(admin_url: str, redis_url: str, outage: float = 3.0,
                            steady: float = 2.0) -> dict[str, Any]:
    """POST /feedback continuously while serve's RabbitMQ stops for `outage` seconds."""
    with ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="chaos-")))
        broker = stack.enter_context(private_rabbitmq())
        database = str(stack.enter_context(scratch_database(admin_url, "chaos")))
        env = base_env(work, DATABASE_URL=database, BROKER_URL=broker.url, REDIS_URL=redis_url)
        run([*recsys(), "db", "upgrade"], env)
        stack.enter_context(ingest_worker(env, work / "ingest.log"))
        url = stack.enter_context(serve(env, work / "serve.log"))
        with Load(post_feedback(url)) as load:
            time.sleep(steady)
            outage_s = _outage(broker.stop, broker.start, outage)
            time.sleep(steady)
        return drained_counts(load, database, outage_s)


def feedback_postgres_restart(admin_url: str, redis_url: str, outage: float = 3.0,
                              steady: float = 2.0) -> dict[str, Any]:
    """POST /feedback continuously while the ingest worker's Postgres stops for `outage` s."""
    del admin_url  # the database is a private cluster here: it is the one that stops
    with ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="chaos-")))
        postgres = stack.enter_context(private_postgres())
        broker = stack.enter_context(private_rabbitmq())
        env = base_env(work, DATABASE_URL=postgres.url, BROKER_URL=broker.url,
                       REDIS_URL=redis_url)
        run([*recsys(), "db", "upgrade"], env)
        stack.enter_context(ingest_worker(env, work / "ingest.log"))
        url = stack.enter_context(serve(env, work / "serve.log"))
        with Load(post_feedback(url)) as load:
            time.sleep(steady)
            outage_s = _outage(postgres.stop, postgres.start, outage)
            time.sleep(steady)
        return drained_counts(load, postgres.url, outage_s, timeout=180)


def build_champion(env: Mapping[str, str], data: Path, algorithms: str = "popular") -> None:
    """ml-100k ingested and a most-popular champion, in-process (no broker needed)."""
    embedded = {**env, "DATA_SOURCE": str(data)}
    for name in ("BROKER_URL", "REDIS_URL"):
        embedded.pop(name, None)
    run([*recsys(), "db", "upgrade"], embedded)
    run([*recsys(), "pipeline", "--stages", "all", "--algorithms", algorithms, "--trials",
         "1", "--json"], embedded, timeout=900)


def recommendations_redis_restart(admin_url: str, redis_url: str, outage: float = 3.0,
                                  steady: float = 2.0, data: Path = DEFAULT_DATA
                                  ) -> dict[str, Any]:
    """GET /recommendations continuously while serve's Redis cache stops for `outage` s."""
    del redis_url  # the cache is a private Redis here: it is the one that stops
    with ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="chaos-")))
        cache = stack.enter_context(private_redis())
        broker = stack.enter_context(private_rabbitmq())
        database = str(stack.enter_context(scratch_database(admin_url, "chaos")))
        env = base_env(work, DATABASE_URL=database, BROKER_URL=broker.url, REDIS_URL=cache.url)
        build_champion(env, data)
        url = stack.enter_context(serve(env, work / "serve.log"))

        def request(client: httpx.Client, number: int) -> httpx.Response:
            # Users repeat, so both cache hits and misses are asked for.
            return client.get(f"{url}/recommendations/{1 + number % 40}",
                              params={"k": 10, "offset": number % 3})

        with Load(request) as load:
            time.sleep(steady)
            outage_s = _outage(cache.stop, cache.start, outage)
            time.sleep(steady)
        return {"sent": load.sent, "accepted": len(load.accepted),
                "persisted": 0, "lost": 0, "duplicated": 0,
                "5xx": load.server_errors, "connection_errors": load.connection_errors,
                "outage_s": round(outage_s, 2)}


NON_FINITE = ("NaN", "Infinity", "-Infinity", "1e400", "-1e400")


def malformed_bodies() -> list[tuple[str, str, bytes | None]]:
    """(method, path, raw body) of requests no client should send."""
    event = '{{"user_id": {u}, "movie_id": {m}, "type": {t}, "value": {v}}}'
    bodies: list[tuple[str, str, bytes | None]] = []
    for number in NON_FINITE:
        bodies += [
            ("POST", "/feedback", event.format(u=1, m=1, t='"rating"', v=number).encode()),
            ("POST", "/feedback", event.format(u=number, m=1, t='"click"', v=1).encode()),
            ("POST", "/feedback",
             ("[" + event.format(u=1, m=number, t='"click"', v="null") + "]").encode()),
            ("POST", "/retrain", f'{{"trials": {number}}}'.encode()),
            ("POST", "/models/1/promote", f'{{"alias": {number}}}'.encode()),
            ("POST", "/models/1/promote", f'{{"reason": {number}}}'.encode()),
            ("POST", "/models/rollback", f'{{"alias": {number}}}'.encode()),
            ("POST", f"/models/{number}/promote", b"{}"),
            ("GET", f"/recommendations/1?k={number}", None),
            ("GET", f"/recommendations/{number}", None),
            ("GET", f"/popular?offset={number}", None),
            ("GET", f"/items/{number}/similar", None),
        ]
    wrong_types = [
        event.format(u='"abc"', m=1, t='"click"', v="null"),
        event.format(u=1.5, m=1, t='"click"', v="null"),
        event.format(u=1, m="null", t='"click"', v="null"),
        event.format(u=1, m=1, t=5, v="null"),
        event.format(u=1, m=1, t='"click"', v='"high"'),
        event.format(u=-1, m=1, t='"click"', v="null"),
        event.format(u=2**63, m=1, t='"click"', v="null"),
        '{"user_id": 1, "movie_id": 1, "type": "click", "timestamp": 1e400}',
        '{"user_id": 1, "movie_id": 1, "type": "click", "timestamp": "99999-01-01"}',
        '{"user_id": 1, "movie_id": 1, "type": "click", "request_id": "' + "x" * 5000 + '"}',
        '{"user_id": 1, "movie_id": 1, "type": "click", "extra": true}',
        "[[1, 2]]", '"a string"', "{}", "[]", "null", "{", "",
        "[" + ",".join([event.format(u=1, m=1, t='"click"', v="null")] * 200_000) + "]",
        "[" * 100_000 + "]" * 100_000,
    ]
    bodies += [("POST", "/feedback", body.encode()) for body in wrong_types]
    bodies += [("POST", "/feedback", b"\xff\xfe\x00garbage")]
    bodies += [("POST", "/retrain", body.encode()) for body in (
        '{"algorithms": "als"}', '{"algorithms": [1, 2]}', '{"algorithms": ["nope"]}',
        '{"trials": "many"}', '{"trials": -1}', '[1]', '{"algorithms": ["als", "x"]}',
        '{"algorithms": [' + ",".join(['"als"'] * 100_000)
        + "]}")]
    bodies += [("POST", "/models/1/promote", body.encode()) for body in (
        '{"alias": 5}', '{"alias": "king"}', '{"reason": ["a"]}', '[]', '{')]
    bodies += [("POST", path, b"{}") for path in (
        "/models/abc/promote", "/models/-1/promote", "/models/99999999999999999999/promote",
        "/models/0/promote")]
    bodies += [("GET", path, None) for path in (
        "/recommendations/abc", "/recommendations/0", "/recommendations/99999999999999999999",
        "/recommendations/1?k=abc", "/recommendations/1?k=-1", "/recommendations/1?k=100000000",
        "/recommendations/1?offset=-5", "/recommendations/1?exclude=abc",
        "/recommendations/1?exclude=" + ",".join(["1"] * 20_000),
        "/recommendations/1?genres=" + "x" * 5000, "/recommendations/1?genres=NoSuchGenre",
        "/recommendations/1?k=1.5", "/popular?k=abc", "/popular?genres=%00",
        "/items/abc/similar", "/items/1/similar?k=NaN", "/models/abc", "/models/NaN")]
    return bodies


def send_malformed(url: str, api_key: str = API_KEY) -> tuple[dict[str, int], list[str]]:
    """Every malformed request against the serve at `url`: counts by kind of answer, and a
    line for each that was accepted (2xx), failed (5xx) or got no answer."""
    counts = dict.fromkeys(("sent", "accepted", "5xx", "connection_errors"), 0)
    failing: list[str] = []
    with httpx.Client(headers={"X-API-Key": api_key, "Content-Type": "application/json"},
                      timeout=60) as client:
        for method, path, body in malformed_bodies():
            counts["sent"] += 1
            try:
                response = client.request(method, url + path, content=body)
            except httpx.HTTPError as error:
                counts["connection_errors"] += 1
                failing.append(f"{method} {path[:60]} -> {type(error).__name__}")
                continue
            if response.status_code >= 500:
                counts["5xx"] += 1
                failing.append(f"{method} {path[:60]} {(body or b'')[:60]!r} -> "
                               f"{response.status_code}")
            elif response.status_code < 300:
                counts["accepted"] += 1
                failing.append(f"{method} {path[:60]} {(body or b'')[:60]!r} -> "
                               f"{response.status_code} (accepted)")
    return counts, failing


def malformed_requests(admin_url: str, redis_url: str, data: Path = DEFAULT_DATA
                       ) -> dict[str, Any]:
    """Bad bodies and parameters against serve with a champion: none may answer 5xx."""
    with ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="chaos-")))
        broker = stack.enter_context(private_rabbitmq())
        database = str(stack.enter_context(scratch_database(admin_url, "chaos")))
        env = base_env(work, DATABASE_URL=database, BROKER_URL=broker.url, REDIS_URL=redis_url)
        build_champion(env, data)
        url = stack.enter_context(serve(env, work / "serve.log"))
        counts, failing = send_malformed(url)
        for line in failing:
            print(f"  malformed: {line}")
        errors = [line for line in (work / "serve.log").read_text(errors="replace").splitlines()
                  if "Error" in line and not line.startswith(" ")]
        for line in errors[-5:]:
            print(f"  serve log: {line[:200]}")
        return {"sent": counts["sent"], "accepted": counts["accepted"], "persisted": 0,
                "lost": 0, "duplicated": 0, "5xx": counts["5xx"],
                "connection_errors": counts["connection_errors"], "outage_s": 0.0}


def _versions(database_url: str) -> dict[str, int]:
    """The registry's versions by algorithm, and the champion's under "champion"."""
    conn = psycopg2.connect(libpq_dsn(make_url(database_url)))
    try:
        with conn.cursor() as cursor:
            cursor.execute("SELECT algorithm, max(version) FROM model_version GROUP BY 1")
            found = {algorithm: int(version) for algorithm, version in cursor.fetchall()}
            cursor.execute("SELECT version FROM model_alias WHERE alias = 'champion'")
            found["champion"] = int(cursor.fetchone()[0])
        return found
    finally:
        conn.close()


def recommendations_noting_versions(url: str, served: set[int]
                                    ) -> Callable[[httpx.Client, int], httpx.Response]:
    """GET /recommendations of users 1-40 in turn, each version that answered added to
    `served`."""
    def request(client: httpx.Client, number: int) -> httpx.Response:
        response = client.get(f"{url}/recommendations/{1 + number % 40}",
                              params={"k": 10, "offset": number % 3})
        if response.status_code == 200:
            served.add(int(response.json()["model_version"]))
        return response

    return request


def hot_swap_under_load(admin_url: str, redis_url: str, steady: float = 2.0,
                        data: Path = DEFAULT_DATA) -> dict[str, Any]:
    """GET /recommendations continuously while another version is promoted through serve
    (the registry worker publishes model.promoted; serve swaps models)."""
    with ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="chaos-")))
        broker = stack.enter_context(private_rabbitmq())
        database = str(stack.enter_context(scratch_database(admin_url, "chaos")))
        env = base_env(work, DATABASE_URL=database, BROKER_URL=broker.url, REDIS_URL=redis_url)
        build_champion(env, data, algorithms="popular,itemknn_cosine")
        versions = _versions(database)
        other = next(v for name, v in versions.items()
                     if name != "champion" and v != versions["champion"])
        stack.enter_context(process([*recsys(), "worker", "registry"], env,
                                    work / "registry.log"))
        url = stack.enter_context(serve(env, work / "serve.log"))
        served: set[int] = set()
        began = time.monotonic()
        with Load(recommendations_noting_versions(url, served)) as load:
            time.sleep(steady)
            with httpx.Client(headers={"X-API-Key": API_KEY}, timeout=60) as admin:
                moved = admin.post(f"{url}/models/{other}/promote", json={"reason": "chaos"})
            if moved.status_code >= 300:
                raise RuntimeError(f"promote answered {moved.status_code}: {moved.text}")
            wait_until(lambda: other in served, 60, f"serve to answer with v{other}")
            swapped = time.monotonic() - began - steady
            time.sleep(steady)
        return {"sent": load.sent, "accepted": len(load.accepted), "persisted": 0, "lost": 0,
                "duplicated": 0, "5xx": load.server_errors,
                "connection_errors": load.connection_errors,
                # No outage here: the seconds from the promote call to the new version.
                "outage_s": round(swapped, 2), "versions_served": sorted(served)}


def _count(database_url: str, sql: str) -> int:
    conn = psycopg2.connect(libpq_dsn(make_url(database_url)))
    try:
        with conn.cursor() as cursor:
            cursor.execute(sql)
            return int(cursor.fetchone()[0])
    finally:
        conn.close()


# Run in a child process on the scenario's settings (no broker: in-process), each prints
# the JSON the task to kill takes as its first argument.
_LATEST_SNAPSHOT = "from shared.pipeline import latest_snapshot; snapshot = latest_snapshot(None)"
_TRAINED = (_LATEST_SNAPSHOT + "; from services.train.training import train_many; "
            "trained = train_many(snapshot, ['popular', 'itemknn_cosine'], tune=False)")
SETUP_SNIPPETS = {
    "train": _LATEST_SNAPSHOT + "; import json; print(json.dumps(snapshot))",
    "registry": _TRAINED + "; import json; print(json.dumps(trained))",
    "eval": _TRAINED + "; from services.registry.tasks import register; "
            "import json; print(json.dumps(register(trained)))",
}


def _rows(database_url: str, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    conn = psycopg2.connect(libpq_dsn(make_url(database_url)))
    try:
        with conn.cursor() as cursor:
            cursor.execute(sql, params)
            return list(cursor.fetchall())
    finally:
        conn.close()


def one_each(made: Mapping[Any, int], expected: list[Any]) -> dict[str, int]:
    """persisted/lost/duplicated of things each expected exactly once."""
    return {"persisted": sum(1 for key in expected if made.get(key, 0) >= 1),
            "lost": sum(1 for key in expected if made.get(key, 0) == 0),
            "duplicated": sum(max(count - 1, 0) for count in made.values())}


class Hold:
    """A transaction of the scenario's own that makes the task wait on Postgres half-way
    (after its first item is committed, before its second), so the kill lands mid-task
    whatever the machine's speed; rolled back once the pool process is dead."""

    def __init__(self, database_url: str, statements: list[tuple[str, tuple[Any, ...]]]) -> None:
        self.conn = psycopg2.connect(libpq_dsn(make_url(database_url)))
        with self.conn.cursor() as cursor:
            for sql, params in statements:
                cursor.execute(sql, params)

    def release(self) -> None:
        if not self.conn.closed:
            self.conn.rollback()
            self.conn.close()


def _registry_hold(database: str, inputs: Any) -> Hold:
    # An uncommitted version 2: the task registers its first model as version 1 and commits,
    # then its second waits on the unique (name, version) index.
    return Hold(database, [(
        "INSERT INTO model_version (name, version, algorithm, params, snapshot_id, metrics, "
        "artifact_path, sha256, fit_key, created_at) VALUES ('recsys', 2, 'hold', '{}', %s, "
        "'{}', '', '', 'chaos-hold', now())", (inputs[0]["snapshot"]["snapshot_id"],))])


def _eval_hold(database: str, inputs: Any) -> Hold:
    # The second version's row locked: its figures wait, the first version's are stored.
    return Hold(database, [("SELECT 1 FROM model_version WHERE version = %s FOR UPDATE",
                            (inputs[1]["version"],))])


def _metrics(database: str) -> dict[int, Any]:
    return {int(version): metrics for version, metrics in _rows(
        database, "SELECT version, metrics FROM model_version")}


def _versions_per_algorithm(database: str) -> dict[str, int]:
    return {str(algorithm): int(count) for algorithm, count in _rows(
        database, "SELECT algorithm, count(*) FROM model_version GROUP BY 1")}


def _kill_train(database: str, inputs: Any, result: Any, before: Any) -> dict[str, int]:
    # train.tune | registry.register: one new version per algorithm, not one per attempt.
    return one_each(_versions_per_algorithm(database), ["popular", "als"])


def _kill_registry(database: str, inputs: Any, result: Any, before: Any) -> dict[str, int]:
    return one_each(_versions_per_algorithm(database), [t["algorithm"] for t in inputs])


def _kill_eval(database: str, inputs: Any, result: Any, before: Any) -> dict[str, int]:
    """Each version's figures stored once, as the completed task returned them; no version
    or alias change made besides (a second effect would be one of those)."""
    stored = _metrics(database)
    returned = {m["version"]: m["metrics"] for m in result["models"]}
    made = {version: int(all(stored[version].get(key) == value
                             for key, value in returned[version].items()))
            for version in returned}
    extra = (len(stored) - len(before)) + _count(database, "SELECT count(*) FROM alias_change")
    counts = one_each(made, list(returned))
    counts["duplicated"] += extra
    return counts


@dataclass(frozen=True)
class KillTask:
    """A task of one worker kind to kill mid-run: what it is sent, what must hold the kill
    back until it is half done, and how its effect is counted once it completes."""

    task: str
    workers: tuple[str, ...]  # the worker killed first, then any the task's chain needs
    count: Callable[[str, Any, Any, Any], dict[str, int]]
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    then: str | None = None  # a task chained after it (on its own worker)
    hold: Callable[[str, Any], Hold] | None = None
    half_done: Callable[[str, Any, Any], bool] | None = None


KILL_TASKS: dict[str, KillTask] = {
    "ingest": KillTask("ingest.load", ("ingest",), lambda db, *_: one_each(
        {"batch": _count(db, "SELECT count(*) FROM ingest_batch")}, ["batch"])),
    "transform": KillTask("transform.snapshot", ("transform",), lambda db, *_: one_each(
        {"snapshot": _count(db, "SELECT count(*) FROM snapshot")}, ["snapshot"])),
    "train": KillTask("train.tune", ("train", "registry"), _kill_train,
                      kwargs={"algorithms": ["popular", "als"], "n_trials": 4},
                      then="registry.register"),
    "registry": KillTask("registry.register", ("registry",), _kill_registry,
                         hold=_registry_hold,
                         half_done=lambda db, inputs, before: _count(
                             db, "SELECT count(*) FROM model_version") >= 1),
    "eval": KillTask("eval.offline", ("eval",), _kill_eval, hold=_eval_hold,
                     half_done=lambda db, inputs, before:
                     _metrics(db)[inputs[0]["version"]] != before[inputs[0]["version"]]),
}


def worker_killed_mid_task(admin_url: str, redis_url: str, service: str = "ingest",
                           data: Path = DEFAULT_DATA) -> dict[str, Any]:
    """SIGKILL the pool process of a `service` worker while its task runs: the task must
    be redelivered and complete once (one batch, snapshot, version per algorithm, set of
    figures: never two)."""
    from celery import Celery

    kill = KILL_TASKS[service]
    with ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="chaos-")))
        broker = stack.enter_context(private_rabbitmq())
        database = str(stack.enter_context(scratch_database(admin_url, "chaos")))
        env = base_env(work, DATABASE_URL=database, BROKER_URL=broker.url, REDIS_URL=redis_url,
                       DATA_SOURCE=str(data), TUNE_WORKERS="1")
        embedded = {k: v for k, v in env.items() if k not in ("BROKER_URL", "REDIS_URL")}
        run([*recsys(), "db", "upgrade"], embedded)
        if service != "ingest":
            run([*recsys(), "ingest", "--source", str(data)], embedded)
        if service not in ("ingest", "transform"):
            run([*recsys(), "pipeline", "--stages", "transform"], embedded)
        inputs = (json.loads(run([sys.executable, "-c", SETUP_SNIPPETS[service]],
                                 embedded).splitlines()[-1])
                  if service in SETUP_SNIPPETS else None)
        before = _metrics(database)
        log = work / f"{service}.log"
        for name in kill.workers:
            stack.enter_context(process([*recsys(), "worker", name], env, work / f"{name}.log"))
        for name in kill.workers:
            worker_log = work / f"{name}.log"
            wait_until(lambda: " ready." in worker_log.read_text(errors="replace"),  # noqa: B023
                       90, f"the {name} worker to be ready")
        hold = kill.hold(database, inputs) if kill.hold else None
        if hold is not None:
            stack.callback(hold.release)
        client = Celery("chaos", broker=broker.url, backend=redis_url)
        stack.callback(client.close)
        args = () if inputs is None else (inputs,)
        signature = client.signature(kill.task, args=args, kwargs=dict(kill.kwargs),
                                     queue=service)
        if kill.then:
            signature = signature | client.signature(kill.then,
                                                     queue=kill.then.split(".")[0])
        result = signature.apply_async()
        killed_id = result.parent.id if kill.then else result.id

        def active() -> dict[str, Any] | None:
            replies = client.control.inspect(timeout=0.5, limit=1).active() or {}
            return next((t for tasks in replies.values() for t in tasks or []
                         if t["id"] == killed_id), None)

        running = None
        deadline = time.monotonic() + 120
        while running is None and time.monotonic() < deadline:
            running = active()
        if running is None:
            raise TimeoutError(f"{kill.task} never ran on the {service} worker")
        if kill.half_done is not None:
            wait_until(lambda: kill.half_done(database, inputs, before), 120,
                       f"{kill.task} to be half done")
        killed = time.monotonic()
        os.kill(int(running["worker_pid"]), signal.SIGKILL)
        wait_until(lambda: "WorkerLostError" in log.read_text(errors="replace")
                   or "signal 9" in log.read_text(errors="replace"), 30,
                   f"the {service} worker to report its pool process lost")
        if hold is not None:
            hold.release()
        wait_until(lambda: result.state == "SUCCESS", 300,
                   f"{kill.task} to complete after the kill")
        recovered = time.monotonic() - killed
        counts = kill.count(database, inputs, result.get(timeout=10), before)
        text = log.read_text(errors="replace")
        return {"sent": 1, "accepted": 1, **counts, "5xx": 0, "connection_errors": 0,
                "outage_s": round(recovered, 2),
                "worker_lost_logged": "WorkerLostError" in text or "signal 9" in text}


def worker_killed(service: str) -> Callable[..., dict[str, Any]]:
    """The scenario of kill -9 of `service`'s worker pool process mid-task."""
    def scenario(admin_url: str, redis_url: str, data: Path = DEFAULT_DATA) -> dict[str, Any]:
        return worker_killed_mid_task(admin_url, redis_url, service, data)

    scenario.__doc__ = f"kill -9 of the {service} worker's pool process mid-task"
    return scenario


STACK_WORKERS = ("ingest", "transform", "train", "registry", "eval")
KEPT_TABLES = ("movie", "rating", "snapshot", "model_version", "model_alias", "alias_change")


@contextmanager
def stack_processes(env: Mapping[str, str], logs: Path) -> Iterator[str]:
    """Serve and one worker per service queue (the app services of `recsys stack`), ready;
    stopped on exit. Yields serve's URL."""
    with ExitStack() as stack:
        for name in STACK_WORKERS:
            stack.enter_context(process([*recsys(), "worker", name], env,
                                        logs / f"{name}.log"))
        for name in STACK_WORKERS:
            log = logs / f"{name}.log"
            wait_until(lambda: " ready." in log.read_text(errors="replace"),  # noqa: B023
                       120, f"the {name} worker to be ready")
        yield stack.enter_context(serve(env, logs / "serve.log"))


def _kept_rows(database_url: str) -> dict[str, int]:
    return {table: _count(database_url, f"SELECT count(*) FROM {table}")  # noqa: S608
            for table in KEPT_TABLES}


def _champion_served(url: str) -> int | None:
    """The version serve answers a user's list with, None while it cannot."""
    try:
        response = httpx.get(f"{url}/recommendations/1", params={"k": 5},
                             headers={"X-API-Key": API_KEY}, timeout=10)
    except httpx.HTTPError:
        return None
    return int(response.json()["model_version"]) if response.status_code == 200 else None


def whole_stack_down_up(admin_url: str, redis_url: str, steady: float = 2.0,
                        data: Path = DEFAULT_DATA) -> dict[str, Any]:
    """Feedback to a stack with a champion, then everything stopped (serve, the workers,
    Postgres, RabbitMQ, Redis: private servers here) and started again on the same data:
    every row kept, every accepted event stored once, the same champion served."""
    del admin_url, redis_url  # every server is private here: all of them stop
    with ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="chaos-")))
        postgres = stack.enter_context(private_postgres())
        broker = stack.enter_context(private_rabbitmq())
        cache = stack.enter_context(private_redis())
        env = base_env(work, DATABASE_URL=postgres.url, BROKER_URL=broker.url,
                       REDIS_URL=cache.url)
        build_champion(env, data)
        champion = _versions(postgres.url)["champion"]
        with stack_processes(env, work / "logs-1") as url:
            served_before = _champion_served(url)
            with Load(post_feedback(url)) as load:
                time.sleep(steady)
            kept_before = _kept_rows(postgres.url)
            down = time.monotonic()
        # Down without waiting for the feedback to drain: what serve accepted and has not
        # stored yet waits in its outbox or on the broker's durable queue.
        for server in (cache, broker, postgres):
            server.stop()
        for server in (postgres, broker, cache):
            server.start()
        with stack_processes(env, work / "logs-2") as url:
            wait_until(lambda: _champion_served(url) is not None, 120,
                       "serve to answer with a model again")
            outage_s = time.monotonic() - down
            served_after = _champion_served(url)
            counts = drained_counts(load, postgres.url, outage_s, timeout=180)
            kept_after = _kept_rows(postgres.url)
        changed = [table for table in KEPT_TABLES if kept_after[table] != kept_before[table]]
        return {**counts, "champion": champion, "served_before": served_before,
                "served_after": served_after, "rows_changed": changed,
                "rows_before": kept_before, "rows_after": kept_after}


SCENARIOS: dict[str, Callable[..., dict[str, Any]]] = {
    "feedback_broker_restart": feedback_broker_restart,
    "feedback_postgres_restart": feedback_postgres_restart,
    "recommendations_redis_restart": recommendations_redis_restart,
    "malformed_requests": malformed_requests,
    "hot_swap_under_load": hot_swap_under_load,
    **{f"{service}_worker_killed": worker_killed(service) for service in KILL_TASKS},
    "whole_stack_down_up": whole_stack_down_up,
}


def summary(results: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    return {"scenarios": dict(results),
            "lost_total": sum(r["lost"] for r in results.values()),
            "duplicated_total": sum(r["duplicated"] for r in results.values()),
            "5xx_total": sum(r["5xx"] for r in results.values())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenarios", default=",".join(SCENARIOS),
                        help=f"comma-separated, of {', '.join(SCENARIOS)}")
    parser.add_argument("--outage", type=float, default=3.0, help="seconds each server is down")
    parser.add_argument("--database-url", default=DEFAULT_ADMIN_URL,
                        help="admin URL of the Postgres lending scratch databases")
    parser.add_argument("--redis-url", default=DEFAULT_REDIS_URL)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="ml-100k directory")
    args = parser.parse_args(argv)
    names = [name.strip() for name in args.scenarios.split(",") if name.strip()]
    unknown = [name for name in names if name not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario {', '.join(unknown)}; known: {', '.join(SCENARIOS)}")
    results: dict[str, dict[str, Any]] = {}
    for name in names:
        function = SCENARIOS[name]
        options: dict[str, Any] = {}
        if "outage" in function.__code__.co_varnames:
            options["outage"] = args.outage
        if "data" in function.__code__.co_varnames:
            options["data"] = args.data
        started = time.monotonic()
        results[name] = function(args.database_url, args.redis_url, **options)
        counts = results[name]
        print(f"{name}: sent {counts['sent']}, accepted {counts['accepted']}, persisted "
              f"{counts['persisted']}, lost {counts['lost']}, duplicated {counts['duplicated']}, "
              f"5xx {counts['5xx']}, connection errors {counts['connection_errors']}, outage "
              f"{counts['outage_s']:.1f} s ({time.monotonic() - started:.0f} s)", flush=True)
    print(json.dumps(summary(results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
