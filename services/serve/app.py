"""The serve API: FastAPI routes over the runtime (`create_app` is uvicorn's factory).

Routes stay thin: parse and validate, call the runtime, map its errors to statuses.
Every route documents each status it can answer; invalid input is a 4xx with a message.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import (
    APIRouter,
    Body,
    Depends,
    FastAPI,
    Header,
    HTTPException,
    Path,
    Query,
    Request,
    Response,
)
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from sqlalchemy.exc import SQLAlchemyError

from services.serve import admin
from services.serve.feedback import FeedbackUnavailable, accept_feedback
from services.serve.hotpath import PlainListPath
from services.serve.metrics import MetricsMiddleware, render
from services.serve.models import UnknownGenre
from services.serve.online import OnlineCollector, latest_windows
from services.serve.recommend import ListRequest, NoModel, UnknownItem
from services.serve.runtime import ServeRuntime
from services.serve.schemas import (
    IDEMPOTENCY_KEY_PATTERN,
    MAX_FEEDBACK_BATCH,
    MAX_ID,
    MAX_K,
    MAX_OFFSET,
    AliasMove,
    BatchIn,
    BatchQueued,
    BatchStatus,
    FeedbackAccepted,
    FeedbackBatch,
    FeedbackRefused,
    Health,
    ListQuery,
    ModelInfo,
    ModelList,
    OnlineMetrics,
    PopularList,
    Problem,
    PromoteIn,
    Readiness,
    RecommendationList,
    RetrainConflict,
    RetrainIn,
    RetrainQueued,
    RollbackIn,
    SimilarItems,
)
from services.serve.security import BodySizeLimit, require_api_key, require_feedback_key
from services.serve.validation import INVALID, JSONBodyRoute, request_validation_handler
from shared.celery_app import configure_app
from shared.retrain import RetrainRunning
from shared.settings import Settings, get_settings

ADMIN_TIMEOUT = 30.0  # seconds an alias move waits for the registry worker
JSON = "application/json"
NO_MODEL = {503: {"model": Problem, "description": "No model is loaded yet."}}
GUARDED = {401: {"model": Problem, "description": "Missing or wrong X-API-Key."},
           403: {"model": Problem, "description": "No API_KEY configured on the server."}}
# Every route with a body: unreadable bytes (not UTF-8) or an oversized body.
TOO_LARGE = {400: {"model": Problem, "description": "Body unreadable (not UTF-8 JSON)."},
             413: {"model": Problem, "description": "Body over MAX_BODY_BYTES."}}

K = Annotated[int, Query(ge=1, le=MAX_K, description="How many items.")]
Offset = Annotated[int, Query(ge=0, le=MAX_OFFSET, description="Items to skip (paging).")]
Genres = Annotated[str | None, Query(max_length=400, description="Comma-separated genres; "
                                     "items of any of them are kept.")]
FeedbackBody = Annotated[FeedbackBatch, Body(
    description=f"One event, or a JSON array of up to {MAX_FEEDBACK_BATCH}.")]

router = APIRouter(route_class=JSONBodyRoute)


def runtime_of(request: Request) -> ServeRuntime:
    """The process's runtime, set by `create_app`."""
    return request.app.state.runtime  # type: ignore[no-any-return]


def split_genres(genres: str | None) -> tuple[str, ...]:
    """`Comedy, Drama` as ('Comedy', 'Drama'); checked against the model later."""
    return tuple(g.strip() for g in (genres or "").split(",") if g.strip())


def invalid(where: str, message: str) -> RequestValidationError:
    """A 422 in FastAPI's documented shape, for checks that need the loaded model."""
    return RequestValidationError([{"loc": ("query", where), "msg": message,
                                    "type": "value_error"}])


LIST_ROUTE = "/recommendations/{user_id}"


@router.get(LIST_ROUTE, response_model=RecommendationList,
            responses={**INVALID, **NO_MODEL}, tags=["recommendations"])
async def recommendations(request: Request, user_id: Annotated[int, Path(ge=1, le=MAX_ID)],
                          query: Annotated[ListQuery, Query()]) -> Response:
    """A user's top-k, never an item they rated or reacted to; `offset` pages on.

    Plain requests (only `k` and `offset`) are answered the same way by
    services/serve/hotpath.py before routing; this route takes every other one."""
    ask = ListRequest(user_id, query.k, query.offset,
                      tuple(int(i) for i in (query.exclude or "").split(",") if i.strip()),
                      split_genres(query.genres))
    service = runtime_of(request).service
    try:
        pending = service.begin(ask)
    except UnknownGenre as error:
        raise invalid("genres", str(error)) from None
    body = await service.answer(pending)
    return Response(body, media_type=JSON, headers={"X-Request-ID": pending.request_id})


@router.get("/items/{movie_id}/similar", response_model=SimilarItems,
            responses={404: {"model": Problem, "description": "Movie not in the model."},
                       **INVALID, **NO_MODEL}, tags=["recommendations"])
