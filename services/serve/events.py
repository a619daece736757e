"""Following `model.promoted`: each serve process hot-swaps when an alias moves.

With a broker, every process (every uvicorn worker) consumes from its own exclusive,
auto-deleted queue bound to `model.promoted`, in a thread with its own pika connection
(a BlockingConnection must stay in one thread). After a reconnect it refreshes from the
registry, since events published while it was away went to no queue. Embedded, it
subscribes on the in-process bus. A poller re-reads the registry every
MODEL_POLL_SECONDS as a safety net, and retries a start-up load that failed.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable
from typing import Any

import pika
import pika.exceptions

from shared.events import Event, InProcessEventBus, pika_parameters

log = logging.getLogger(__name__)
Refresh = Callable[[dict[str, Any] | None], Any]
EVENT = "model.promoted"


def _wanted(payload: dict[str, Any]) -> bool:
    return payload.get("alias") in ("champion", "challenger")


class _DaemonLoop:
    """A daemon thread running `_run` until `close` sets `_stop`."""

    name = "serve-loop"

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def close(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        raise NotImplementedError


class PromotionListener(_DaemonLoop):
    """A daemon thread consuming `model.promoted` from RabbitMQ, reconnecting as needed."""

    name = "serve-events"

    def __init__(self, broker_url: str, exchange: str, refresh: Refresh) -> None:
        super().__init__()
        self.parameters = pika_parameters(broker_url)
        self.parameters.connection_attempts = 1
        self.exchange = exchange
        self.refresh = refresh
        self.queue = f"serve.{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        self.subscribed = threading.Event()

    def _run(self) -> None:
        delay, first = 1.0, True
        while not self._stop.is_set():
            try:
                self._consume(refresh_first=not first)
                delay = 1.0
            except (pika.exceptions.AMQPError, OSError) as error:
                self.subscribed.clear()
                log.warning("model.promoted listener disconnected (%s); retrying in %.0f s",
                            error, delay)
                self._stop.wait(delay)
                delay = min(delay * 2, 30.0)
            first = False

    def _consume(self, refresh_first: bool) -> None:
        connection = pika.BlockingConnection(self.parameters)
        try:
            channel = connection.channel()
            channel.exchange_declare(self.exchange, exchange_type="topic", durable=True)
            channel.queue_declare(self.queue, exclusive=True, auto_delete=True)
            channel.queue_bind(self.queue, self.exchange, routing_key=EVENT)
            self.subscribed.set()
            if refresh_first:
                self.refresh(None)
            for method, _properties, body in channel.consume(self.queue, auto_ack=True,
                                                             inactivity_timeout=1.0):
                if self._stop.is_set():
                    break
                if method is not None:
                    self._handle(body)
        finally:
            self.subscribed.clear()
            if connection.is_open:
                try:
                    connection.close()
                except (pika.exceptions.AMQPError, OSError):
                    pass

    def _handle(self, body: bytes) -> None:
        try:
            event = Event.model_validate(json.loads(body))
        except ValueError as error:
            log.warning("ignored an unreadable model.promoted event: %s", error)
            return
        if _wanted(event.payload):
            self.refresh(event.payload)


def subscribe_in_process(bus: InProcessEventBus, refresh: Refresh,
                         alive: Callable[[], bool]) -> None:
    """Embedded mode: refresh synchronously when the registry publishes in this process.
    The bus keeps handlers forever, so a closed app's handler turns itself off."""

    def handler(event: Event) -> None:
        if alive() and _wanted(event.payload):
            refresh(event.payload)

    bus.subscribe(EVENT, handler)


class RegistryPoller(_DaemonLoop):
    """Re-reads the registry every `interval` seconds (and at once while nothing loads)."""

    name = "serve-poller"

    def __init__(self, interval: float, refresh: Refresh, loaded: Callable[[], bool]) -> None:
        super().__init__()
        self.interval = interval
        self.refresh = refresh
        self.loaded = loaded

    def _run(self) -> None:
        while True:
            # Until a model loads, retry every few seconds; then at the configured pace.
            wait = min(self.interval or 5.0, 5.0) if not self.loaded() else self.interval
            if not wait or self._stop.wait(wait):
                return
            self.refresh(None)
