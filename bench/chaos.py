"""Fault scenarios on the real services: what a broker, database or cache restart, or a
malformed request, costs in lost, duplicated and failed requests.

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
    return [str(beside)] if beside.exists() else [sys.executable, "-m", "shared.cli"]


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

    def __init__(self, request: Callable[[httpx.Client, int], httpx.Response]) -> None:
        self.request = request
        self.sent = 0
        self.accepted: list[int] = []  # request numbers answered 2xx
        self.server_errors = 0
        self.connection_errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="chaos-load", daemon=True)

    def _run(self) -> None:
        with httpx.Client(headers={"X-API-Key": API_KEY}, timeout=30) as client:
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
                time.sleep(0.01)  # a steady trickle, not a flood, on a shared machine

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
        sent = accepted = server_errors = connection_errors = 0
        failing: list[str] = []
        with httpx.Client(headers={"X-API-Key": API_KEY, "Content-Type": "application/json"},
                          timeout=60) as client:
            for method, path, body in malformed_bodies():
                sent += 1
                try:
                    response = client.request(method, url + path, content=body)
                except httpx.HTTPError as error:
                    connection_errors += 1
                    failing.append(f"{method} {path[:60]} -> {type(error).__name__}")
                    continue
                if response.status_code >= 500:
                    server_errors += 1
                    failing.append(f"{method} {path[:60]} {(body or b'')[:60]!r} -> "
                                   f"{response.status_code}")
                elif response.status_code < 300:
                    accepted += 1
                    failing.append(f"{method} {path[:60]} {(body or b'')[:60]!r} -> "
                                   f"{response.status_code} (accepted)")
        for line in failing:
            print(f"  malformed: {line}")
        errors = [line for line in (work / "serve.log").read_text(errors="replace").splitlines()
                  if "Error" in line and not line.startswith(" ")]
        for line in errors[-5:]:
            print(f"  serve log: {line[:200]}")
        return {"sent": sent, "accepted": accepted, "persisted": 0, "lost": 0,
                "duplicated": 0, "5xx": server_errors, "connection_errors": connection_errors,
                "outage_s": 0.0}


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

        def request(client: httpx.Client, number: int) -> httpx.Response:
            response = client.get(f"{url}/recommendations/{1 + number % 40}",
                                  params={"k": 10, "offset": number % 3})
            if response.status_code == 200:
                served.add(int(response.json()["model_version"]))
            return response

        began = time.monotonic()
        with Load(request) as load:
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


# What each killed task must leave exactly one of, and what it needs done before it.
KILL_TASKS: dict[str, tuple[str, str]] = {
    "ingest": ("ingest.load", "SELECT count(*) FROM ingest_batch"),
    "transform": ("transform.snapshot", "SELECT count(*) FROM snapshot"),
}


def worker_killed_mid_task(admin_url: str, redis_url: str, service: str = "ingest",
                           data: Path = DEFAULT_DATA) -> dict[str, Any]:
    """SIGKILL the pool process of a `service` worker while its task runs: the task must
    be redelivered and complete once (one batch or snapshot, never two)."""
    from celery import Celery

    task, count_sql = KILL_TASKS[service]
    with ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="chaos-")))
        broker = stack.enter_context(private_rabbitmq())
        database = str(stack.enter_context(scratch_database(admin_url, "chaos")))
        env = base_env(work, DATABASE_URL=database, BROKER_URL=broker.url, REDIS_URL=redis_url,
                       DATA_SOURCE=str(data))
        embedded = {k: v for k, v in env.items() if k not in ("BROKER_URL", "REDIS_URL")}
        run([*recsys(), "db", "upgrade"], embedded)
        if service != "ingest":
            run([*recsys(), "ingest", "--source", str(data)], embedded)
        log = work / f"{service}.log"
        stack.enter_context(process([*recsys(), "worker", service], env, log))
        wait_until(lambda: " ready." in log.read_text(errors="replace"), 90,
                   f"the {service} worker to be ready")
        client = Celery("chaos", broker=broker.url, backend=redis_url)
        stack.callback(client.close)
        result = client.send_task(task, kwargs={}, queue=service)

        def active() -> dict[str, Any] | None:
            replies = client.control.inspect(timeout=0.5, limit=1).active() or {}
            return next((t for tasks in replies.values() for t in tasks or []
                         if t["id"] == result.id), None)

        running = None
        deadline = time.monotonic() + 120
        while running is None and time.monotonic() < deadline:
            running = active()
        if running is None:
            raise TimeoutError(f"{task} never ran on the {service} worker")
        killed = time.monotonic()
        os.kill(int(running["worker_pid"]), signal.SIGKILL)
        wait_until(lambda: result.state == "SUCCESS", 300, f"{task} to complete after the kill")
        recovered = time.monotonic() - killed
        made = _count(database, count_sql)
        lost_worker = "WorkerLostError" in log.read_text(errors="replace") or \
            "signal 9" in log.read_text(errors="replace")
        return {"sent": 1, "accepted": 1, "persisted": min(made, 1), "lost": int(made == 0),
                "duplicated": max(made - 1, 0), "5xx": 0, "connection_errors": 0,
                "outage_s": round(recovered, 2), "worker_lost_logged": lost_worker}


def ingest_worker_killed(admin_url: str, redis_url: str, data: Path = DEFAULT_DATA
                         ) -> dict[str, Any]:
    """kill -9 of the ingest worker's pool process during a load of ml-100k."""
    return worker_killed_mid_task(admin_url, redis_url, "ingest", data)


def transform_worker_killed(admin_url: str, redis_url: str, data: Path = DEFAULT_DATA
                            ) -> dict[str, Any]:
    """kill -9 of the transform worker's pool process while it builds a snapshot."""
    return worker_killed_mid_task(admin_url, redis_url, "transform", data)


SCENARIOS: dict[str, Callable[..., dict[str, Any]]] = {
    "feedback_broker_restart": feedback_broker_restart,
    "feedback_postgres_restart": feedback_postgres_restart,
    "recommendations_redis_restart": recommendations_redis_restart,
    "malformed_requests": malformed_requests,
    "hot_swap_under_load": hot_swap_under_load,
    "ingest_worker_killed": ingest_worker_killed,
    "transform_worker_killed": transform_worker_killed,
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