def similar(request: Request, movie_id: Annotated[int, Path(ge=1, le=MAX_ID)],
            k: K = 10) -> Response:
    """The movies most similar to this one, by the serving model."""
    return Response(runtime_of(request).service.similar(movie_id, k), media_type=JSON)


@router.get("/popular", response_model=PopularList, responses={**INVALID, **NO_MODEL},
            tags=["recommendations"])
def popular(request: Request, k: K = 10, offset: Offset = 0, genres: Genres = None
            ) -> Response:
    """The non-personalised list: most interactions in the model's training data."""
    try:
        body = runtime_of(request).service.popular(k, offset, split_genres(genres))
    except UnknownGenre as error:
        raise invalid("genres", str(error)) from None
    return Response(body, media_type=JSON)


IdempotencyKey = Annotated[str | None, Header(
    alias="Idempotency-Key", pattern=IDEMPOTENCY_KEY_PATTERN,
    description="Makes the request safe to retry: an event without its own event_id gets "
    "an id derived from this key and its position in the body, so posting the same body "
    "with the same key again stores nothing twice.")]


@router.post("/feedback", status_code=202, response_model=FeedbackAccepted,
             responses={**GUARDED, **TOO_LARGE, **INVALID, 503: {
                 "model": FeedbackRefused, "description": "Neither the broker nor the "
                 "outbox took the events: they may have been stored; retry with the same "
                 "event ids (or Idempotency-Key), which stores each event once."}},
             dependencies=[Depends(require_feedback_key)], tags=["feedback"])
async def feedback(request: Request, events: FeedbackBody,
                   idempotency_key: IdempotencyKey = None) -> FeedbackAccepted:
    """Accept events once they are durable (confirmed by RabbitMQ, or in this replica's
    outbox while the broker is down); the ingest service stores each event id once."""
    batch = events if isinstance(events, list) else [events]
    try:
        ids = await accept_feedback(batch, runtime_of(request).feedback, idempotency_key)
    except ValueError as error:  # an event id given twice in the body
        raise RequestValidationError([{"loc": ("body", "event_id"), "msg": str(error),
                                       "type": "value_error"}]) from None
    return FeedbackAccepted(accepted=len(ids), event_ids=ids)


# Every admin route reads the X-API-Key header, so each can answer 422.
admin_router = APIRouter(dependencies=[Depends(require_api_key)], route_class=JSONBodyRoute,
                         responses={**GUARDED, **INVALID}, tags=["admin"])


@admin_router.get("/models", response_model=ModelList)
def models(request: Request) -> ModelList:
    """Every registered version with its aliases, and what this process serves."""
    runtime = runtime_of(request)
    return ModelList(models=admin.list_models(runtime.engine),
                     serving=runtime.store.state.versions())


@admin_router.get("/models/{version}", response_model=ModelInfo,
                  responses={404: {"model": Problem}})
def model(request: Request, version: Annotated[str, Path(
        pattern=r"^(latest|champion|challenger|[1-9][0-9]{0,8})$",
        description="A version number, or latest (the champion), champion, challenger.")]
          ) -> ModelInfo:
    """One version in full."""
    return admin.show_model(runtime_of(request).engine, version)


@admin_router.post("/models/{version}/promote", response_model=AliasMove,
                   responses={202: {"model": AliasMove, "description": "Queued: the registry "
                                    "worker has not answered yet."},
                              404: {"model": Problem}, 409: {"model": Problem}, **TOO_LARGE,
                              503: {"model": Problem}})
def promote(request: Request, response: Response,
            version: Annotated[int, Path(ge=1, le=MAX_ID)],
            body: Annotated[PromoteIn | None, Body()] = None) -> AliasMove:
    """Point an alias at a version (the registry publishes model.promoted)."""
    body = body or PromoteIn()
    admin.show_model(runtime_of(request).engine, str(version))  # 404 before any message
    moved = admin.move_alias("registry.promote", {"version": version, "alias": body.alias,
                                                  "reason": body.reason}, ADMIN_TIMEOUT)
    response.status_code = 202 if moved.status == "queued" else 200
    return moved


@admin_router.post("/models/rollback", response_model=AliasMove,
                   responses={202: {"model": AliasMove}, 409: {"model": Problem},
                              **TOO_LARGE, 503: {"model": Problem}})
def rollback(request: Request, response: Response,
             body: Annotated[RollbackIn | None, Body()] = None) -> AliasMove:
    """Move an alias back to the version it held before its last promotion."""
    body = body or RollbackIn()
    moved = admin.move_alias("registry.rollback", {"alias": body.alias, "reason": body.reason},
                             ADMIN_TIMEOUT)
    response.status_code = 202 if moved.status == "queued" else 200
    return moved


@admin_router.post("/retrain", status_code=202, response_model=RetrainQueued,
                   responses={**TOO_LARGE, 409: {
                       "model": RetrainConflict, "description": "A retrain is running "
                       "already (started by the API, the policy or the CLI); nothing queued."},
                       503: {"model": Problem}})
