"""The event bus: a durable topic exchange on the real RabbitMQ, and the in-process twin."""

from __future__ import annotations

import uuid

import pytest

from shared.events import Event, InProcessEventBus, PikaEventBus, topic_matches


@pytest.mark.parametrize(
    ("pattern", "key", "expected"),
    [
        ("model.promoted", "model.promoted", True),
        ("model.*", "model.promoted", True),
        ("model.*", "model.promoted.v2", False),
        ("#", "metrics.online", True),
        ("metrics.#", "metrics", True),
        ("*.received", "feedback.received", True),
        ("feedback.*", "model.promoted", False),
    ],
)
def test_topic_matching(pattern: str, key: str, expected: bool) -> None:
    assert topic_matches(pattern, key) is expected


def test_in_process_bus_delivers_to_matching_handlers() -> None:
    bus, seen = InProcessEventBus(), []
    bus.subscribe("model.*", seen.append)
    bus.publish("model.promoted", {"version": 2})
    bus.publish("metrics.online", {"ctr": 0.1})
    assert [e.payload for e in seen] == [{"version": 2}]


def test_events_wait_in_a_durable_queue_until_consumed(broker_url: str) -> None:
    exchange = f"test.events.{uuid.uuid4().hex[:8]}"
    queue = f"{exchange}.listener"
    publisher, consumer = PikaEventBus(broker_url, exchange), PikaEventBus(broker_url, exchange)
    try:
        consumer.declare_queue(queue, ["model.*"])
        sent = [publisher.publish("model.promoted", {"version": v}) for v in (1, 2)]
        publisher.publish("metrics.online", {"ignored": True})
        publisher.close()  # the consumer reads after the publisher is gone: durability
        received: list[Event] = []
        consumer.consume(queue, ["model.*"], received.append, max_events=2, inactivity_timeout=5)
        assert [e.id for e in received] == [e.id for e in sent]
        assert [e.payload["version"] for e in received] == [1, 2]
        assert consumer.consume(queue, ["model.*"], received.append, inactivity_timeout=0.5) == 0
    finally:
        channel = consumer._channel()
        channel.queue_delete(queue)
        channel.exchange_delete(exchange)
        consumer.close()


def test_failing_handler_leaves_the_event_queued(broker_url: str) -> None:
    exchange = f"test.events.{uuid.uuid4().hex[:8]}"
    queue = f"{exchange}.listener"
    bus = PikaEventBus(broker_url, exchange)
    try:
        bus.declare_queue(queue, ["feedback.received"])
        bus.publish("feedback.received", {"n": 1})

        def broken(_: Event) -> None:
            raise RuntimeError("handler failed")

        with pytest.raises(RuntimeError):
            bus.consume(queue, ["feedback.received"], broken, max_events=1, inactivity_timeout=5)
        bus.close()
        again: list[Event] = []
        bus.consume(queue, ["feedback.received"], again.append, max_events=1, inactivity_timeout=5)
        assert again[0].payload == {"n": 1}
    finally:
        channel = bus._channel()
        channel.queue_delete(queue)
        channel.exchange_delete(exchange)
        bus.close()
