"""The one Celery app: a durable queue per service, task names `<service>.<verb>`.

Services never import each other: they call tasks by name through `run_task`
(or signatures by name in a chain). With no BROKER_URL, tasks run eagerly in-process.
"""

from __future__ import annotations

from enum import StrEnum
from functools import cache
from importlib.metadata import EntryPoint, entry_points
from typing import Any

import kombu.exceptions
import redis.exceptions
import sqlalchemy.exc
from celery import Celery
from kombu import Exchange, Queue

from shared.settings import Settings, get_settings


class ServiceQueue(StrEnum):
    """Queue names, one per worker service."""

    INGEST = "ingest"
    TRANSFORM = "transform"
    TRAIN = "train"
    REGISTRY = "registry"
    EVAL = "eval"


# Where each worker service keeps its tasks is declared by the package (pyproject's
# `recsys.tasks` entry points, one per queue), not here: this library never names a service.
# Only the worker (or eager mode) imports them.
TASK_ENTRY_POINTS = "recsys.tasks"

# Errors worth a retry with backoff: the database, broker or cache blinked.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    sqlalchemy.exc.OperationalError,
    sqlalchemy.exc.InterfaceError,
    kombu.exceptions.OperationalError,
    redis.exceptions.ConnectionError,
    ConnectionError,
    TimeoutError,
)


def queue_of(task_name: str) -> str:
    """The queue a task name routes to: the part before the dot."""
    service = task_name.split(".", 1)[0]
    try:
        return ServiceQueue(service).value
    except ValueError:
        raise ValueError(f"task {task_name!r} names no service queue") from None


def _celery_config(settings: Settings) -> dict[str, Any]:
    queues = [
        Queue(
            q.value,
            Exchange(q.value, type="direct", durable=True),
            routing_key=q.value,
            durable=True,
        )
        for q in ServiceQueue
    ]
    backend = settings.redis_url or ("rpc://" if settings.broker_url else "cache+memory://")
    return {
        "broker_url": settings.broker_url or "memory://",
        "result_backend": backend,
        "task_always_eager": not settings.broker_url,
        "task_eager_propagates": True,
        "task_store_eager_result": False,
        "task_queues": queues,
        "task_default_queue": ServiceQueue.INGEST.value,
        "task_routes": {
            f"{q.value}.*": {"queue": q.value, "routing_key": q.value} for q in ServiceQueue
        },
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_acks_on_failure_or_timeout": True,
        "worker_prefetch_multiplier": 1,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "task_track_started": True,
        # No task-sent event: it is a second confirmed publish per task, doubling the cost
        # of every feedback and impression message. Flower still sees each task from its
        # worker's events (received, started, succeeded or failed).
        "task_send_sent_event": False,
        "worker_send_task_events": True,
        "result_expires": 7 * 24 * 3600,
        "broker_transport_options": {"confirm_publish": True},
        "broker_connection_retry_on_startup": True,
        "enable_utc": True,
        # `recsys beat` computes the online window on this schedule (eval's queue).
        "beat_schedule": {
            "eval-online": {"task": "eval.online",
                            "schedule": float(settings.online_interval_seconds),
                            "options": {"queue": ServiceQueue.EVAL.value}},
        },
    }


app = Celery("recsys")


def configure_app(settings: Settings | None = None) -> Celery:
    """Apply the settings in force to the app (at import and after settings change)."""
    app.conf.update(_celery_config(settings or get_settings()))
    # The result backend and the connection pools were made for the previous URLs and are
    # cached on the app: drop them so the next use follows the settings now in force.
    app._backend_cache = None
    app._local.__dict__.pop("backend", None)
    app._pool = None  # kombu keeps pools per connection URL; a new URL gets its own
    if "amqp" in app.__dict__:
        app.__dict__["amqp"]._producer_pool = None
    return app


configure_app()


def service_task(name: str, **options: Any) -> Any:
    """Decorator for a service task: acks late, retries transient errors with backoff."""
    queue_of(name)  # refuse names that route nowhere at import time
    defaults: dict[str, Any] = {
        "name": name,
        "bind": True,
        "acks_late": True,
        "reject_on_worker_lost": True,
        "autoretry_for": TRANSIENT_ERRORS,
        "retry_backoff": 2,
        "retry_backoff_max": 60,
        "retry_jitter": True,
        "max_retries": 5,
    }
    defaults.update(options)
    return app.task(**defaults)


@cache  # reading the installed metadata costs milliseconds; run_task asks on every call
def _declared_tasks() -> dict[str, EntryPoint]:
    declared = {point.name: point for point in entry_points(group=TASK_ENTRY_POINTS)}
    if not declared:
        raise RuntimeError(f"no {TASK_ENTRY_POINTS!r} entry points are installed: reinstall "
                           "the package (`pip install -e .`) so its services' tasks are found")
    return declared


def import_tasks(*queues: ServiceQueue) -> None:
    """Register the tasks of the given services (all of them when none given)."""
    declared = _declared_tasks()
    for queue in queues or tuple(ServiceQueue):
        if queue.value in declared:  # a service whose tasks are not declared is absent
            declared[queue.value].load()


def task_available(name: str) -> bool:
    """Whether a task of that name exists (eager mode imports every service's tasks)."""
    import_tasks()
    return name in app.tasks


def purge_queues(*queues: ServiceQueue) -> int:
    """Declare service queues (all when none given) as the workers do and empty them, so a
    worker started next sees only new tasks; returns how many messages were dropped."""
    wanted = {q.value for q in queues or tuple(ServiceQueue)}
    purged = 0
    with app.connection_for_write() as connection:
        for queue in app.conf.task_queues:
            if queue.name in wanted:
                bound = queue.bind(connection.default_channel)
                bound.declare()
                purged += bound.purge() or 0
    return purged


def answering_workers(queue: ServiceQueue, timeout: float = 1.0) -> int:
    """How many `<queue>@...` workers answer a ping on this broker."""
    return sum(1 for reply in app.control.ping(timeout=timeout) for node in reply
               if node.startswith(f"{queue.value}@"))


def run_task(name: str, kwargs: dict[str, Any], timeout: float | None = None) -> Any:
    """Run a task by name: through the broker when configured, else in this process."""
    # Celery rebuilds a task's exception as its own class only when that class's module is
    # loaded here; importing the tasks loads every service's error classes.
    import_tasks()
    if app.conf.task_always_eager:
        return app.tasks[name].apply(kwargs=kwargs, throw=True).get()
    result = app.send_task(name, kwargs=kwargs, queue=queue_of(name))
    return result.get(timeout=timeout)
