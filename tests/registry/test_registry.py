"""The registry on the real Postgres and RabbitMQ: versions, aliases, events, the gate."""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import pytest

from services.registry import registry
from services.registry.registry import RegistryError
from shared.artifacts import write_artifact
from shared.db import Snapshot, session_scope
from shared.events import Event, PikaEventBus
from shared.settings import get_settings


@pytest.fixture
def reg(pg_url: str, broker_url: str, use_settings, tmp_path: Path) -> str:  # type: ignore[no-untyped-def]
    use_settings(DATABASE_URL=pg_url, BROKER_URL=broker_url, MODEL_PATH=str(tmp_path / "m"))
    with session_scope() as session:
        session.add(Snapshot(id="s1", ratings_fingerprint="f", protocol="random", params={},
                             counts={}, artifact_path="snapshots/x", sha256="0" * 64))
    return pg_url


def artifact(seed: int) -> tuple[str, str]:
    ref = write_artifact("models", {"w": np.full(4, seed)}, {"seed": seed})
    return ref.path, ref.sha256


def test_versions_number_up_and_repeat_registration_is_one_version(reg: str) -> None:
    path, sha = artifact(1)
    first = registry.register("s1", "als", {"factors": 8}, path, sha)
    again = registry.register("s1", "als", {"factors": 8}, path, sha, task_id="redelivered")
    other = registry.register("s1", "als", {"factors": 16}, *artifact(2))
    assert (first["version"], first["created"]) == (1, True)
    assert (again["version"], again["created"]) == (1, False)
    assert other["version"] == 2
    assert [v["version"] for v in registry.list_versions()] == [1, 2]


def test_registering_a_wrong_checksum_is_refused(reg: str) -> None:
    path, _ = artifact(1)
    with pytest.raises(RegistryError, match="has sha256 .*, not 000"):
        registry.register("s1", "als", {}, path, "000")


def test_promote_rollback_and_model_promoted_events(reg: str) -> None:
    bus = PikaEventBus(get_settings().broker_url, get_settings().event_exchange)
    queue = f"test.promoted.{uuid.uuid4().hex[:8]}"
    bus.declare_queue(queue, ["model.promoted"])
    try:
        for seed in (1, 2, 3):
            registry.register("s1", "ease", {"l2": seed}, *artifact(seed))
        with pytest.raises(RegistryError, match="no champion yet"):
            registry.resolve("latest")
        registry.promote(1)
        registry.promote(3, reason="better")
        assert registry.resolve("latest")["version"] == 3
        assert registry.resolve("2")["version"] == 2
        assert registry.rollback(reason="worse online")["version"] == 1
        with pytest.raises(RegistryError, match="no earlier version to roll back to"):
            registry.rollback()
        events: list[Event] = []
        bus.consume(queue, ["model.promoted"], events.append, max_events=3, inactivity_timeout=5)
        moves = [(e.payload["previous"], e.payload["version"], e.payload["action"])
                 for e in events]
        assert moves == [(None, 1, "promote"), (1, 3, "promote"), (3, 1, "rollback")]
        assert events[1].payload["sha256"] and events[1].payload["artifact_path"]
        with pytest.raises(RegistryError, match="has no version 9"):
            registry.promote(9)
        with pytest.raises(RegistryError, match="alias 'best' is not one of"):
            registry.promote(1, alias="best")
    finally:
        bus._channel().queue_delete(queue)
        bus.close()


def evaluated(*scores: tuple[int, float], champion: tuple[int, float] | None = None) -> dict:
    models = [{"version": v, "algorithm": "ease", "params": {}, "metrics": {"ndcg@10": s}}
              for v, s in scores]
    return {"snapshot": {"snapshot_id": "s1"}, "models": models,
            "champion": {"version": champion[0], "metrics": {"ndcg@10": champion[1]}}
            if champion else None}


def test_gate_promotes_only_at_least_as_good(reg: str) -> None:
    for seed in (1, 2, 3):
        registry.register("s1", "ease", {"l2": seed}, *artifact(seed))
    first = registry.promote_if_better(evaluated((1, 0.40), (2, 0.45)))
    assert first["promoted"] and registry.resolve("latest")["version"] == 2
    worse = registry.promote_if_better(evaluated((3, 0.44), champion=(2, 0.45)))
    assert not worse["promoted"] and "< champion v2" in worse["reason"]
    assert registry.resolve("latest")["version"] == 2
    assert registry.resolve("challenger")["version"] == 3
    tie = registry.promote_if_better(evaluated((3, 0.45), champion=(2, 0.45)))
    assert tie["promoted"] and registry.resolve("latest")["version"] == 3
