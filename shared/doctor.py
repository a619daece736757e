"""`recsys doctor`: what is wrong with this installation, before a traceback says it.

Each check reports whether it passed, what it looked at (URLs with passwords masked) and,
when it failed, the one thing to do about it. An invalid setting is named and the checks
go on with it at its default, skipping the checks that read it. Checks run in the order a
fix is needed: settings, database, schema, broker, cache, artifact store, workers, models, disk.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pydantic import SecretStr
from sqlalchemy.engine import make_url

from shared.errors import RecsysError
from shared.settings import Settings, SettingsError, get_settings

DISK_MIN_FREE = 1 << 30  # below 1 GiB free, a snapshot or model write may fail
CONNECT_TIMEOUT = 3


@dataclass
class Check:
    """One finding: `ok` None means not applicable here (skipped)."""

    name: str
    ok: bool | None
    detail: str
    fix: str = ""


def mask_url(url: str) -> str:
    """A URL with its password replaced by ***."""
    if not url or "://" not in url:
        return url
    try:
        parsed = make_url(url)
    except Exception:  # noqa: BLE001 - not a URL SQLAlchemy parses: mask by hand
        scheme, rest = url.split("://", 1)
        if "@" in rest and ":" in rest.split("@", 1)[0]:
            user = rest.split("@", 1)[0].split(":", 1)[0]
            return f"{scheme}://{user}:***@{rest.split('@', 1)[1]}"
        return url
    return parsed.render_as_string(hide_password=True)


def settings_in_force(settings: Settings) -> dict[str, Any]:
    """Every setting by its variable name; secrets masked, URLs without passwords."""
    shown: dict[str, Any] = {}
    for name in type(settings).model_fields:
        value = getattr(settings, name)
        if isinstance(value, SecretStr):
            value = "***" if value.get_secret_value() else ""
        elif isinstance(value, str) and name.endswith("_url"):
            value = mask_url(value)
        elif isinstance(value, Path):
            value = str(value)
        elif hasattr(value, "value") and not isinstance(value, int | float):
            value = value.value
        elif hasattr(value, "isoformat"):
            value = value.isoformat()
        shown[name.upper()] = value
    return shown


def _database(settings: Settings) -> tuple[Check, Any]:
    from sqlalchemy import create_engine, text

    url = settings.resolved_database_url
    where = mask_url(url)
    if url.startswith("sqlite"):
        engine = create_engine(url)
        path = Path(url.split("///", 1)[-1])
        if not path.exists():
            return Check("database", True, f"{where} (embedded; nothing has run here yet)"), None
    else:
        engine = create_engine(url, connect_args={"connect_timeout": CONNECT_TIMEOUT},
                               pool_pre_ping=False)
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as error:  # noqa: BLE001 - any driver error means "not reached"
        engine.dispose()
        return Check("database", False, f"{where}: {_first_line(error)}",
                     "start Postgres or correct DATABASE_URL"), None
    return Check("database", True, f"{where} reached"), engine


def _schema(url: str) -> Check:
    from shared.db.session import DatabaseUnavailable, SchemaNotReady, require_schema

    try:
        require_schema(url, connect_timeout=CONNECT_TIMEOUT)
    except SchemaNotReady as error:
        return Check("schema", False, str(error), "run `recsys db upgrade`")
    except DatabaseUnavailable as error:
        return Check("schema", False, str(error), "start Postgres or correct DATABASE_URL")
    return Check("schema", True, "at this release's head revision")


def _broker(settings: Settings) -> Check:
    if not settings.broker_url:
        return Check("broker", True, "none set: tasks run in this process (embedded)")
    from kombu import Connection

    where = mask_url(settings.broker_url)
    try:
        with Connection(settings.broker_url, connect_timeout=CONNECT_TIMEOUT) as conn:
            conn.ensure_connection(max_retries=1, timeout=CONNECT_TIMEOUT)
    except Exception as error:  # noqa: BLE001 - any transport error means "not reached"
        return Check("broker", False, f"{where}: {_first_line(error)}",
                     "start RabbitMQ or correct BROKER_URL")
    return Check("broker", True, f"{where} reached")


def _cache(settings: Settings) -> Check:
    if not settings.redis_url:
        return Check("cache", True, "none set: an in-process cache (embedded)")
    import redis

    where = mask_url(settings.redis_url)
    try:
        redis.Redis.from_url(settings.redis_url, socket_connect_timeout=CONNECT_TIMEOUT,
                             socket_timeout=CONNECT_TIMEOUT).ping()
    except redis.RedisError as error:
        return Check("cache", False, f"{where}: {_first_line(error)}",
                     "start Redis or correct REDIS_URL")
    return Check("cache", True, f"{where} reached")


def _nearest_existing(path: Path) -> Path:
    path = path.resolve()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _artifact_store(settings: Settings) -> Check:
    from shared.artifacts import ArtifactError, is_object_store

    if is_object_store(settings.model_path):
        from shared.object_store import object_store

        try:
            return Check("artifact store", True, object_store(settings.model_path).check())
        except ArtifactError as error:
            return Check("artifact store", False, str(error),
                         "start the object store, create its bucket or correct MODEL_PATH, "
                         "S3_ENDPOINT_URL and the AWS_* keys")
    root = Path(settings.model_path)
    existing = _nearest_existing(root)
    if not os.access(existing, os.W_OK):
        return Check("artifact store", False, f"{root.resolve()}: not writable here",
                     f"make {existing} writable or point MODEL_PATH elsewhere")
    state = "exists" if root.exists() else "made on first write"
    return Check("artifact store", True, f"{root.resolve()} ({state}, writable)")


def _workers(settings: Settings) -> Check:
    if not settings.broker_url:
        return Check("workers", None, "embedded: no workers needed")
    from shared.celery_app import ServiceQueue, answering_workers, configure_app

    configure_app()
    counts = {q.value: answering_workers(q, timeout=1.0) for q in ServiceQueue}
    missing = [name for name, count in counts.items() if count == 0]
    detail = ", ".join(f"{name} {count}" for name, count in counts.items())
    if missing:
        return Check("workers", False, f"answering per queue: {detail}",
                     f"start `recsys worker {missing[0]}`"
                     + (f" (and {', '.join(missing[1:])})" if len(missing) > 1 else ""))
    return Check("workers", True, f"answering per queue: {detail}")


def live_checks(settings: Settings) -> list[Check]:
    """What an operator watches: database, broker, cache and the workers per queue (one
    ping answers for every queue), without the slower artifact and disk checks."""
    database, engine = _database(settings)
    if engine is not None:
        engine.dispose()
    broker = _broker(settings)
    checks = [database, broker, _cache(settings)]
    if not broker.ok:
        return checks
    if not settings.broker_url:
        return [*checks, _workers(settings)]
    from shared.celery_app import ServiceQueue, app  # configured by the caller

    try:
        nodes = [node for reply in app.control.ping(timeout=1.0) for node in reply]
    except Exception as error:  # noqa: BLE001 - any transport error: no worker answered
        return [*checks, Check("workers", False, f"ping failed: {_first_line(error)}",
                               "start the workers")]
    for queue in ServiceQueue:
        count = sum(1 for node in nodes if node.startswith(f"{queue.value}@"))
        checks.append(Check(f"worker {queue.value}", count > 0, f"{count} answering",
                            "" if count else f"start `recsys worker {queue.value}`"))
    return checks


def _models(engine: Any) -> list[Check]:
    from sqlalchemy import select
    from sqlalchemy.orm import Session

    from shared.artifacts import ArtifactError, read_artifact
    from shared.db import ModelAlias, ModelVersion

    checks = []
    with Session(engine) as session:
        aliases = {a.alias: a.version for a in session.scalars(select(ModelAlias))}
        for alias in ("champion", "challenger"):
            if alias not in aliases:
                checks.append(Check(alias, False if alias == "champion" else None,
                                    f"no {alias} yet",
                                    "run `recsys pipeline --stages all`"
                                    if alias == "champion" else ""))
                continue
            row = session.scalars(select(ModelVersion).where(
                ModelVersion.version == aliases[alias])).first()
            if row is None:
                checks.append(Check(alias, False, f"v{aliases[alias]} is not in the registry",
                                    "promote an existing version"))
                continue
            try:
                read_artifact(row.artifact_path, row.sha256)
            except ArtifactError as error:
                checks.append(Check(alias, False, f"v{row.version} {row.algorithm}: {error}",
                                    "retrain (`recsys pipeline --stages all`) or roll back"))
                continue
            checks.append(Check(alias, True, f"v{row.version} {row.algorithm}, artifact "
                                             f"{row.artifact_path} verifies (sha256)"))
    return checks


def _disk(settings: Settings) -> list[Check]:
    checks = []
    from shared.artifacts import is_object_store

    # An object store's disk is not this host's: what fills here is its cache.
    model_disk = (settings.resolved_artifact_cache_path if is_object_store(settings.model_path)
                  else settings.model_path)
    for label, path in (("disk DATA_PATH", settings.data_path),
                        ("disk MODEL_PATH", model_disk)):
        where = _nearest_existing(Path(path))
        free = shutil.disk_usage(where).free
        detail = f"{free / 2**30:.1f} GiB free under {where}"
        checks.append(Check(label, free >= DISK_MIN_FREE, detail,
                            "" if free >= DISK_MIN_FREE else f"free space under {where}"))
    return checks


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def diagnose() -> dict[str, Any]:
    """Every check, the settings in force, and the first thing to fix (None when all is well)."""
    checks: list[Check] = []
    invalid: list[str] = []
    try:
        get_settings.cache_clear()
        settings = get_settings()
    except SettingsError as error:
        checks.append(Check("settings", False, str(error), "correct the variable it names"))
        fallback = _without_invalid()
        if fallback is None:  # no field to blame (a rule across fields): nothing to go on
            return _summary(checks, {})
        settings, invalid = fallback
    else:
        checks.append(Check("settings", True, f"valid ({settings.environment.value})"))
    database, engine = _database(settings)
    checks.append(database)
    schema = None
    if engine is not None:
        schema = _schema(settings.resolved_database_url)
        checks.append(schema)
    broker = _broker(settings)
    checks += [broker, _cache(settings), _artifact_store(settings)]
    if broker.ok:
        checks.append(_workers(settings))
    if engine is None and database.ok:  # an embedded database not made yet
        checks.append(Check("champion", False, "no champion yet: nothing has run here",
                            "run `recsys pipeline --stages all`"))
    if engine is not None and schema is not None and schema.ok:
        try:
            checks += _models(engine)
        except RecsysError as error:
            checks.append(Check("champion", False, str(error), ""))
        engine.dispose()
    checks += _disk(settings)
    shown = settings_in_force(settings)
    for name in invalid:
        shown[name.upper()] = "(invalid)"
    return _summary([_unless_invalid(check, invalid) for check in checks], shown, invalid)


# The settings each check reads: with one of them invalid, the check would look at the
# default instead of what was meant, so it is skipped and says why.
CHECK_INPUTS = {
    "database": ("database_url", "data_path"), "schema": ("database_url", "data_path"),
    "champion": ("database_url", "data_path", "model_path"),
    "challenger": ("database_url", "data_path", "model_path"),
    "broker": ("broker_url",), "workers": ("broker_url",), "cache": ("redis_url",),
    "artifact store": ("model_path", "s3_endpoint_url", "aws_access_key_id",
                       "aws_secret_access_key", "aws_default_region", "artifact_cache_path"),
    "disk DATA_PATH": ("data_path",), "disk MODEL_PATH": ("model_path", "artifact_cache_path"),
}


def _without_invalid() -> tuple[Settings, list[str]] | None:
    """The settings with every invalid field at its default, and those fields' names;
    None when the error names no field."""
    from pydantic import ValidationError

    try:
        return Settings(), []
    except ValidationError as error:
        invalid = sorted({str(item["loc"][0]) for item in error.errors() if item["loc"]})
    fields = Settings.model_fields
    if not invalid or any(name not in fields for name in invalid):
        return None
    try:
        return Settings(**{name: fields[name].get_default(call_default_factory=True)
                           for name in invalid}), invalid
    except ValidationError:
        return None


def _unless_invalid(check: Check, invalid: list[str]) -> Check:
    if check.name == "settings":
        return check
    blamed = [name.upper() for name in CHECK_INPUTS.get(check.name, ()) if name in invalid]
    if not blamed:
        return check
    return Check(check.name, None, f"not checked: {', '.join(blamed)} is invalid")


def _summary(checks: list[Check], settings: dict[str, Any], invalid: list[str] | None = None
             ) -> dict[str, Any]:
    problem = next((c for c in checks if c.ok is False), None)
    return {"ok": problem is None, "checks": [asdict(c) for c in checks],
            "first_problem": None if problem is None else
            {"name": problem.name, "detail": problem.detail, "fix": problem.fix},
            "settings": settings,
            "invalid_settings": [name.upper() for name in invalid or ()]}
