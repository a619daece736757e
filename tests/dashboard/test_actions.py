"""The dashboard's actions clicked in a real browser: roll back and retrain from the Models
page, promote the A/B winner from the Experiment page, each through the registry worker
or the broker the API uses, against real Postgres and RabbitMQ."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pika
import psycopg2

from tests.conftest import purge_service_queues, wait_for
from tests.dashboard.conftest import USER, champion_in_postgres, dsn, screenshot
from tests.serve.conftest import World, celery_worker


def confirming(page: Any) -> list[str]:
    """Accept every confirm dialog on `page`; the list collects their messages."""
    messages: list[str] = []
    page.on("dialog", lambda dialog: (messages.append(dialog.message), dialog.accept()))
    return messages


def latest_alias_change(url: str) -> tuple[str, str, int, int, str]:
    with psycopg2.connect(dsn(url)) as conn, conn.cursor() as cursor:
        cursor.execute("SELECT alias, action, from_version, to_version, reason "
                       "FROM alias_change ORDER BY id DESC LIMIT 1")
        return cursor.fetchone()


def transform_queue_depth() -> int:
    """Messages waiting on the transform queue (declared by purge_service_queues)."""
    from shared.celery_app import app as celery_app
    from shared.events import pika_parameters

    connection = pika.BlockingConnection(pika_parameters(celery_app.conf.broker_url))
    try:
        return connection.channel().queue_declare("transform", durable=True, passive=True
                                                  ).method.message_count
    finally:
        connection.close()


def test_rollback_from_the_models_page(logged_in, dashboard_env: dict[str, str],  # type: ignore[no-untyped-def]
                                       serve_db: str, world: World, tmp_path: Path) -> None:
    from services.registry import registry

    first, wide = world.versions["als"], world.versions["als_wide"]
    registry.promote(wide, reason="to be rolled back")
    context, url = logged_in
    with celery_worker("registry", dashboard_env, tmp_path):
        page = context.new_page()
        dialogs = confirming(page)
        page.goto(f"{url}/models")
        page.get_by_role("button", name="Roll back champion").click()
        answer = page.locator("#action p")
        answer.wait_for(timeout=120_000)  # the registry's answer, or "queued" after 30 s
        assert dialogs == ["Roll the champion back to the version it held before its last "
                           "promotion?"]
        assert answer.get_attribute("class") == "good", answer.inner_text()
        if "queued" not in answer.inner_text():
            assert answer.inner_text() == f"rollback: champion is now v{first} (was v{wide})"
        wait_for(lambda: champion_in_postgres(serve_db) == first, timeout=120,
                 what="the registry worker to roll the champion back")
        if "queued" in answer.inner_text():  # the page re-read the registry too early
            page.reload()
        newest = page.locator("#alias-history tbody tr").first
        wait_for(lambda: "rollback" in (newest.get_attribute("class") or ""), timeout=60,
                 what="the alias history to show the rollback")
        cells = newest.locator("td").all_inner_texts()
        assert cells[1:5] == ["champion", "rollback", f"v{wide}", f"v{first}"], cells
        assert f"dashboard, by {USER}" in cells[5]
        assert "champion" in page.locator(f"#v{first} .aliases").inner_text()
        screenshot(page, "models-rollback")

        # Nothing earlier to roll back to: the registry's refusal is shown, nothing moves.
        page.get_by_role("button", name="Roll back challenger").click()
        page.locator("#action p.bad").wait_for(timeout=120_000)
        assert "has no challenger to roll back" in page.locator("#action p").inner_text()
    alias, action, source, target, reason = latest_alias_change(serve_db)
    assert (alias, action, source, target) == ("champion", "rollback", wide, first)
    assert reason == f"dashboard, by {USER}"
    assert champion_in_postgres(serve_db) == first


def test_retrain_from_the_models_page_queues_the_chain(logged_in, serve_db: str,  # type: ignore[no-untyped-def]
                                                       world: World) -> None:
    from shared import retrain

    context, url = logged_in
    purge_service_queues()  # declared, and empty
    page = context.new_page()
    dialogs = confirming(page)
    page.goto(f"{url}/models")
    try:
        page.get_by_role("button", name="Retrain").click()
        answer = page.locator("#action p")
        answer.wait_for()
        assert dialogs == ["Retrain now (transform, train, register, evaluate, promote)?"]
        running = retrain.running_retrain()
        assert running is not None, answer.inner_text()
        # The chain the API queues, under the same lock, its holder saying who asked.
        assert answer.get_attribute("class") == "good"
        assert answer.inner_text() == ("retrain queued: transform -> train -> register -> "
                                       f"evaluate -> promote (task {running.task_id})")
        assert running.holder.startswith("dashboard-")
        assert transform_queue_depth() >= 1  # its first link waits for a transform worker

        overview = context.new_page()  # the overview shows the retrain running
        overview.goto(f"{url}/")
        assert "running now" in overview.locator("#last-retrain").inner_text()

        page.get_by_role("button", name="Retrain").click()  # a second one is refused
        page.locator("#action p.bad").wait_for()
        refused = page.locator("#action p").inner_text()
        assert "already running" in refused and running.task_id in refused
        screenshot(page, "models-retrain")
    finally:
        purge_service_queues()  # no transform worker should ever run this chain
        held = retrain.running_retrain()
        if held is not None:
            retrain.release_lock(held.holder)  # as the chain's last link would


def test_promote_the_winner_from_the_experiment_page(logged_in, dashboard_env: dict[str, str],  # type: ignore[no-untyped-def]
                                                     use_settings, serve_db: str,
                                                     world: World, tmp_path: Path) -> None:
    from services.registry import registry
    from shared.db import Feedback, Impression, session_scope

    champion, challenger = world.versions["als"], world.versions["itemknn"]
    # A large effect, so that 150 impressions per arm are the sample the test needs.
    use_settings(AB_MIN_EFFECT="4")
    registry.promote(challenger, alias="challenger", reason="A/B test")
    context, url = logged_in
    with celery_worker("registry", dashboard_env, tmp_path):
        page = context.new_page()
        dialogs = confirming(page)
        page.goto(f"{url}/experiment")
        assert page.locator("#verdict").inner_text() == "collecting"
        button = page.get_by_role("button", name="Promote the winner")
        button.click()  # no winner yet: refused, nothing moves
        page.locator("#action p.bad").wait_for()
        assert "nothing promoted" in page.locator("#action p").inner_text()
        assert dialogs == ["Promote the challenger if it won the A/B test?"]
        assert champion_in_postgres(serve_db) == champion

        now = dt.datetime.now(dt.UTC)
        with session_scope() as session:  # challenger CTR 0.5 against the champion's 0.2
            for n in range(300):
                variant = "champion" if n % 2 else "challenger"
                session.add(Impression(request_id=f"r{n}", user_id=n + 1, movie_id=50,
                                       position=1, variant=variant, source="model",
                                       model_version=champion if n % 2 else challenger,
                                       served_at=now))
                if (n % 10 == 1) if variant == "champion" else (n % 4 == 0):
                    session.add(Feedback(event_id=f"f{n}", user_id=n + 1, movie_id=50,
                                         type="click", request_id=f"r{n}", occurred_at=now))
        # The page polls: the verdict changes without a reload.
        page.locator("#verdict", has_text="challenger").wait_for(timeout=60_000)
        button.click()
        page.locator("#action p.good").wait_for(timeout=120_000)
        answer = page.locator("#action p").inner_text()
        if "queued" not in answer:
            assert answer == f"promote: champion is now v{challenger} (was v{champion})"
        wait_for(lambda: champion_in_postgres(serve_db) == challenger, timeout=120,
                 what="the registry worker to promote the winner")
        screenshot(page, "experiment-promote")
    alias, action, source, target, reason = latest_alias_change(serve_db)
    assert (alias, action, source, target) == ("champion", "promote", champion, challenger)
    assert reason.startswith("A/B: challenger CTR 0.5000 vs champion 0.2000")
    assert reason.endswith(f"dashboard, by {USER}")
