"""The dashboard in a real browser (Playwright driving Debian's Chromium) against real
Postgres, RabbitMQ and a real registry worker."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import subprocess
import time
from pathlib import Path

import httpx
import psycopg2
import pytest

from tests.conftest import recsys_command, wait_for
from tests.dashboard.conftest import (
    USER,
    champion_in_postgres,
    dsn,
    log_in,
    screenshot,
)
from tests.serve.conftest import World, celery_worker

PAGES = ["/", "/models", "/experiment", "/online", "/users/1", "/items/50", "/decisions",
         "/fragments/overview", "/fragments/experiment"]


def test_nothing_is_served_without_the_login(dashboard_url: str, serve_db: str) -> None:
    with httpx.Client(base_url=dashboard_url, timeout=60) as client:
        for path in PAGES:
            answer = client.get(path)
            assert answer.status_code == 303, (path, answer.status_code)
            assert answer.headers["location"].startswith("/login?next="), path
            assert "Ratings" not in answer.text and "champion" not in answer.text
            polled = client.get(path, headers={"HX-Request": "true"})
            assert polled.status_code == 401, path
        for path in ("/models/2/promote", "/models/rollback", "/retrain",
                     "/experiment/promote"):
            assert client.post(path, data={"alias": "champion"}).status_code == 401, path
        assert log_in(client, password="wrong").status_code == 401
        assert client.get("/users/1").status_code == 303
        cookie = log_in(client).headers["set-cookie"]
        assert "httponly" in cookie.lower() and "samesite=lax" in cookie.lower()
        assert client.get("/users/1").status_code == 200


def test_a_post_without_the_csrf_token_is_refused(dashboard_url: str, serve_db: str,
                                                  world: World) -> None:
    with httpx.Client(base_url=dashboard_url, timeout=60) as client:
        assert log_in(client).status_code == 303
        before = champion_in_postgres(serve_db)
        for headers in ({}, {"X-CSRF-Token": "not-the-token"}):
            refused = client.post(f"/models/{world.versions['itemknn']}/promote",
                                  data={"alias": "champion"}, headers=headers)
            assert refused.status_code == 403 and "CSRF" in refused.text
        assert client.post("/logout").status_code == 403  # logout is an action too
        assert champion_in_postgres(serve_db) == before
        page = client.get("/models").text
        token = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)
        assert client.post("/logout", data={"csrf_token": token}).status_code == 303
        assert client.get("/models").status_code == 303  # logged out


def test_overview_counts_and_a_promote_seen_live(logged_in, dashboard_env: dict[str, str],  # type: ignore[no-untyped-def]
                                                 serve_db: str, world: World,
                                                 tmp_path: Path) -> None:
    from services.eval.versions import evaluate_version

    evaluate_version(world.versions["als"])  # the offline nDCG@10 the overview shows
    evaluated = evaluate_version(world.versions["als_wide"])
    context, url = logged_in
    with psycopg2.connect(dsn(serve_db)) as conn, conn.cursor() as cursor:
        expected = {}
        for name, sql in (("ratings", "SELECT count(*) FROM rating"),
                          ("users", "SELECT count(DISTINCT user_id) FROM rating"),
                          ("movies", "SELECT count(*) FROM movie"),
                          ("feedback", "SELECT count(*) FROM feedback"),
                          ("impressions", "SELECT count(*) FROM impression")):
            cursor.execute(sql)
            expected[name] = cursor.fetchone()[0]
    assert expected["ratings"] == 100_000 and expected["users"] == 943
    overview = context.new_page()
    overview.goto(f"{url}/")
    for name, total in expected.items():
        shown = overview.locator(f'[data-count="{name}"] .value')
        assert shown.get_attribute("data-total") == str(total), name
        assert shown.inner_text() == f"{total:,}", name
    champion = overview.locator("#champion .value")
    assert champion.get_attribute("data-version") == str(world.versions["als"])
    assert "als" in champion.inner_text()
    ndcg = evaluate_version(world.versions["als"])["metrics"]["ndcg@10"]
    assert f"{ndcg:.4f}" in overview.locator("#champion").inner_text()
    wait_for(lambda: "database" in overview.locator("#checks").inner_text(), timeout=30,
             what="the dependency checks on the overview")
    checks = overview.locator("#checks").inner_text()
    assert re.search(r"up\s+database", checks) and re.search(r"up\s+broker", checks), checks
    screenshot(overview, "overview")

    target = world.versions["als_wide"]
    with celery_worker("registry", dashboard_env, tmp_path):
        models = context.new_page()
        models.goto(f"{url}/models")
        row = models.locator(f"#v{target}")
        assert f"{evaluated['metrics']['ndcg@10']:.4f}" in row.inner_text()
        dialogs: list[str] = []
        models.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.accept()))
        row.get_by_role("button", name="Promote to champion").click()
        # The answer comes once the registry worker has moved the alias, or after the
        # admin API's 30 s wait as "queued" (a loaded machine), then moved meanwhile.
        models.locator("#action p").wait_for(timeout=120_000)
        assert dialogs == [f"Promote v{target} (als) to champion?"]
        answer = models.locator("#action p")
        assert answer.get_attribute("class") == "good", answer.inner_text()
        if "queued" not in answer.inner_text():
            assert f"champion is now v{target}" in answer.inner_text()
        wait_for(lambda: champion_in_postgres(serve_db) == target, timeout=120,
                 what="the registry worker to move the champion")
        if "queued" in answer.inner_text():  # the page re-read the registry too early
            models.reload()
        wait_for(lambda: "champion" in row.locator(".aliases").inner_text(), timeout=60,
                 what="the Models page to show the moved alias")
        screenshot(models, "models")
    assert champion_in_postgres(serve_db) == target
    # The overview page, not reloaded, shows the new champion by its polling.
    overview.locator(f'#champion .value[data-version="{target}"]').wait_for(timeout=20_000)
    assert overview.url == f"{url}/"
    with psycopg2.connect(dsn(serve_db)) as conn, conn.cursor() as cursor:
        cursor.execute("SELECT action, to_version, reason FROM alias_change ORDER BY id DESC "
                       "LIMIT 1")
        action, to_version, reason = cursor.fetchone()
    assert (action, to_version) == ("promote", target) and USER in reason


def test_user_page_lists_ratings_and_unrated_recommendations(logged_in, serve_db: str,  # type: ignore[no-untyped-def]
                                                             world: World) -> None:
    context, url = logged_in
    user_id = 42
    with psycopg2.connect(dsn(serve_db)) as conn, conn.cursor() as cursor:
        cursor.execute("SELECT movie_id FROM rating WHERE user_id = %s", (user_id,))
        rated = {row[0] for row in cursor.fetchall()}
    page = context.new_page()
    page.goto(f"{url}/")
    page.fill("input[name=user_id]", str(user_id))
    page.get_by_role("button", name="User").click()
    page.wait_for_url(f"{url}/users/{user_id}")
    listed = {int(m) for m in page.locator("#ratings tr[data-movie]").evaluate_all(
        "rows => rows.map(r => r.dataset.movie)")}
    assert listed == rated and len(rated) > 20
    first = page.locator("#ratings tr[data-movie]").first.inner_text()
    assert re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", first)  # a time
    assert any(world.movies[m][0] in page.locator("#ratings").inner_text() for m in rated)
    served = [int(m) for m in page.locator("#list-champion li[data-movie]").evaluate_all(
        "items => items.map(i => i.dataset.movie)")]
    assert len(served) == 10 and not set(served) & rated
    assert page.locator("#list-champion .source").inner_text() == "model"
    assert world.movies[served[0]][0] in page.locator("#list-champion").inner_text()
    screenshot(page, "user")

    unknown = context.new_page()  # a user the model never saw: the popular list
    unknown.goto(f"{url}/users/99999")
    assert unknown.locator("#list-champion .source").inner_text() == "popular"
    assert unknown.locator("#ratings").inner_text().count("no ratings") == 1


def test_experiment_page_shows_the_ab_status_figures(logged_in, dashboard_env: dict[str, str],  # type: ignore[no-untyped-def]
                                                     serve_db: str, world: World) -> None:
    from services.registry import registry
    from shared.db import Feedback, Impression, session_scope

    registry.promote(world.versions["itemknn"], alias="challenger", reason="A/B test")
    time.sleep(0.1)  # served after the challenger got its alias, which starts the test
    now = dt.datetime.now(dt.UTC)
    with session_scope() as session:
        for n in range(300):
            variant = "champion" if n % 2 else "challenger"
            session.add(Impression(request_id=f"r{n}", user_id=n + 1, movie_id=50, position=1,
                                   model_version=world.versions["als" if n % 2 else "itemknn"],
                                   variant=variant, source="model", served_at=now))
            if (n % 10 == 1) if variant == "champion" else (n % 4 == 0):
                session.add(Feedback(event_id=f"f{n}", user_id=n + 1, movie_id=50,
                                     type="click", request_id=f"r{n}", occurred_at=now))
    context, url = logged_in
    page = context.new_page()
    page.goto(f"{url}/experiment")
    done = subprocess.run([*recsys_command(), "ab", "status", "--json"], capture_output=True,
                          text=True, env={**os.environ, **dashboard_env},
                          timeout=120)
    assert done.returncode == 0, done.stderr
    status = json.loads(done.stdout.strip().splitlines()[-1])
    for arm, figures in status["arms"].items():
        row = page.locator(f'tr[data-arm="{arm}"]')
        assert row.locator(".impressions").inner_text() == str(figures["impressions"])
        assert row.locator(".clicks").inner_text() == str(figures["clicks"])
        assert row.locator(".ctr").inner_text() == f"{figures['ctr']:.4f}"
    assert set(status["arms"]) == {"champion", "challenger"}
    assert page.locator("#verdict").inner_text() == status["winner"]
    assert page.locator("#z").inner_text() == f"{status['z']:.4f}"
    assert page.locator("#p").inner_text() == f"{status['p_value']:.4f}"
    assert page.locator("#needed").inner_text() == str(status["min_sample_per_arm"])
    screenshot(page, "experiment")

    # The same impressions as an online window: the Online page plots it, the challenger's
    # promotion marked.
    from services.eval.online import store_window, window_figures

    start, end = now - dt.timedelta(minutes=1), dt.datetime.now(dt.UTC) + dt.timedelta(minutes=1)
    store_window(start, end, window_figures(start, end, 10, 3600))
    online = context.new_page()
    online.goto(f"{url}/online")
    assert online.locator('svg[aria-label="online-metrics"]').count() == 1
    rows = online.locator("#windows tbody tr").all_inner_texts()
    assert {"champion", "challenger"} <= {cell for row in rows for cell in row.split("\t")}
    screenshot(online, "online")


@pytest.mark.parametrize("path,name", [("/items/50", "item"), ("/decisions", "decisions")])
def test_other_pages_render(logged_in, serve_db: str, world: World, path: str,  # type: ignore[no-untyped-def]
                            name: str) -> None:
    context, url = logged_in
    page = context.new_page()
    answer = page.goto(f"{url}{path}")
    assert answer is not None and answer.status == 200
    if name == "item":
        assert world.movies[50][0] in page.locator("h1").inner_text()
        similar = page.locator("#similar li a").all_inner_texts()
        assert len(similar) == 10 and world.movies[50][0] not in similar
        with psycopg2.connect(dsn(serve_db)) as conn, conn.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM rating WHERE movie_id = 50")
            assert f"{cursor.fetchone()[0]:,}" in page.locator(".cards").inner_text()
    screenshot(page, name)
