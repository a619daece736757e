"""The Celery app's contract: durable queues per service, acks late, JSON only, routing."""

from __future__ import annotations

import pytest

from shared.celery_app import ServiceQueue, app, configure_app, queue_of
from shared.settings import get_settings


def test_reliability_settings(use_settings, broker_url: str) -> None:  # type: ignore[no-untyped-def]
    use_settings(BROKER_URL=broker_url)
    conf = configure_app(get_settings()).conf
    assert conf.task_acks_late and conf.task_reject_on_worker_lost
    assert conf.worker_prefetch_multiplier == 1
    assert conf.accept_content == ["json"] and conf.task_serializer == "json"
    assert conf.broker_transport_options["confirm_publish"] is True
    assert not conf.task_always_eager
    assert {q.name for q in conf.task_queues} == {q.value for q in ServiceQueue}
    assert all(q.durable for q in conf.task_queues)


def test_embedded_runs_eagerly(use_settings) -> None:  # type: ignore[no-untyped-def]
    use_settings()
    assert app.conf.task_always_eager


def test_routing_by_name() -> None:
    assert queue_of("ingest.load") == "ingest"
    assert queue_of("train.fit") == "train"
    with pytest.raises(ValueError, match="names no service queue"):
        queue_of("serve.answer")
