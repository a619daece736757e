"""Prometheus metrics of a Celery worker: tasks per name and state, durations, failures.

`recsys worker SERVICE` calls `serve_worker_metrics` when WORKER_METRICS_PORT is set. The
worker of the i-th service queue (ServiceQueue order: ingest, transform, train, registry,
eval) serves them on WORKER_METRICS_PORT + i, so the workers of one machine
(`recsys stack up`) do not collide; in compose each worker has its own container and
deploy/prometheus.yml scrapes the same ports.

Celery's prefork pool runs tasks in child processes, so this uses prometheus-client's
multiprocess mode: each process writes its samples to mmapped files in a directory of
this worker's own, and the HTTP server in the main process sums them on each scrape.
The alternative, a threads or solo pool whose tasks run in the main process, would change
how tasks run (no hard time limits, no isolation of a crashing or leaking task) for the
sake of monitoring; the pool stays prefork.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from celery import signals

from shared.celery_app import ServiceQueue
from shared.settings import SettingsError

logger = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# Tasks here take from milliseconds (feedback) to an hour (tuning on a large data set).
DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 1800.0,
                    3600.0, float("inf"))


@dataclass
class WorkerMetrics:
    """The worker's metric families (built once multiprocess mode is on)."""

    tasks: Any
    seconds: Any
    failures: Any


_metrics: WorkerMetrics | None = None
# Start times of the tasks running in this process, by task id (a child runs one at a time,
# but a dict keeps a retry or an eager sub-task from confusing the bookkeeping).
_started: dict[str, float] = {}


def metrics_port(base: int, queue: ServiceQueue) -> int:
    """The port the worker of `queue` serves metrics on: base + the queue's position."""
    port = base + list(ServiceQueue).index(queue)
    if not 0 < port <= 65535:
        raise SettingsError(f"invalid setting: WORKER_METRICS_PORT: {base} + "
                            f"{port - base} for the {queue.value} worker is past 65535")
    return port


def _multiprocess_mode(directory: str) -> None:
    """Point prometheus-client at `directory`, even if something imported it already."""
    os.environ[MULTIPROC_ENV] = directory
    from prometheus_client import values

    # The value class is picked from the environment at import time; choose again so a
    # library that imported prometheus_client before this call does not keep the
    # single-process one (metrics read `values.ValueClass` when they are created).
    if not getattr(values.ValueClass, "_multiprocess", False):
        values.ValueClass = values.get_value_class()


def _build_metrics() -> WorkerMetrics:
    from prometheus_client import Counter, Histogram

    # registry=None: the main process exposes them through a MultiProcessCollector.
    return WorkerMetrics(
        tasks=Counter("recsys_worker_tasks", "Tasks run by this worker, by final state.",
                      ["task", "state"], registry=None),
        seconds=Histogram("recsys_worker_task_seconds", "Seconds a task ran, per task name.",
                          ["task"], buckets=DURATION_BUCKETS, registry=None),
        failures=Counter("recsys_worker_task_failures", "Tasks that raised, per task name.",
                         ["task"], registry=None),
    )


def _task_name(sender: Any) -> str:
    return str(getattr(sender, "name", None) or sender or "unknown")


def _on_prerun(task_id: str | None = None, **_: Any) -> None:
    if task_id:
        _started[task_id] = time.perf_counter()


def _on_postrun(sender: Any = None, task_id: str | None = None, state: str | None = None,
                **_: Any) -> None:
    # Every run ends here with its state (SUCCESS, FAILURE, RETRY, IGNORED, REJECTED), so
    # task_retry needs no handler of its own: it would count retries twice.
    if _metrics is None:
        return
    name = _task_name(sender)
    _metrics.tasks.labels(task=name, state=state or "UNKNOWN").inc()
    started = _started.pop(task_id, None) if task_id else None
    if started is not None:
        _metrics.seconds.labels(task=name).observe(time.perf_counter() - started)


def _on_failure(sender: Any = None, **_: Any) -> None:
    # Also sent by the main process when a pool child dies mid-task (WorkerLostError) or
    # overruns its hard time limit, where no postrun ever comes.
    if _metrics is not None:
        _metrics.failures.labels(task=_task_name(sender)).inc()


def install_task_metrics() -> WorkerMetrics:
    """Create the metrics and count every task this process (and its pool) runs."""
    global _metrics
    if _metrics is None:
        _metrics = _build_metrics()
        signals.task_prerun.connect(_on_prerun, weak=False)
        signals.task_postrun.connect(_on_postrun, weak=False)
        signals.task_failure.connect(_on_failure, weak=False)
    return _metrics


def serve_worker_metrics(queue: ServiceQueue, base_port: int) -> int | None:
    """Turn on multiprocess metrics for this worker and serve them on its port.

    Call in the worker's main process before the pool forks. Returns the port, or None
    when it cannot be bound: the worker still runs (a monitoring port taken by another
    process must not stop the work), the error is logged naming WORKER_METRICS_PORT, and
    Prometheus shows the target down.
    """
    port = metrics_port(base_port, queue)
    directory = tempfile.mkdtemp(prefix=f"recsys-metrics-{queue.value}-")
    owner = os.getpid()
    # Pool children leave with os._exit and skip atexit; the check is for plain forks.
    atexit.register(lambda: os.getpid() == owner and shutil.rmtree(directory, True))
    _multiprocess_mode(directory)
    install_task_metrics()

    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=directory)
    try:
        start_http_server(port, addr="0.0.0.0", registry=registry)
    except OSError as error:
        logger.error("worker metrics are off: cannot listen on port %d (WORKER_METRICS_PORT="
                     "%d + %d for %s): %s", port, base_port, port - base_port, queue.value,
                     error)
        return None
    logger.info("worker metrics on http://0.0.0.0:%d/metrics", port)
    return port
