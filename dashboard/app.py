"""The dashboard: server-rendered pages over the registry, eval and serve's data.

Its own FastAPI process (`recsys dashboard`, DASHBOARD_PORT), so its page renders and
model loads never share a core's event loop with serve's recommendation path. Pages are
Jinja2 templates; the live parts are htmx fragments polled every few seconds. Alias
moves and retrains go through the registry tasks and the retrain lock exactly as the
admin API does (services/serve/admin.py).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import secrets
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Form, HTTPException, Request
from fastapi import Path as PathParam
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from starlette.middleware.sessions import SessionMiddleware

from dashboard import auth, queries
from dashboard.lists import ModelCache, history_of, serve_list, similar_movies
from services.eval import ab, plots, report
from services.serve import admin
from services.serve.models import ModelLoadError
from services.serve.schemas import RetrainIn
from shared.celery_app import configure_app
from shared.db import get_engine, session_scope
from shared.doctor import Check, live_checks
from shared.retrain import RetrainRunning
from shared.settings import Settings, get_settings

HERE = Path(__file__).resolve().parent
POLL_SECONDS = 3  # how often the live fragments refresh
CHECK_SECONDS = 10.0  # how often dependencies and workers are checked (a ping takes 1 s)
ADMIN_TIMEOUT = 30.0  # seconds an alias move waits for the registry worker, as the API
LIST_K = 10
MAX_ID = 2_147_483_647
HTMX_VERSION = "2.0.11"  # dashboard/static/htmx.min.js, from the npm package htmx.org

templates = Jinja2Templates(directory=HERE / "templates")
templates.env.globals.update(poll_seconds=POLL_SECONDS, htmx_version=HTMX_VERSION)
templates.env.filters["when"] = lambda moment: (
    moment.strftime("%Y-%m-%d %H:%M:%S UTC") if moment else "–")
templates.env.filters["num"] = lambda value, digits=4: (
    "–" if value is None else f"{value:.{digits}f}")


class Health:
    """The latest dependency and worker checks, refreshed by a background thread so a
    page never waits for a worker ping."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.checks: list[Check] = []
        self.checked_at: dt.datetime | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dashboard-checks", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.checks = live_checks(self.settings)
            except Exception as error:  # noqa: BLE001 - shown on the page, checked again
                self.checks = [Check("checks", False, f"{type(error).__name__}: {error}")]
            self.checked_at = dt.datetime.now(dt.UTC)
            self._stop.wait(CHECK_SECONDS)


def page(request: Request, name: str, **context: Any) -> HTMLResponse:
    """A template with what every page needs: the user, the CSRF token, the nav."""
    return templates.TemplateResponse(request, name, {
        "user": request.session.get("user"), "csrf": auth.csrf_token(request), **context})


Login = Annotated[str, Depends(auth.require_login)]
Csrf = Depends(auth.check_csrf)
Action = Annotated[str, Depends(auth.require_action)]  # logged in, with the CSRF token
Version = Annotated[int, PathParam(ge=1, le=MAX_ID)]