def retrain(body: Annotated[RetrainIn | None, Body()] = None) -> RetrainQueued:
    """Queue transform -> train -> register -> evaluate -> promote on the workers, one
    retrain at a time: 409 naming the running one while it lasts."""
    return admin.enqueue_retrain(body or RetrainIn())


@admin_router.post("/recommendations/batch", status_code=202, response_model=BatchQueued,
                   responses={**TOO_LARGE, 503: {"model": Problem}})
def recommendations_batch(body: Annotated[BatchIn | None, Body()] = None) -> BatchQueued:
    """Queue every asked user's top k into a file (eval.recommend_batch on the eval worker)."""
    return admin.enqueue_batch(body or BatchIn())


@admin_router.get("/recommendations/batch/{task_id}", response_model=BatchStatus,
                  responses={503: {"model": Problem}})
def recommendations_batch_status(task_id: Annotated[str, Path(
        pattern=r"^[A-Za-z0-9-]{1,64}$")]) -> BatchStatus:
    """A queued batch's state; when done, where the file is and its summary."""
    return admin.batch_status(task_id)


@router.get("/healthz", response_model=Health, tags=["operations"])
def healthz() -> Health:
    """The process is alive."""
    return Health(status="ok")


@router.get("/readyz", response_model=Readiness, responses={503: {"model": Readiness}},
            tags=["operations"])
def readyz(request: Request, response: Response) -> Readiness:
    """Model loaded (else 503), with each dependency's state."""
    readiness = runtime_of(request).readiness()
    response.status_code = 200 if readiness.ready else 503
    return readiness


@router.get("/metrics", response_class=Response, tags=["operations"],
            responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                             "description": "Prometheus exposition format."}})
def metrics(request: Request) -> Response:
    """Prometheus metrics of every worker of this server, and the latest online window."""
    body, content_type = render(OnlineCollector(runtime_of(request).engine))
    return Response(body, media_type=content_type)


@router.get("/metrics/online", response_model=OnlineMetrics, responses=INVALID,
            tags=["operations"])
def online_metrics(request: Request,
                   windows: Annotated[int, Query(ge=1, le=100)] = 1) -> OnlineMetrics:
    """The newest online windows eval computed: CTR@k, hit rate, click position, volume and
    satisfaction per model version and variant."""
    try:
        return OnlineMetrics(windows=latest_windows(runtime_of(request).engine, windows))
    except SQLAlchemyError:
        raise HTTPException(503, "the database holding the online metrics is unreachable") from None


def _problem(status: int) -> Any:
    async def handler(_request: Request, error: Exception) -> JSONResponse:
        return JSONResponse({"detail": str(error)}, status_code=status)

    return handler


async def _feedback_refused(_request: Request, error: Exception) -> JSONResponse:
    ids = error.event_ids if isinstance(error, FeedbackUnavailable) else []
    return JSONResponse({"detail": str(error), "event_ids": ids}, status_code=503)


async def _retrain_running(_request: Request, error: Exception) -> JSONResponse:
    running = error.running.as_dict() if isinstance(error, RetrainRunning) else None
    return JSONResponse({"detail": str(error), "running": running}, status_code=409)


def create_app(settings: Settings | None = None) -> FastAPI:
    """The serve application for `settings` (the settings in force when omitted)."""
    settings = settings or get_settings()
    configure_app(settings)
    runtime = ServeRuntime(settings)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await run_in_threadpool(runtime.start)  # the first load reads artifacts from disk
        try:
            yield
        finally:
            await run_in_threadpool(runtime.stop)
            await runtime.cache.aclose()
            await runtime.history.aclose()

    app = FastAPI(title="recsys serve", version="1.0.0", lifespan=lifespan,
                  description="MovieLens recommendations from the registry's champion, with "
                  "feedback, impressions, and registry operations.")
    app.state.runtime = runtime
    app.add_exception_handler(RequestValidationError, request_validation_handler)
    app.include_router(router)
    app.include_router(admin_router)
    for error, status in ((NoModel, 503), (UnknownItem, 404), (admin.NotFound, 404),
                          (admin.AdminError, 409), (admin.Unavailable, 503)):
        app.add_exception_handler(error, _problem(status))
    app.add_exception_handler(FeedbackUnavailable, _feedback_refused)
    app.add_exception_handler(RetrainRunning, _retrain_running)
    # Innermost of the middleware, so CORS headers, the body limit and the metrics apply
    # to what it answers as to everything else.
    app.add_middleware(PlainListPath, runtime=runtime, route=next(
        route for route in router.routes if getattr(route, "path", "") == LIST_ROUTE))
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins,
                           allow_methods=["GET", "POST"],
                           allow_headers=["X-API-Key", "Content-Type", "Idempotency-Key"],
                           expose_headers=["X-Request-ID"])
    app.add_middleware(BodySizeLimit, limit=settings.max_body_bytes)
    app.add_middleware(MetricsMiddleware)  # outermost: it times and counts even a 413
    return app
