"""Events: facts published on a durable topic exchange (pika), or in-process when embedded.

Commands go through Celery; events say what happened (`ratings.ingested`,
`model.promoted`, `metrics.online`, `feedback.received`) to whoever listens.
"""

from __future__ import annotations

import datetime as dt
import json
import threading
import uuid
from collections.abc import Callable, Iterable
from typing import Any, Protocol
from urllib.parse import unquote, urlparse

import pika
import pika.exceptions
from pydantic import BaseModel, Field

from shared.settings import get_settings


class Event(BaseModel):
    """The envelope every event travels in, as JSON."""

    type: str = Field(description="Routing key, e.g. 'ratings.ingested'.")
    id: str = Field(default_factory=lambda: uuid.uuid4().hex)
    occurred_at: dt.datetime = Field(default_factory=lambda: dt.datetime.now(dt.UTC))
    payload: dict[str, Any] = Field(default_factory=dict)


Handler = Callable[[Event], None]


class EventBus(Protocol):
    def publish(self, event_type: str, payload: dict[str, Any]) -> Event: ...


def topic_matches(pattern: str, routing_key: str) -> bool:
    """AMQP topic matching: `*` is exactly one word, `#` zero or more words."""

    def match(p: list[str], k: list[str]) -> bool:
        if not p:
            return not k
        if p[0] == "#":
            return any(match(p[1:], k[i:]) for i in range(len(k) + 1))
        return bool(k) and p[0] in ("*", k[0]) and match(p[1:], k[1:])

    return match(pattern.split("."), routing_key.split("."))


class InProcessEventBus:
    """Embedded mode: handlers run synchronously in the publisher's process."""

    def __init__(self) -> None:
        self._handlers: list[tuple[str, Handler]] = []
        self.published: list[Event] = []

    def subscribe(self, pattern: str, handler: Handler) -> None:
        self._handlers.append((pattern, handler))

    def publish(self, event_type: str, payload: dict[str, Any]) -> Event:
        event = Event(type=event_type, payload=payload)
        self.published.append(event)
        for pattern, handler in list(self._handlers):
            if topic_matches(pattern, event_type):
                handler(event)
        return event


def pika_parameters(broker_url: str) -> pika.ConnectionParameters:
    """Pika parameters from a Celery-style AMQP URL (`amqp://user:pw@host:port//`)."""
    parsed = urlparse(broker_url.replace("pyamqp://", "amqp://", 1))
    path = parsed.path[1:] if parsed.path.startswith("/") else parsed.path
    vhost = unquote(path) or "/"
    return pika.ConnectionParameters(
        host=parsed.hostname or "localhost",
        port=parsed.port or 5672,
        virtual_host=vhost,
        credentials=pika.PlainCredentials(
            unquote(parsed.username or "guest"), unquote(parsed.password or "guest")
        ),
        heartbeat=30,
        blocked_connection_timeout=30,
        connection_attempts=3,
        retry_delay=1,
    )


class PikaEventBus:
    """Durable topic exchange on RabbitMQ; publishes are confirmed and persistent."""

    def __init__(self, broker_url: str, exchange: str) -> None:
        self.parameters = pika_parameters(broker_url)
        self.exchange = exchange
        self._local = threading.local()

    def _channel(self) -> Any:
        channel = getattr(self._local, "channel", None)
        if channel is None or channel.is_closed:
            connection = pika.BlockingConnection(self.parameters)
            channel = connection.channel()
            channel.exchange_declare(self.exchange, exchange_type="topic", durable=True)
            channel.confirm_delivery()
            self._local.connection, self._local.channel = connection, channel
        return channel

    def publish(self, event_type: str, payload: dict[str, Any]) -> Event:
        """Publish and wait for the broker's confirm; reconnects once if the link dropped."""
        event = Event(type=event_type, payload=payload)
        body = event.model_dump_json().encode()
        properties = pika.BasicProperties(
            content_type="application/json", delivery_mode=2, message_id=event.id
        )
        for attempt in (1, 2):
            try:
                self._channel().basic_publish(
                    self.exchange, event_type, body, properties, mandatory=False
                )
                return event
            except (pika.exceptions.AMQPError, OSError):
                self.close()
                if attempt == 2:
                    raise
        return event

    def declare_queue(self, queue: str, patterns: Iterable[str]) -> None:
        """A durable queue bound to the exchange, so events wait for a consumer."""
        channel = self._channel()
        channel.queue_declare(queue, durable=True)
        for pattern in patterns:
            channel.queue_bind(queue, self.exchange, routing_key=pattern)

    def consume(
        self,
        queue: str,
        patterns: Iterable[str],
        handler: Handler,
        max_events: int | None = None,
        inactivity_timeout: float | None = None,
    ) -> int:
        """Handle events from a durable queue, acking each after its handler returns.

        Stops after `max_events`, or when nothing arrives for `inactivity_timeout`
        seconds; a handler that raises leaves its event on the queue (nack, requeue).
        """
        self.declare_queue(queue, patterns)
        channel = self._channel()
        channel.basic_qos(prefetch_count=1)
        handled = 0
        for method, _properties, body in channel.consume(
            queue, inactivity_timeout=inactivity_timeout
        ):
            if method is None:
                break
            try:
                handler(Event.model_validate(json.loads(body)))
            except Exception:
                channel.basic_nack(method.delivery_tag, requeue=True)
                raise
            channel.basic_ack(method.delivery_tag)
            handled += 1
            if max_events is not None and handled >= max_events:
                break
        channel.cancel()
        return handled

    def close(self) -> None:
        connection = getattr(self._local, "connection", None)
        self._local.connection = self._local.channel = None
        if connection is not None and connection.is_open:
            try:
                connection.close()
            except (pika.exceptions.AMQPError, OSError):
                pass


_embedded_bus = InProcessEventBus()
_buses: dict[tuple[str, str], PikaEventBus] = {}


def get_event_bus() -> InProcessEventBus | PikaEventBus:
    """The bus for the settings in force: RabbitMQ when BROKER_URL is set."""
    settings = get_settings()
    if not settings.broker_url:
        return _embedded_bus
    key = (settings.broker_url, settings.event_exchange)
    if key not in _buses:
        _buses[key] = PikaEventBus(*key)
    return _buses[key]
