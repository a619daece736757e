"""Admin operations: registry reads from the tables, alias moves and retrains by task name.

Serve never imports the registry service: it reads `model_version` and `model_alias`
itself and sends `registry.promote` / `registry.rollback` and the pipeline chain over
the broker (in this process when embedded).
"""

from __future__ import annotations

import threading
from typing import Any

import celery.exceptions
import kombu.exceptions
import redis
from sqlalchemy import Engine, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from services.serve.models import MODEL_NAME
from services.serve.schemas import (
    AliasMove,
    BatchIn,
    BatchQueued,
    BatchStatus,
    ModelInfo,
    RetrainIn,
    RetrainQueued,
)
from shared.celery_app import app, run_task
from shared.db import ModelAlias, ModelVersion
from shared.errors import RecsysError
from shared.retrain import lock_retrain, run_retrain_here, send_retrain

RETRAIN_STAGES = "transform,train,register,evaluate,promote"


class AdminError(RecsysError):
    """The registry refused the operation; the message says why."""


class NotFound(RecsysError):
    """The named version or alias does not exist."""


class Unavailable(RecsysError):
    """The broker or the result backend cannot be reached; nothing was done."""


# Infrastructure failures, as opposed to the registry refusing the operation.
INFRA_ERRORS: tuple[type[BaseException], ...] = (
    kombu.exceptions.KombuError, redis.RedisError, OSError)


def describe(row: ModelVersion, aliases: list[str]) -> ModelInfo:
    """A version as the API shows it (the registry service's `describe`, read here)."""
    return ModelInfo(name=row.name, version=row.version, algorithm=row.algorithm,
                     params=row.params or {}, metrics=row.metrics or {},
                     snapshot=row.snapshot_id, artifact_path=row.artifact_path,
                     sha256=row.sha256, aliases=sorted(aliases),
                     created_at=row.created_at.isoformat() if row.created_at else None)


def _aliases(session: Session) -> dict[int, list[str]]:
    found: dict[int, list[str]] = {}
    for alias in session.scalars(select(ModelAlias).where(ModelAlias.name == MODEL_NAME)):
        found.setdefault(alias.version, []).append(alias.alias)
    return found


def list_models(engine: Engine) -> list[ModelInfo]:
    """Every version of the model, oldest first."""
    with Session(engine) as session:
        aliases = _aliases(session)
        rows = session.scalars(select(ModelVersion).where(ModelVersion.name == MODEL_NAME)
                               .order_by(ModelVersion.version))
        return [describe(row, aliases.get(row.version, [])) for row in rows]


def show_model(engine: Engine, version: str) -> ModelInfo:
    """A number, or `latest` / `champion` / `challenger`."""
    with Session(engine) as session:
        aliases = _aliases(session)
        if version.isdigit():
            number: int | None = int(version)
        else:
            alias = "champion" if version == "latest" else version
            number = next((v for v, names in aliases.items() if alias in names), None)
            if number is None:
                raise NotFound(f"model {MODEL_NAME!r} has no {alias}")
        row = session.scalars(select(ModelVersion).where(
            ModelVersion.name == MODEL_NAME, ModelVersion.version == number)).first()
        if row is None:
            raise NotFound(f"model {MODEL_NAME!r} has no version {number}")
        return describe(row, aliases.get(row.version, []))


