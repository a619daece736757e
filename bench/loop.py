"""The closed loop's latency against the same stages run directly, and the online window.

In one run:

(a) loop: a scratch database and a RabbitMQ virtual host of the run's own; the stack of
    docker-compose.yml's app services as local processes (`recsys.stack.up`); the pipeline
    on ml-100k with a weak champion (most-popular); lists served over HTTP and clicks on
    some of their items (a new snapshot's worth of feedback). Then the clock starts as the
    retrain rule fires (`services.eval.policy.fire`, which enqueues transform -> train ->
    register -> eval -> promote on the workers) and stops when serve answers a
    recommendation naming the new version: loop_seconds.
(b) direct: after a fresh feedback change, the same stages as function calls in this
    process (build_snapshot, train_many, register, evaluate_versions, promote_if_better):
    direct_seconds. Target: loop <= 2 x direct + 5 s.
(c) online window: `window_figures` (what `eval.online` computes) on `--impressions`
    impressions and `--feedback` feedback events against one bare SQL aggregate over the
    same tables (bench/online_window.py). Target: ratio <= 3.

Human-readable lines first; the last stdout line is one JSON object:
{"loop_seconds", "direct_seconds", "loop_ratio", "online_window_ratio"}.

    python bench/loop.py [--impressions N] [--feedback N] [--algorithms ease] [--trials 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx

from bench.common import configure_environment, wait_until
from bench.online_window import measure, scratch_database

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ADMIN_URL = "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"
DEFAULT_BROKER_URL = "amqp://guest:guest@127.0.0.1:5672//"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_DATA = ROOT.parent / "shared" / "datasets" / "ml-100k"
SERVE = "http://127.0.0.1:8000"  # compose's serve command binds port 8000
API_KEY = "bench-loop-key"


def log(message: str) -> None:
    print(message, flush=True)



def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _rabbitmqctl(*args: str) -> bool:
    try:
        done = subprocess.run(["rabbitmqctl", "-q", *args], capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


@contextmanager
def private_vhost(broker_url: str) -> Iterator[str]:
    """A RabbitMQ virtual host of this run's own where rabbitmqctl can make one: the service
    queues have fixed names, and other workers on the broker must not take our tasks."""
    url = urlparse(broker_url)
    vhost = f"recsys_bench_loop_{uuid.uuid4().hex[:8]}"
    local = url.hostname in ("127.0.0.1", "localhost") and shutil.which("rabbitmqctl")
    if not (local and _rabbitmqctl("add_vhost", vhost) and _rabbitmqctl(
            "set_permissions", "-p", vhost, url.username or "guest", ".*", ".*", ".*")):
        yield broker_url
        return
    try:
        yield url._replace(path=f"/{vhost}").geturl()
    finally:
        _rabbitmqctl("delete_vhost", vhost)



LAST_FAILURE: list[str] = [""]


def recommend(user: int) -> dict[str, Any] | None:
    try:
        response = httpx.get(f"{SERVE}/recommendations/{user}?k=10", timeout=10)
    except httpx.HTTPError as error:
        LAST_FAILURE[0] = f"{type(error).__name__}: {error}"
        return None
    if response.status_code != 200:
        LAST_FAILURE[0] = f"{response.status_code} {response.text[:200]}"
        return None
    return response.json()


def champion() -> int | None:
    from shared.db import ModelAlias, session_scope

    with session_scope() as session:
        alias = session.get(ModelAlias, ("recsys", "champion"))
        return alias.version if alias else None


def feedback_count() -> int:
    from sqlalchemy import func, select

    from shared.db import Feedback, session_scope

    with session_scope() as session:
        return session.scalar(select(func.count()).select_from(Feedback)) or 0


def serve_and_click(users: range, clicks: int = 3) -> int:
    """Lists for real users over HTTP, a click on the first `clicks` items of each; waits
    until the feedback is stored. Returns the number of events."""
    before, events = feedback_count(), []
    for user in users:
        # Each serve worker swaps to a new champion on its own, so a request that lands on
        # one still loading it may be answered 503 for a moment: retry for a while.
        try:
            body = wait_until(lambda user=user: recommend(user), 60, f"a list for user {user}")
        except SystemExit:
            raise SystemExit(f"serve gave no list for user {user}: {LAST_FAILURE[0]}") from None
        events += [{"user_id": user, "movie_id": item["movie_id"], "type": "click",
                    "request_id": body["request_id"]} for item in body["items"][:clicks]]
    response = httpx.post(f"{SERVE}/feedback", json=events, headers={"X-API-Key": API_KEY},
                          timeout=30)
    if response.status_code != 202:
        raise SystemExit(f"POST /feedback answered {response.status_code}: {response.text}")
    wait_until(lambda: feedback_count() >= before + len(events), 120, "the feedback to land")
    return len(events)


def measure_loop(args: argparse.Namespace, broker_url: str, workdir: Path) -> dict[str, Any]:
    """Stack up on a scratch database; time rule firing -> serve answering the new version;
    then time the same stages directly in this process."""
    from recsys.stack import down, up
    from shared.celery_app import ServiceQueue, app

    algorithms = [a.strip() for a in args.algorithms.split(",") if a.strip()]
    with scratch_database(args.database_url) as url:
        env = {"DATABASE_URL": url, "BROKER_URL": broker_url, "REDIS_URL": args.redis_url,
               "DATA_PATH": str(workdir / "data"), "MODEL_PATH": str(workdir / "models"),
               "DATA_SOURCE": str(args.data_source), "API_KEY": API_KEY,
               "CACHE_PREFIX": f"benchloop{uuid.uuid4().hex[:8]}",
               "RETRAIN_ALGORITHMS": ",".join(algorithms), "RETRAIN_TRIALS": str(args.trials),
               # The benchmark fires the rule itself: the policy must not fire on its own.
               "RETRAIN_MIN_FEEDBACK": "100000000", "RETRAIN_LOW_WINDOWS": "1000"}
        configure_environment(env)
        with app.connection_for_write() as connection:  # only this run's tasks
            for queue in app.conf.task_queues:
                bound = queue.bind(connection.default_channel)
                bound.declare()
                bound.purge()
        wait_until(lambda: not port_open(8000), 300, "port 8000 (serve) to be free")
        state = workdir / "stack"
        up(None, state_dir=state, env=env, without=("bootstrap",))
        try:
            wanted = {q.value for q in ServiceQueue}
            wait_until(lambda: wanted <= {node.split("@")[0] for reply in
                                          app.control.ping(timeout=1.0) for node in reply},
                       120, "the workers to answer")
            from services.eval.policy import fire
            from shared.pipeline import run_pipeline

            summary = run_pipeline("all", source=str(args.data_source),
                                   algorithms=["popular"], trials=args.trials,
                                   timeout=args.timeout)
            first = champion()
            log(f"initial pipeline: {summary['seconds']} s, champion v{first} (most popular)")
            wait_until(lambda: (recommend(1) or {}).get("model_version") == first, 120,
                       f"serve to answer with v{first}")
            clicks = serve_and_click(range(1, 51))
            log(f"{clicks} clicks on served lists stored")

            clock = time.perf_counter()
            decision = fire("bench", "benchmark: loop latency")
            if not decision["fired"]:
                raise SystemExit(f"the retrain did not fire: {decision['reason']}")
            answer = wait_until(
                lambda: (body := recommend(1)) and body["model_version"] != first and body,
                args.timeout, "serve to answer with a new version", interval=0.05)
            loop_seconds = time.perf_counter() - clock
            second = answer["model_version"]
            if champion() != second:
                raise SystemExit(f"serve answered v{second}, the champion is v{champion()}")
            log(f"loop: rule fired -> serve answers v{second}: {loop_seconds:.2f} s")
            # Let the chain's last link release the lock before the direct run.
            wait_until(lambda: app.AsyncResult(decision["task_id"]).state == "SUCCESS",
                       120, "the retrain chain to finish")

            clicks = serve_and_click(range(51, 101))
            direct_seconds, third = direct_stages(algorithms, args.trials)
            log(f"direct ({clicks} more clicks): the same stages in one process: "
                f"{direct_seconds:.2f} s (v{third['candidate']}, promoted: "
                f"{third['promoted']})")
        finally:
            down(state_dir=state)
            from shared.db import get_engine

            get_engine().dispose()
    return {"loop_seconds": loop_seconds, "direct_seconds": direct_seconds}


def direct_stages(algorithms: list[str], trials: int) -> tuple[float, dict[str, Any]]:
    from services.eval.offline import evaluate_versions
    from services.registry import registry
    from services.train.training import train_many
    from services.transform.snapshot import SnapshotParams, build_snapshot

    clock = time.perf_counter()
    snapshot = build_snapshot(SnapshotParams.from_settings())
    trained = train_many(snapshot, algorithms, tune=True, n_trials=trials)
    registered = [registry.register(
        snapshot_id=t["snapshot"]["snapshot_id"], algorithm=t["algorithm"], params=t["params"],
        artifact_path=t["artifact_path"], sha256=t["sha256"], metrics=t.get("validation", {}),
    ) | {"snapshot_artifact": t["snapshot"]} for t in trained if not t.get("skipped")]
    evaluated = evaluate_versions(registered)
    decision = registry.promote_if_better(evaluated)
    return time.perf_counter() - clock, decision


def measure_online_window(args: argparse.Namespace) -> float:
    ours, bare = measure(args.database_url, args.impressions, args.feedback, args.seed,
                         args.repeat)
    ratio = ours / bare
    log(f"online window over {args.impressions:,} impressions and {args.feedback:,} feedback "
        f"events: {ours * 1000:.0f} ms; bare aggregate {bare * 1000:.0f} ms; ratio "
        f"{ratio:.2f} (target <= 3: {'met' if ratio <= 3 else 'missed'})")
    return ratio


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impressions", type=int, default=1_000_000)
    parser.add_argument("--feedback", type=int, default=50_000)
    parser.add_argument("--algorithms", default="ease",
                        help="What the retrain (and the direct run) trains.")
    parser.add_argument("--trials", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3,
                        help="Timings of the online window; the best counts.")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("--data-source", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--database-url", default=os.environ.get("BENCH_DATABASE_URL",
                                                                 DEFAULT_ADMIN_URL))
    parser.add_argument("--broker-url", default=os.environ.get("BENCH_BROKER_URL",
                                                               DEFAULT_BROKER_URL))
    parser.add_argument("--redis-url", default=os.environ.get("BENCH_REDIS_URL",
                                                              DEFAULT_REDIS_URL))
    args = parser.parse_args(argv)
    if not (args.data_source / "u.data").exists():
        raise SystemExit(f"MovieLens 100K not found at {args.data_source}; use --data-source")

    workdir = Path(tempfile.mkdtemp(prefix="recsys-bench-loop-"))
    try:
        with private_vhost(args.broker_url) as broker_url:
            timings = measure_loop(args, broker_url, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    loop_seconds, direct_seconds = timings["loop_seconds"], timings["direct_seconds"]
    bar = 2 * direct_seconds + 5
    log(f"loop {loop_seconds:.2f} s vs direct {direct_seconds:.2f} s: ratio "
        f"{loop_seconds / direct_seconds:.2f} (target loop <= 2 x direct + 5 = {bar:.2f} s: "
        f"{'met' if loop_seconds <= bar else 'missed'})")
    online_ratio = measure_online_window(args)
    print(json.dumps({"loop_seconds": round(loop_seconds, 3),
                      "direct_seconds": round(direct_seconds, 3),
                      "loop_ratio": round(loop_seconds / direct_seconds, 3),
                      "online_window_ratio": round(online_ratio, 3)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