def create_app(settings: Settings | None = None) -> FastAPI:
    """The dashboard for `settings` (the settings in force when omitted)."""
    settings = settings or get_settings()
    configure_app(settings)
    health = Health(settings)
    models = ModelCache(settings, get_engine())

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        health.start()
        try:
            yield
        finally:
            health.stop()

    app = FastAPI(title="recsys dashboard", docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=lifespan)
    app.state.health = health
    # A key made here: sessions last as long as the process, and no secret to configure.
    app.add_middleware(SessionMiddleware, secret_key=secrets.token_urlsafe(32),
                       session_cookie="recsys_dashboard", same_site="lax",
                       https_only=False, max_age=12 * 3600)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")

    @app.exception_handler(auth.LoginRequired)
    async def _login_required(request: Request, _error: Exception) -> Response:
        if request.headers.get("hx-request") or request.method != "GET":
            # htmx follows HX-Redirect; anything else gets a plain 401.
            return Response("login required", status_code=401,
                            headers={"HX-Redirect": "/login", "WWW-Authenticate": "Form"})
        return RedirectResponse(auth.login_redirect_target(request), status_code=303)

    # --- login ---------------------------------------------------------------------

    @app.get("/login", response_class=HTMLResponse)
    def login_form(request: Request, next: str = "/") -> HTMLResponse:
        return page(request, "login.html", next=auth.safe_next(next), error=None)

    @app.post("/login", dependencies=[Csrf], response_model=None)
    def login(request: Request, username: Annotated[str, Form(max_length=200)],
              password: Annotated[str, Form(max_length=500)],
              next: Annotated[str, Form(max_length=2000)] = "/") -> Response:
        if not auth.credentials_match(settings, username, password):
            time.sleep(0.5)  # slows guessing; the comparison itself is constant-time
            response = page(request, "login.html", next=auth.safe_next(next),
                            error="wrong user name or password")
            response.status_code = 401
            return response
        request.session.clear()  # a new session (and CSRF token) at login
        request.session["user"] = username
        auth.csrf_token(request)
        return RedirectResponse(auth.safe_next(next), status_code=303)

    @app.post("/logout")
    def logout(request: Request, _user: Action) -> RedirectResponse:
        request.session.clear()
        return RedirectResponse("/login", status_code=303)

    # --- overview ------------------------------------------------------------------

    def overview_data() -> dict[str, Any]:
        now = dt.datetime.now(dt.UTC)
        with session_scope() as session:
            return {"counts": queries.counts(session, now), "roles": queries.roles(session),
                    "retrain": queries.last_retrain(session), "checks": health.checks,
                    "checked_at": health.checked_at, "now": now}

    @app.get("/", response_class=HTMLResponse)
    def overview(request: Request, _user: Login) -> HTMLResponse:
        return page(request, "overview.html", **overview_data())

    @app.get("/fragments/overview", response_class=HTMLResponse)
    def overview_fragment(request: Request, _user: Login) -> HTMLResponse:
        return page(request, "_overview.html", **overview_data())

    # --- models --------------------------------------------------------------------

    def models_data() -> dict[str, Any]:
        data = report.gather()
        with session_scope() as session:
            history = queries.alias_history(session)
            snapshots = queries.lineage(session)
        ks = sorted({int(m.group(2)) for v in data["versions"] for key in v["metrics"]
                     if (m := report.TEST_METRIC.match(key))})
        curves, over_versions = registry_figures(data, ks)
        return {"versions": list(reversed(data["versions"])), "ks": ks,
                "metric_names": ("ndcg", "precision", "recall", "map", "hit_rate"),
                "history": history, "snapshots": snapshots, "curves": curves,
                "over_versions": over_versions}

    figures: dict[str, tuple[str | None, str | None]] = {}  # the last registry state's
    drawing = threading.Lock()  # pyplot keeps global state: one figure at a time

    def registry_figures(data: dict[str, Any], ks: list[int]
                         ) -> tuple[str | None, str | None]:
        """The report's two registry figures, drawn again only when what they show
        changed (a second or more of matplotlib each)."""
        key = hashlib.sha256(json.dumps([data["versions"], data["alias_changes"], ks],
                                        sort_keys=True, default=str).encode()).hexdigest()
        with drawing:
            if key in figures:
                return figures[key]
            focus = report.focus_snapshot(data)
            shown = [v for v in data["versions"] if v["snapshot"] == focus and v["metrics"]]
            figures.clear()
            figures[key] = (
                plots.metric_curves(shown, shown[0]["baseline"], ks) if shown and ks else None,
                plots.versions_figure(data["versions"], data["alias_changes"], "ndcg@10")
                if data["versions"] else None)
            return figures[key]

    @app.get("/models", response_class=HTMLResponse)
    def models_page(request: Request, _user: Login) -> HTMLResponse:
        return page(request, "models.html", **models_data())

    def action_result(request: Request, ok: bool, message: str, status: int = 200,
                      back: str = "/models") -> Response:
        if not request.headers.get("hx-request"):  # a plain form post: back to the page
            return RedirectResponse(back, status_code=303)
        response = page(request, "_action.html", ok=ok, message=message)
        response.status_code = status
        if ok:  # the page's registry section reloads itself (models.html)
            response.headers["HX-Trigger"] = "registry-changed"
        return response

    def move(request: Request, task: str, kwargs: dict[str, Any], back: str = "/models"
             ) -> Response:
        try:
            moved = admin.move_alias(task, kwargs, ADMIN_TIMEOUT)
        except admin.AdminError as error:
            return action_result(request, False, str(error), 409, back)
        except admin.Unavailable as error:
            return action_result(request, False, str(error), 503, back)
        if moved.status == "queued":
            return action_result(request, True, f"queued (task {moved.task_id}): the registry "
                                 "worker has not answered yet", back=back)
        return action_result(request, True, f"{moved.action}: {moved.alias} is now "
                             f"v{moved.version} (was v{moved.previous})", back=back)

    @app.post("/models/{version}/promote", response_model=None)
    def promote(request: Request, user: Action, version: Version,
                alias: Annotated[str, Form(pattern="^(champion|challenger)$")] = "champion"
                ) -> Response:
        try:
            admin.show_model(get_engine(), str(version))
        except admin.NotFound as error:
            return action_result(request, False, str(error), 404)
        return move(request, "registry.promote", {
            "version": version, "alias": alias, "reason": f"dashboard, by {user}"})

    @app.post("/models/rollback", response_model=None)
    def rollback(request: Request, user: Action,
                 alias: Annotated[str, Form(pattern="^(champion|challenger)$")] = "champion"
                 ) -> Response:
        return move(request, "registry.rollback", {"alias": alias,
                                                   "reason": f"dashboard, by {user}"})

    @app.post("/retrain", response_model=None)
    def retrain(request: Request, _user: Action) -> Response:
        try:
            queued = admin.enqueue_retrain(RetrainIn(), origin="dashboard")
        except RetrainRunning as error:
            return action_result(request, False, str(error), 409)
        except admin.Unavailable as error:
            return action_result(request, False, str(error), 503)
        return action_result(request, True, f"retrain {queued.status}: "
                             f"{' -> '.join(queued.stages)}"
                             + (f" (task {queued.task_id})" if queued.task_id else ""))

    # --- experiment and online -----------------------------------------------------

    @app.get("/experiment", response_class=HTMLResponse)
    def experiment(request: Request, _user: Login) -> HTMLResponse:
        return page(request, "experiment.html", status=experiment_status())

    @app.get("/fragments/experiment", response_class=HTMLResponse)
    def experiment_fragment(request: Request, _user: Login) -> HTMLResponse:
        return page(request, "_experiment.html", status=experiment_status())

    @app.post("/experiment/promote", response_model=None)
    def experiment_promote(request: Request, user: Action,
                           force: Annotated[bool, Form()] = False) -> Response:
        # The same registry.promote as the Models page's buttons (a slow worker answers
        # "queued", a down broker 503), with the A/B figures as the reason.
        kwargs = ab.winner_promotion(ab.ab_status(), force=force)
        if kwargs is None:
            return action_result(request, False, "nothing promoted: the challenger has not "
                                 "won (or there is none)", 409, "/experiment")
        kwargs["reason"] += f"; dashboard, by {user}"
        return move(request, "registry.promote", kwargs, "/experiment")

    @app.get("/online", response_class=HTMLResponse)
    def online(request: Request, _user: Login) -> HTMLResponse:
        data = report.gather()
        changes = [c for c in data["alias_changes"] if c["alias"] == "champion"]
        if data["online"]:  # promotions inside the plotted span are marked on it
            first = min(r["window_start"] for r in data["online"])
            marked = [c for c in changes if c["created_at"] and c["created_at"] >= first]
        with drawing:
            figure = plots.online_figure(data["online"], marked) if data["online"] else None
        return page(request, "online.html", rows=list(reversed(data["online"][-200:])),
                    figure=figure, changes=changes)

    # --- users and items -----------------------------------------------------------

    @app.get("/users", response_model=None)
    def user_lookup(request: Request, _user: Login, user_id: str = "") -> Response:
        if not user_id.strip().isdigit() or not 1 <= int(user_id) <= MAX_ID:
            raise HTTPException(422, f"user_id must be a whole number from 1 to {MAX_ID}, "
                                     f"got {user_id!r}")
        return RedirectResponse(f"/users/{int(user_id)}", status_code=303)

    @app.get("/users/{user_id}", response_class=HTMLResponse)
    def user_page(request: Request, _user: Login,
                  user_id: Annotated[int, PathParam(ge=1, le=MAX_ID)]) -> HTMLResponse:
        with session_scope() as session:
            ratings = queries.user_ratings(session, user_id)
            feedback = queries.user_feedback(session, user_id)
            held = queries.aliases(session)
        history = history_of(ratings, feedback, settings.feedback_implicit_rating)
        lists, errors = {}, {}
        for alias in ("champion", "challenger"):
            if alias not in held:
                continue
            try:
                model = models.get(held[alias])
            except ModelLoadError as error:
                errors[alias] = str(error)
                continue
            if model is not None:
                lists[alias] = serve_list(model, user_id, history, LIST_K)
        with session_scope() as session:
            names = queries.titles(session, [m for served in lists.values()
                                             for m, _ in served["items"]])
        return page(request, "user.html", user_id=user_id, ratings=ratings,
                    feedback=feedback, lists=lists, errors=errors, titles=names)

    @app.get("/items/{movie_id}", response_class=HTMLResponse)
    def item_page(request: Request, _user: Login,
                  movie_id: Annotated[int, PathParam(ge=1, le=MAX_ID)]) -> HTMLResponse:
        with session_scope() as session:
            movie = session.get(queries.Movie, movie_id)
            if movie is None:
                raise HTTPException(404, f"movie {movie_id} is not in the catalogue")
            counts = queries.item_counts(session, movie_id)
            served = queries.served_to_most(session, movie_id)
            held = queries.aliases(session)
        similar: list[tuple[int, float]] = []
        model_error = None
        if "champion" in held:
            try:
                model = models.get(held["champion"])
                similar = similar_movies(model, movie_id, LIST_K) if model else []
            except ModelLoadError as error:
                model_error = str(error)
        with session_scope() as session:
            names = queries.titles(session, [m for m, _ in similar])
        return page(request, "item.html", movie=movie, counts=counts, served=served,
                    similar=similar, titles=names, model_error=model_error,
                    champion=held.get("champion"))

    # --- decisions -----------------------------------------------------------------

    @app.get("/decisions", response_class=HTMLResponse)
    def decisions(request: Request, _user: Login) -> HTMLResponse:
        with session_scope() as session:
            rows = queries.decisions(session)
        return page(request, "decisions.html", rows=rows)

    return app


def experiment_status() -> dict[str, Any]:
    """`recsys ab status --json`'s figures, with each arm's 95% CTR interval and the
    impressions it still needs."""
    status = ab.ab_status()
    for arm in status["arms"].values():
        n, p = arm["impressions"], arm["ctr"]
        half = 1.96 * (p * (1 - p) / n) ** 0.5 if n else 0.0
        arm["ci"] = (max(0.0, p - half), min(1.0, p + half))
        arm["still_needed"] = max(0, status["min_sample_per_arm"] - n)
    return status
