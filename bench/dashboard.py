"""Benchmark serve's cache-hit throughput with the dashboard open and polling, against none.

In one run, against one Postgres server, one RabbitMQ and one Redis (loopback only):

1. setup (not timed): a scratch database migrated with `recsys db upgrade`; ml-100k
   ingested, snapshotted, ALS fitted, registered and promoted (bench/serve.py's setup);
2. `recsys serve --workers W` on 127.0.0.1, 16 users' lists pre-warmed in the cache;
3. rounds, alternating: wrk (`-t2 -c16`) on GET /recommendations/{user}?k=10 over those
   users (every request a cache hit), first with no dashboard at all, then with
   `recsys dashboard` running and a logged-in client polling its overview fragment every
   3 s as an open browser tab does (and loading the Models page once per round, the
   heaviest page); the dashboard is stopped after each such round.

The figure is the ratio of the median hit throughput with the dashboard over the median
without, both measured in this run; the target is at least 0.95.

Human-readable lines first; the last stdout line is one JSON object: hit_rps_without,
hit_rps_with, hit_ratio_with_dashboard, rounds, polls, poll_p50_ms.

    python bench/dashboard.py                     # 3 rounds of 10 s each way
    python bench/dashboard.py --duration 1 --rounds 1
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx

from bench.common import configure_environment, scratch_database, wait_until
from bench.ingest import DEFAULT_ADMIN_URL, migrate, recsys_command
from bench.serve import (
    DEFAULT_BROKER_URL,
    DEFAULT_ML100K,
    DEFAULT_REDIS_URL,
    HIT_USERS,
    HOST,
    LUA_CYCLE,
    Child,
    build_ml100k,
    delete_prefix,
    ensure_wrk,
    free_port,
    http,
    lua_script,
    run_wrk,
    start_child,
    start_serve,
)

TARGET_RATIO = 0.95
POLL_SECONDS = 3.0  # the overview's htmx polling interval
USER, PASSWORD = "bench", "bench-dashboard-password"


class Poller(threading.Thread):
    """A logged-in client doing what an open overview tab does."""

    def __init__(self, base: str) -> None:
        super().__init__(name="dashboard-poller", daemon=True)
        self.base = base
        self.stop = threading.Event()
        self.latencies: list[float] = []
        self.failures = 0

    def run(self) -> None:
        with httpx.Client(base_url=self.base, timeout=60) as client:
            form = client.get("/login").text
            token = re.search(r'name="csrf_token" value="([^"]+)"', form).group(1)  # type: ignore[union-attr]
            answer = client.post("/login", data={"username": USER, "password": PASSWORD,
                                                 "csrf_token": token, "next": "/"})
            if answer.status_code != 303:
                raise SystemExit(f"dashboard login answered {answer.status_code}")
            client.get("/")
            client.get("/models")
            while not self.stop.is_set():
                clock = time.perf_counter()
                answer = client.get("/fragments/overview", headers={"HX-Request": "true"})
                if answer.status_code == 200:
                    self.latencies.append(time.perf_counter() - clock)
                else:
                    self.failures += 1
                self.stop.wait(POLL_SECONDS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per wrk load")
    parser.add_argument("--rounds", type=int, default=3, help="loads each way, alternating")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2, help="uvicorn workers of serve")
    parser.add_argument("--factors", type=int, default=64)
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--ml100k", type=Path, default=Path(os.environ.get(
        "ML100K_PATH", DEFAULT_ML100K)))
    parser.add_argument("--database-url", default=DEFAULT_ADMIN_URL)
    parser.add_argument("--broker-url", default=DEFAULT_BROKER_URL)
    parser.add_argument("--redis-url", default=DEFAULT_REDIS_URL)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.rounds < 1:
        raise SystemExit(f"--rounds must be at least 1, got {args.rounds}")
    if not (args.ml100k / "u.data").exists():
        raise SystemExit(f"ml-100k not found at {args.ml100k}; pass --ml100k")
    wrk = ensure_wrk()
    folder = Path(tempfile.mkdtemp(prefix="bench-dashboard-", dir=args.workdir))
    prefix = f"bdb{secrets.token_hex(4)}"
    children: list[Child] = []
    try:
        with scratch_database(args.database_url, "dashboard") as database:
            url = database.render_as_string(hide_password=False)
            print(f"scratch database {database.database} on {database.host}:{database.port}")
            env = {"DATABASE_URL": url, "BROKER_URL": args.broker_url,
                   "REDIS_URL": args.redis_url, "MODEL_PATH": str(folder / "models"),
                   "DATA_PATH": str(folder / "data"), "CACHE_PREFIX": prefix,
                   "TRAIN_THREADS": "2", "MODEL_VERSION": "latest", "ENVIRONMENT": "development",
                   "DASHBOARD_USER": USER, "DASHBOARD_PASSWORD": PASSWORD}
            configure_environment(env)
            child_env = {**os.environ, **env}
            child_env.pop("PROMETHEUS_MULTIPROC_DIR", None)
            migrate(database, folder)
            built = build_ml100k(args.ml100k, args.factors, args.iterations)
            _, serve_url = start_serve(children, child_env, folder, args.workers, built.version)
            users = built.users[:HIT_USERS]
            for user in users:  # the first GET stores the list, the next one hits
                for _ in range(2):
                    status, _ = http("GET", f"{serve_url}/recommendations/{user}?k=10")
                    if status != 200:
                        raise SystemExit(f"warming user {user}: {status}")
            scripts = folder / "lua"
            scripts.mkdir()
            script = lua_script(scripts, "hit", LUA_CYCLE, args.threads,
                                USERS=",".join(map(str, users)), PREFIX='"/recommendations/"')
            common = {"threads": args.threads, "connections": args.connections}
            run_wrk(wrk, "warm-up hits", serve_url, script, **common, duration=1)
            print(f"serve {serve_url} ({args.workers} workers); wrk -t{args.threads} "
                  f"-c{args.connections} -d{max(1, round(args.duration))}s, cache hits over "
                  f"{len(users)} users; {os.cpu_count()} CPUs")

            without, with_dashboard, latencies, failures = [], [], [], 0
            for round_number in range(1, args.rounds + 1):
                load = run_wrk(wrk, f"round {round_number} without the dashboard", serve_url,
                               script, **common, duration=args.duration)
                print(load.line())
                without.append(load.rps)
                port = free_port()
                dashboard = start_child("dashboard", [*recsys_command(), "dashboard", "--host",
                                                      HOST, "--port", str(port),
                                                      "--log-level", "warning"],
                                        child_env, folder)
                children.append(dashboard)
                base = f"http://{HOST}:{port}"
                wait_until(lambda base=base: http("GET", f"{base}/login")[0] == 200, 120,
                           "the dashboard", dashboard)
                poller = Poller(base)
                poller.start()
                wait_until(lambda poller=poller: poller.latencies or not poller.is_alive(),
                           120, "the dashboard's first overview poll", dashboard)
                load = run_wrk(wrk, f"round {round_number} with the dashboard polling",
                               serve_url, script, **common, duration=args.duration)
                print(load.line() + f" ({len(poller.latencies)} polls so far)")
                with_dashboard.append(load.rps)
                poller.stop.set()
                poller.join(60)
                latencies += poller.latencies
                failures += poller.failures
                dashboard.stop()
                children.remove(dashboard)
            if failures or not latencies:
                raise SystemExit(f"the dashboard's overview polls failed {failures} times")
            rps_without = statistics.median(without)
            rps_with = statistics.median(with_dashboard)
            ratio = rps_with / rps_without
            poll_ms = statistics.median(latencies) * 1000
            print(f"cache hits: {rps_with:,.0f} requests/s with the dashboard polling, "
                  f"{rps_without:,.0f} without (medians of {args.rounds}): ratio {ratio:.3f}, "
                  f"target >= {TARGET_RATIO} {'met' if ratio >= TARGET_RATIO else 'NOT met'}; "
                  f"overview poll p50 {poll_ms:.0f} ms over {len(latencies)} polls")
            print(json.dumps({"hit_rps_without": round(rps_without, 1),
                              "hit_rps_with": round(rps_with, 1),
                              "hit_ratio_with_dashboard": round(ratio, 4),
                              "rounds": args.rounds, "polls": len(latencies),
                              "poll_p50_ms": round(poll_ms, 1)}))
    finally:
        for child in children:
            child.stop()
        delete_prefix(args.redis_url, prefix)
        import shutil

        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
