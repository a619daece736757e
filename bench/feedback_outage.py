"""POST /feedback through a RabbitMQ outage: is every accepted event stored exactly once?

In one run, loopback only, against the machine's Postgres and Redis and a private
RabbitMQ node of the run's own (tests/servers.py: its own name, ports and data
directory, so the shared broker is never touched):

1. setup (not timed): a scratch database, migrated; ml-100k ingested, snapshotted, ALS
   fitted, registered and promoted; `recsys worker ingest` and `recsys serve --workers W`
   on the private broker;
2. --connections clients post feedback continuously (--events per request, each event with
   its own client `event_id` and a unique value), for --before seconds with the broker up,
   through an outage of --outage seconds (the node stopped, as an operator's restart does,
   then started again with its data), and for --after seconds more;
3. once the ingest worker has drained (the outbox shipped, the queue empty), the run's
   rows in `feedback` are compared with what was accepted.

Human-readable lines first; the last stdout line is one JSON object: sent, accepted,
persisted, lost (accepted and not stored), duplicated (stored rows beyond one per event,
by content), errors_5xx and no_answer (requests), outage_s (broker stopped to answering
again), p99_ms and p50_ms (every request), p99_ms_outage (requests started while the
broker was down), events_per_s, events_per_s_up and events_per_s_outage (before the
outage: the direct path; during it: the outbox), and outbox_events (events that went
through the outbox, from serve's metrics).

    python bench/feedback_outage.py                # a 30 s outage
    python bench/feedback_outage.py --outage 5 --before 2 --after 3
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx
import psycopg2

from bench.common import configure_environment, scratch_database

API_KEY = "bench-outage-key"
HOST = "127.0.0.1"


@dataclass
class Attempt:
    """One POST /feedback: when it started (monotonic), how long it took, its status
    (0: no answer) and the ids of its events."""

    started: float
    seconds: float
    status: int
    event_ids: list[str]


@dataclass
class FeedbackSender:
    """Clients posting feedback until stopped or `max_requests` were sent; every event has
    a unique `event_id` and value (so a duplicate shows by content), request_id `tag`."""

    base: str
    api_key: str
    tag: str
    connections: int = 8
    events: int = 2
    max_requests: int = 100_000
    timeout: float = 30.0
    users: int = 900
    attempts: list[Attempt] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _counter: Any = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> None:
        self._counter = iter(range(self.max_requests))
        self._threads = [threading.Thread(target=self._client, daemon=True,
                                          name=f"feedback-client-{i}")
                         for i in range(self.connections)]
        for thread in self._threads:
            thread.start()

    def stop(self) -> list[Attempt]:
        self._stop.set()
        for thread in self._threads:
            thread.join(self.timeout + 10)
        return sorted(self.attempts, key=lambda a: a.started)

    def _next(self) -> int | None:
        with self._lock:
            return next(self._counter, None)

    def _client(self) -> None:
        with httpx.Client(base_url=self.base, headers={"X-API-Key": self.api_key},
                          timeout=self.timeout) as http:
            while not self._stop.is_set() and (n := self._next()) is not None:
                body = [{"event_id": f"{self.tag}-{n}-{j}", "user_id": 1 + n % self.users,
                         "movie_id": 1 + (n * self.events + j) % 1682, "type": "click",
                         "value": float(n * self.events + j), "request_id": self.tag}
                        for j in range(self.events)]
                started = time.monotonic()
                try:
                    status = http.post("/feedback", json=body).status_code
                except httpx.HTTPError:
                    status = 0
                attempt = Attempt(started, time.monotonic() - started, status,
                                  [e["event_id"] for e in body])
                with self._lock:
                    self.attempts.append(attempt)


def stored_rows(database_url: str, tag: str) -> list[tuple[str, float]]:
    """(event_id, value) of every stored row of the run (request_id `tag`)."""
    url = re.sub(r"^postgresql\+\w+://", "postgresql://", database_url)
    with psycopg2.connect(url, connect_timeout=5) as conn, conn.cursor() as cursor:
        cursor.execute("SELECT event_id, value FROM feedback WHERE request_id = %s", (tag,))
        rows = [(str(r[0]), float(r[1])) for r in cursor.fetchall()]
    conn.close()
    return rows


def percentile(values: list[float], share: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def outage_figures(attempts: list[Attempt], rows: list[tuple[str, float]],
                   outage: tuple[float, float]) -> dict[str, Any]:
    """sent/accepted/persisted/lost/duplicated/errors_5xx/no_answer and latencies."""
    accepted = {i for a in attempts if a.status == 202 for i in a.event_ids}
    stored = {event_id for event_id, _ in rows}
    during = [a.seconds for a in attempts if outage[0] <= a.started <= outage[1]]
    span = (attempts[-1].started + attempts[-1].seconds - attempts[0].started
            if attempts else 0.0)
    return {
        "sent": sum(len(a.event_ids) for a in attempts),
        "accepted": len(accepted),
        "persisted": len(accepted & stored),
        "lost": len(accepted - stored),
        "duplicated": len(rows) - len({value for _, value in rows}),
        "errors_5xx": sum(1 for a in attempts if a.status >= 500),
        "no_answer": sum(1 for a in attempts if a.status == 0),
        "outage_s": round(outage[1] - outage[0], 2),
        "requests_outage": len(during),
        "p50_ms": round(1000 * percentile([a.seconds for a in attempts], 0.50), 1),
        "p99_ms": round(1000 * percentile([a.seconds for a in attempts], 0.99), 1),
        "p99_ms_outage": round(1000 * percentile(during, 0.99), 1),
        "max_ms": round(1000 * max((a.seconds for a in attempts), default=0.0), 1),
        "events_per_s": round(len(accepted) / span, 1) if span else 0.0,
        # Accepted events per second with the broker up before the outage (the direct,
        # group-committed path) and while it is down (the outbox path), same clients.
        "events_per_s_up": _rate([a for a in attempts if a.started < outage[0]]),
        "events_per_s_outage": _rate([a for a in attempts
                                      if outage[0] <= a.started <= outage[1]]),
    }


def _rate(attempts: list[Attempt]) -> float:
    if not attempts:
        return 0.0
    span = max(a.started + a.seconds for a in attempts) - attempts[0].started
    events = sum(len(a.event_ids) for a in attempts if a.status == 202)
    return round(events / span, 1) if span else 0.0


def outbox_events(base: str) -> float:
    """Events serve kept in its outbox, summed over its workers (from /metrics)."""
    text = httpx.get(f"{base}/metrics", timeout=10).text
    found = re.search(r'recsys_serve_feedback_outbox_events_total\{action="kept"\} ([0-9.e+]+)',
                      text)
    return float(found.group(1)) if found else 0.0


def run_outage(sender: FeedbackSender, broker: Any, before: float, outage: float,
               after: float) -> tuple[list[Attempt], tuple[float, float]]:
    """Send for `before` s, stop the broker for `outage` s, start it, send `after` s more."""
    sender.start()
    time.sleep(before)
    down = time.monotonic()
    broker.stop()
    time.sleep(max(0.0, outage - (time.monotonic() - down)))
    broker.start()
    up = time.monotonic()
    time.sleep(after)
    return sender.stop(), (down, up)


def wait_drained(database_url: str, tag: str, accepted: int, timeout: float
                 ) -> list[tuple[str, float]]:
    """The run's stored rows once as many as were accepted are in (or at `timeout`), and
    then once more after a quiet moment, so a late duplicate would show."""
    deadline = time.monotonic() + timeout
    rows = stored_rows(database_url, tag)
    while len({e for e, _ in rows}) < accepted and time.monotonic() < deadline:
        time.sleep(1.0)
        rows = stored_rows(database_url, tag)
    time.sleep(3.0)
    return stored_rows(database_url, tag)


def main(argv: list[str] | None = None) -> int:
    from bench.ingest import DEFAULT_ADMIN_URL, migrate
    from bench.serve import (
        DEFAULT_ML100K,
        build_ml100k,
            start_ingest_worker,
        start_serve,
    )
    from tests.servers import private_rabbitmq

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--outage", type=float, default=30.0, help="seconds the broker is down")
    parser.add_argument("--before", type=float, default=5.0)
    parser.add_argument("--after", type=float, default=10.0)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--events", type=int, default=2, help="events per request")
    parser.add_argument("--max-requests", type=int, default=200_000)
    parser.add_argument("--workers", type=int, default=2, help="uvicorn workers of serve")
    parser.add_argument("--ml100k", type=Path, default=Path(os.environ.get(
        "ML100K_PATH", DEFAULT_ML100K)))
    parser.add_argument("--database-url", default=DEFAULT_ADMIN_URL)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/14")
    parser.add_argument("--drain-timeout", type=float, default=300.0)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    if not (args.ml100k / "u.data").exists():
        raise SystemExit(f"ml-100k not found at {args.ml100k}; pass --ml100k")
    folder = Path(tempfile.mkdtemp(prefix="bench-outage-", dir=args.workdir))
    tag = f"outage-{secrets.token_hex(4)}"
    children = []
    with private_rabbitmq() as broker:
        try:
            print(f"private RabbitMQ {broker.node} on 127.0.0.1:{broker.port}")
            with scratch_database(args.database_url, "outage") as database:
                url = database.render_as_string(hide_password=False)
                env = {"DATABASE_URL": url, "BROKER_URL": broker.url, "REDIS_URL": args.redis_url,
                       "MODEL_PATH": str(folder / "models"), "DATA_PATH": str(folder / "data"),
                       "API_KEY": API_KEY, "CACHE_PREFIX": f"bout{secrets.token_hex(4)}",
                       "TRAIN_THREADS": "2", "MODEL_VERSION": "latest",
                       "ENVIRONMENT": "development", "MODEL_POLL_SECONDS": "0"}
                configure_environment(env)
                child_env = {**os.environ, **env}
                child_env.pop("PROMETHEUS_MULTIPROC_DIR", None)
                migrate(database, folder)
                built = build_ml100k(args.ml100k, 16, 3)
                worker = start_ingest_worker(child_env, folder, 1, 60.0)
                children.append(worker)
                _, base = start_serve(children, child_env, folder, args.workers, built.version)
                print(f"serve {base} ({args.workers} workers), {args.connections} clients x "
                      f"{args.events} events; outage {args.outage:.0f} s after {args.before:.0f} s")
                sender = FeedbackSender(base, API_KEY, tag, args.connections, args.events,
                                        args.max_requests)
                attempts, outage = run_outage(sender, broker, args.before, args.outage, args.after)
                accepted = len({i for a in attempts if a.status == 202 for i in a.event_ids})
                rows = wait_drained(url, tag, accepted, args.drain_timeout)
                figures = outage_figures(attempts, rows, outage)
                figures["outbox_events"] = outbox_events(base)
                for key, value in figures.items():
                    print(f"{key:>16}: {value}")
                print(json.dumps(figures))
                return 0 if figures["lost"] == 0 and figures["duplicated"] == 0 else 1
        finally:
            for child in reversed(children):
                child.stop()


if __name__ == "__main__":
    sys.exit(main())
