"""The private servers start, serve, stop (port closed) and start again with their data."""

from __future__ import annotations

import psycopg2
import pytest
import redis
from kombu import Connection

from tests.servers import port_open, private_postgres, private_rabbitmq, private_redis

pytestmark = [pytest.mark.chaos, pytest.mark.slow]


def test_private_redis_stops_and_starts_empty() -> None:
    with private_redis() as server:
        client = redis.Redis.from_url(server.url)
        client.set("key", "value")
        assert client.get("key") == b"value"
        server.stop()
        assert not port_open(server.port)
        server.start()
        assert client.get("key") is None  # no persistence: a restart loses the cache
        client.close()
    assert not port_open(server.port)


def test_private_postgres_keeps_rows_across_a_restart() -> None:
    with private_postgres() as server:
        dsn = f"host=127.0.0.1 port={server.port} user=postgres dbname=postgres"
        with psycopg2.connect(dsn) as conn, conn.cursor() as cursor:
            cursor.execute("CREATE TABLE kept (id int)")
            cursor.execute("INSERT INTO kept VALUES (1), (2)")
        server.stop()
        assert not port_open(server.port)
        server.start()
        with psycopg2.connect(dsn) as conn, conn.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM kept")
            assert cursor.fetchone() == (2,)
    assert not port_open(server.port)


def test_private_rabbitmq_keeps_persistent_messages_across_a_restart() -> None:
    with private_rabbitmq() as server:
        with Connection(server.url) as conn:
            queue = conn.SimpleQueue("chaos-kept", serializer="json")
            queue.put({"n": 1})  # SimpleQueue declares a durable queue, persistent messages
            queue.close()
        server.stop()
        assert not port_open(server.port)
        server.start()
        with Connection(server.url) as conn:
            queue = conn.SimpleQueue("chaos-kept", serializer="json")
            message = queue.get(timeout=10)
            assert message.payload == {"n": 1}
            message.ack()
            queue.close()
    assert not port_open(server.port)
