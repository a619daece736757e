"""Fault scenarios on the real services (bench/chaos.py's functions at a small size): a
broker, database or cache restart under load, malformed requests, a hot swap under load,
kill -9 of each worker kind mid-task, and the whole stack down and up. Every outage is of a
private server the scenario starts (tests/servers.py); the product's promise is no accepted
event lost or stored twice and no 5xx answer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bench.chaos import (
    feedback_broker_restart,
    feedback_postgres_restart,
    hot_swap_under_load,
    malformed_requests,
    recommendations_redis_restart,
    whole_stack_down_up,
    worker_killed_mid_task,
)

pytestmark = [pytest.mark.chaos, pytest.mark.slow, pytest.mark.timeout(900)]


def report(name: str, counts: dict[str, Any]) -> None:
    print(f"{name}: " + ", ".join(f"{key} {value}" for key, value in counts.items()))


def assert_promise(counts: dict[str, Any]) -> None:
    assert counts["sent"] > 0 and counts["accepted"] > 0, counts
    assert counts["lost"] == 0, counts
    assert counts["duplicated"] == 0, counts
    assert counts["5xx"] == 0, counts


def test_feedback_across_a_broker_restart(service_urls: dict[str, str]) -> None:
    counts = feedback_broker_restart(service_urls["postgres"], service_urls["redis"],
                                     outage=3.0)
    report("feedback_broker_restart", counts)
    # What holds today too: everything accepted is stored exactly once.
    assert counts["persisted"] == counts["accepted"] and counts["duplicated"] == 0, counts
    assert_promise(counts)


def test_feedback_across_a_postgres_restart(service_urls: dict[str, str]) -> None:
    counts = feedback_postgres_restart(service_urls["postgres"], service_urls["redis"],
                                       outage=3.0)
    report("feedback_postgres_restart", counts)
    assert counts["outage_s"] >= 3.0
    assert counts["persisted"] == counts["accepted"], counts
    assert_promise(counts)


def test_recommendations_across_a_redis_restart(service_urls: dict[str, str],
                                                ml100k: Path) -> None:
    counts = recommendations_redis_restart(service_urls["postgres"], service_urls["redis"],
                                           outage=3.0, data=ml100k)
    report("recommendations_redis_restart", counts)
    assert counts["outage_s"] >= 3.0
    assert counts["connection_errors"] == 0, counts
    assert counts["accepted"] == counts["sent"], counts  # every list answered 200
    assert counts["5xx"] == 0, counts


def test_malformed_requests_get_no_5xx(service_urls: dict[str, str], ml100k: Path) -> None:
    counts = malformed_requests(service_urls["postgres"], service_urls["redis"], data=ml100k)
    report("malformed_requests", counts)
    assert counts["sent"] > 100
    assert counts["accepted"] == 0, counts  # none of them is a valid request
    assert counts["connection_errors"] == 0, counts
    assert counts["5xx"] == 0, counts


def test_hot_swap_under_load(service_urls: dict[str, str], ml100k: Path) -> None:
    counts = hot_swap_under_load(service_urls["postgres"], service_urls["redis"], data=ml100k)
    report("hot_swap_under_load", counts)
    assert len(counts["versions_served"]) == 2, counts  # before and after the promote
    assert counts["connection_errors"] == 0, counts
    assert counts["accepted"] == counts["sent"], counts
    assert counts["5xx"] == 0, counts


# What each kind's task must leave exactly one of: a batch, a snapshot, a version of each of
# the two algorithms trained (train.tune chained to registry.register), registered, or
# evaluated (their figures stored once, as the completed task returned them).
EFFECTS = {"ingest": 1, "transform": 1, "train": 2, "registry": 2, "eval": 2}


@pytest.mark.parametrize("service", list(EFFECTS))
def test_worker_killed_mid_task_completes_once(service: str, service_urls: dict[str, str],
                                               ml100k: Path) -> None:
    counts = worker_killed_mid_task(service_urls["postgres"], service_urls["redis"], service,
                                    data=ml100k)
    report(f"{service}_worker_killed", counts)
    assert counts["worker_lost_logged"], counts  # the pool process really died mid-task
    assert counts["persisted"] == EFFECTS[service] and counts["lost"] == 0, counts
    assert counts["duplicated"] == 0, counts  # one of each, not two


def test_whole_stack_down_and_up_keeps_everything(service_urls: dict[str, str],
                                                  ml100k: Path) -> None:
    counts = whole_stack_down_up(service_urls["postgres"], service_urls["redis"], data=ml100k)
    report("whole_stack_down_up", counts)
    assert counts["rows_before"]["rating"] > 0 and counts["rows_before"]["model_alias"] > 0
    assert counts["rows_changed"] == [], counts  # ratings, versions, aliases all kept
    assert counts["persisted"] == counts["accepted"], counts
    assert counts["served_before"] == counts["served_after"] == counts["champion"], counts
    assert counts["outage_s"] > 0
    assert_promise(counts)
