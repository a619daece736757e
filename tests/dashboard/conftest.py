"""Fixtures for the dashboard: serve's trained ml-100k registry (a private database copy
per test), the dashboard under a real uvicorn, and Debian's Chromium driven by Playwright."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg2
import pytest
from sqlalchemy.engine import make_url

from tests.serve.conftest import live_server, serve_db, serve_env, world  # noqa: F401

USER, PASSWORD = "operator", "dashboard-test-password"
SCREENSHOTS = Path(os.environ.get("DASHBOARD_SCREENSHOTS",
                                  Path(__file__).resolve().parents[2] / ".screenshots"))


@pytest.fixture
def dashboard_env(serve_env: dict[str, str], use_settings) -> dict[str, str]:  # noqa: F811  # type: ignore[no-untyped-def]
    env = {**serve_env, "DASHBOARD_USER": USER, "DASHBOARD_PASSWORD": PASSWORD}
    use_settings(**env)
    return env


@pytest.fixture
def dashboard_url(dashboard_env: dict[str, str]) -> Iterator[str]:
    """The dashboard app under uvicorn on a free loopback port."""
    from dashboard.app import create_app

    with live_server(create_app()) as url:
        yield url


def chromium_path() -> str:
    """Debian's chromium; installed here when missing, as .ci/run does on a fresh machine."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None and os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run("apt-get update -qq && apt-get install -y -qq chromium >/dev/null",
                       shell=True, check=False, timeout=900)
        found = shutil.which("chromium")
    if not found:
        pytest.fail("chromium is not installed: apt-get install chromium (see .ci/run)",
                    pytrace=False)
    return found


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    """Debian's Chromium, headless (Playwright cannot download a browser here). Per module:
    Playwright's sync API keeps an event loop running while it is open, which would make
    every later asyncio.run() in the session fail."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=chromium_path(), headless=True,
                                              args=["--no-sandbox", "--disable-gpu"])
        yield launched
        launched.close()


@pytest.fixture
def logged_in(browser, dashboard_url: str):  # type: ignore[no-untyped-def]
    """A browser context logged in through the form; yields (context, base URL)."""
    context = browser.new_context(viewport={"width": 1360, "height": 900})
    # The machine is shared: a page drawing matplotlib figures may wait for a core.
    context.set_default_timeout(120_000)
    context.set_default_navigation_timeout(120_000)
    page = context.new_page()
    page.goto(f"{dashboard_url}/")
    assert page.url.startswith(f"{dashboard_url}/login"), page.url
    page.fill("input[name=username]", USER)
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(f"{dashboard_url}/")
    page.close()
    yield context, dashboard_url
    context.close()


def screenshot(page, name: str) -> Path:  # type: ignore[no-untyped-def]
    """Saved for a person to look at (DASHBOARD_SCREENSHOTS, else .screenshots/)."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def dsn(url: str) -> str:
    """A SQLAlchemy URL as psycopg2 takes it."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def champion_in_postgres(url: str) -> int:
    with psycopg2.connect(dsn(url)) as conn, conn.cursor() as cursor:
        cursor.execute("SELECT version FROM model_alias WHERE name = 'recsys' "
                       "AND alias = 'champion'")
        return int(cursor.fetchone()[0])


def log_in(client: httpx.Client, password: str = PASSWORD, user: str = USER) -> httpx.Response:
    """The login form posted with its CSRF token, as a browser does."""
    form = client.get("/login").text
    token = re.search(r'name="csrf_token" value="([^"]+)"', form).group(1)
    return client.post("/login", data={"username": user, "password": password,
                                       "csrf_token": token, "next": "/"})