def move_alias(task: str, kwargs: dict[str, Any], timeout: float) -> AliasMove:
    """Run registry.promote / registry.rollback; `queued` when the worker is slow."""
    try:
        if app.conf.task_always_eager:
            moved = run_task(task, kwargs)
        else:
            result = app.send_task(task, kwargs=kwargs, queue="registry")
            try:
                moved = result.get(timeout=timeout)
            except celery.exceptions.TimeoutError:
                return AliasMove(status="queued", task_id=result.id, alias=kwargs["alias"],
                                 version=kwargs.get("version"), reason=kwargs.get("reason"))
            except INFRA_ERRORS:
                raise
            except Exception as error:
                # The registry's own error class is not importable here (no service imports
                # another), so Celery rebuilds it as a plain Exception: its message is the
                # registry's refusal.
                raise AdminError(f"{type(error).__name__}: {error}") from None
    except INFRA_ERRORS as error:
        raise Unavailable(f"{task} could not be sent or answered: {error}") from None
    except RecsysError as error:
        raise AdminError(str(error)) from None
    return AliasMove(status="done", **{k: moved.get(k) for k in (
        "alias", "version", "previous", "action", "reason")})


def enqueue_retrain(options: RetrainIn, origin: str = "api") -> RetrainQueued:
    """Queue the chain transform -> train -> register -> evaluate -> promote under the one
    retrain lock; RetrainRunning (409) when a retrain runs already, from anywhere. The
    lock's holder starts with `origin`, which says who asked."""
    from shared.pipeline import build_chain, select_stages  # imports every service's tasks

    chosen = select_stages(RETRAIN_STAGES, None)
    workflow = build_chain(chosen, {
        "protocol": options.protocol.value if options.protocol else None,
        "algorithms": options.algorithms, "trials": options.trials})
    stages = [s.name for s in chosen]
    try:
        locked = lock_retrain(workflow, origin)
    except SQLAlchemyError as error:
        raise Unavailable(f"the retrain lock could not be taken (database: "
                          f"{type(error).__name__})") from None
    if app.conf.task_always_eager:
        # Embedded: the chain runs here; a thread keeps the request from waiting minutes.
        threading.Thread(target=run_retrain_here, args=(locked,), name="serve-retrain",
                         daemon=True).start()
        return RetrainQueued(task_id=None, stages=stages, status="running")
    try:
        send_retrain(locked)  # gives the lock back if the chain cannot be sent
    except INFRA_ERRORS as error:
        raise Unavailable(f"the retrain chain could not be queued: {error}") from None
    return RetrainQueued(task_id=locked.task_id, stages=stages, status="queued")


BATCH_TASK = "eval.recommend_batch"
_embedded_batches: dict[str, Any] = {}  # embedded mode: task id -> its in-process result


def enqueue_batch(options: BatchIn) -> BatchQueued:
    """Queue eval.recommend_batch by name (in a thread of this process when embedded)."""
    kwargs = options.model_dump()
    if app.conf.task_always_eager:
        import uuid

        from shared.celery_app import ServiceQueue, import_tasks

        import_tasks(ServiceQueue.EVAL)
        task_id = uuid.uuid4().hex

        def run() -> None:
            _embedded_batches[task_id] = app.tasks[BATCH_TASK].apply(kwargs=kwargs,
                                                                     task_id=task_id)

        threading.Thread(target=run, name="serve-batch", daemon=True).start()
        return BatchQueued(task_id=task_id, status="queued")
    try:
        result = app.send_task(BATCH_TASK, kwargs=kwargs, queue="eval")
    except INFRA_ERRORS as error:
        raise Unavailable(f"{BATCH_TASK} could not be queued: {error}") from None
    return BatchQueued(task_id=result.id, status="queued")


def batch_status(task_id: str) -> BatchStatus:
    """The state of a queued batch and, once written, its file and summary."""
    result = _embedded_batches.get(task_id) or app.AsyncResult(task_id)
    try:
        state, info = result.state, result.info
    except INFRA_ERRORS as error:
        raise Unavailable(f"the result backend could not be read: {error}") from None
    status = BatchStatus(task_id=task_id, state=state)
    if state == "SUCCESS" and isinstance(info, dict):
        status.summary, status.output = info, info.get("output")
    elif state == "FAILURE":
        status.error = f"{type(info).__name__}: {info}"
    elif state == "PROGRESS" and isinstance(info, dict):
        status.progress = {key: int(value) for key, value in info.items()}
    return status
