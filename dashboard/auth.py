"""The login: a user and password from settings, a signed session cookie, CSRF tokens.

The session cookie is Starlette's (signed with a key made at start-up, HttpOnly,
SameSite=Lax), so a restart logs everyone out. Every POST carries the session's CSRF
token, in the form field `csrf_token` or the `X-CSRF-Token` header htmx sends.
"""

from __future__ import annotations

import hmac
import secrets
from urllib.parse import quote

from fastapi import HTTPException, Request

from shared.settings import Settings

CSRF_FIELD = "csrf_token"
CSRF_HEADER = "x-csrf-token"


class LoginRequired(Exception):
    """The request has no logged-in session."""


def credentials_match(settings: Settings, username: str, password: str) -> bool:
    """Both compared in constant time, so a wrong user and a wrong password look alike."""
    user, expected = settings.dashboard_credentials
    user_ok = hmac.compare_digest(username.encode(), user.encode())
    password_ok = hmac.compare_digest(password.encode(), expected.encode())
    return bool(expected) and user_ok and password_ok


def csrf_token(request: Request) -> str:
    """The session's token, made on first use (also before login, for the login form)."""
    token = request.session.get("csrf")
    if not token:
        token = request.session["csrf"] = secrets.token_urlsafe(32)
    return str(token)


async def check_csrf(request: Request) -> None:
    """403 unless the request carries the session's CSRF token."""
    expected = request.session.get("csrf")
    given = request.headers.get(CSRF_HEADER)
    if given is None:
        form = await request.form()
        value = form.get(CSRF_FIELD)
        given = value if isinstance(value, str) else None
    if not expected or not given or not hmac.compare_digest(given.encode(),
                                                             str(expected).encode()):
        raise HTTPException(403, "missing or wrong CSRF token: reload the page and try again")


def require_login(request: Request) -> str:
    """The logged-in user; LoginRequired (401 or a redirect to /login) otherwise."""
    user = request.session.get("user")
    if not user:
        raise LoginRequired()
    return str(user)


async def require_action(request: Request) -> str:
    """An action: the login first (401), then the CSRF token (403); the user."""
    user = require_login(request)
    await check_csrf(request)
    return user


def login_redirect_target(request: Request) -> str:
    path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return f"/login?next={quote(path, safe='/')}"


def safe_next(target: str | None) -> str:
    """Only a path on this site: never an absolute URL to elsewhere."""
    if not target or not target.startswith("/") or target.startswith("//"):
        return "/"
    return target
