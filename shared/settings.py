"""Settings for every service, read from the environment and `.env`.

One class per concern, composed into `Settings`. Read them through `get_settings()`,
which caches; tests change the environment and call `get_settings.cache_clear()`.
"""

from __future__ import annotations

import datetime as dt
import re
from enum import StrEnum
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from shared.errors import RecsysError

GROUPLENS_ML_100K = "https://files.grouplens.org/datasets/movielens/ml-100k.zip"
PLACEHOLDER_SECRETS = {"", "changeme", "change-me", "changethis", "secret", "dev"}
# Flower's password when FLOWER_PASSWORD is empty in development (logged when used);
# production refuses it like any placeholder.
DEV_FLOWER_PASSWORD = "recsys-dev"
# The dashboard's, likewise: DASHBOARD_PASSWORD empty in development means this one.
DEV_DASHBOARD_PASSWORD = "recsys-dev"


class SettingsError(RecsysError):
    """A setting has an invalid value; the message names the variable."""


class Environment(StrEnum):
    DEVELOPMENT = "development"
    PRODUCTION = "production"


class EvalProtocol(StrEnum):
    RANDOM = "random"
    TEMPORAL = "temporal"
    LEAVE_LAST_N = "leave-last-n"


class EvalStratify(StrEnum):
    USER = "user"
    ITEM = "item"


_CONFIG = SettingsConfigDict(
    env_file=".env", env_file_encoding="utf-8", extra="ignore", case_sensitive=False
)


def url_of(value: str, prefixes: tuple[str, ...], expected: str) -> str:
    """`value` stripped; empty, or starting with one of `prefixes` (else names `expected`)."""
    value = value.strip()
    if value and not value.startswith(prefixes):
        raise ValueError(f"expected {expected}, got {value!r}")
    return value


class PathSettings(BaseSettings):
    model_config = _CONFIG

    data_path: Path = Field(Path("data"), description="Working data: SQLite file, downloads.")
    model_path: str = Field(
        "models", description="Artifact store for snapshots and models: a directory, or "
        "s3://bucket/prefix for an S3-compatible object store every host reaches.",
    )
    data_source: str = Field(
        GROUPLENS_ML_100K,
        description="MovieLens source for the pipeline: a directory, a .zip or a URL.",
    )

    @field_validator("model_path", mode="before")
    @classmethod
    def _store_location(cls, value: Any) -> Any:
        text = str(value).strip()
        scheme = text.split("://", 1)[0].lower() if "://" in text else ""
        if scheme and scheme != "s3":
            raise ValueError(f"expected a directory or an s3://bucket/prefix URL, got {text!r}")
        if scheme and not text[len("s3://"):].split("/", 1)[0]:
            raise ValueError(f"an s3:// URL names a bucket: s3://bucket/prefix, got {text!r}")
        return text or "models"


class ObjectStoreSettings(BaseSettings):
    """How to reach the object store when MODEL_PATH is an s3:// URL (unused otherwise)."""

    model_config = _CONFIG

    s3_endpoint_url: str = Field(
        "", description="Endpoint of an S3-compatible store other than AWS (MinIO, "
        "SeaweedFS, Ceph), e.g. http://127.0.0.1:8333; empty means AWS S3.",
    )
    aws_access_key_id: SecretStr = Field(
        SecretStr(""), description="Object store access key; empty means boto3's own "
        "lookup (~/.aws, an instance role).",
    )
    aws_secret_access_key: SecretStr = Field(SecretStr(""), description="Object store secret key.")
    aws_default_region: str = Field("", description="Object store region; empty means us-east-1.")
    artifact_cache_path: Path | None = Field(
        None, description="This host's read-through cache of object-store artifacts; "
        "empty means DATA_PATH/artifact-cache.",
    )
    artifact_part_mb: int = Field(
        16, ge=5, le=5120, description="Multipart transfer part size (and threshold), MiB.",
    )

    @field_validator("s3_endpoint_url")
    @classmethod
    def _http(cls, value: str) -> str:
        return url_of(value, ("http://", "https://"), "an http:// or https:// URL")


class DatabaseSettings(BaseSettings):
    model_config = _CONFIG

    database_url: str = Field(
        "", description="SQLAlchemy URL of Postgres; empty means SQLite under DATA_PATH."
    )

    @field_validator("database_url")
    @classmethod
    def _known_dialect(cls, value: str) -> str:
        return url_of(value, ("postgresql", "sqlite"), "a postgresql:// or sqlite:// URL")


class BrokerSettings(BaseSettings):
    model_config = _CONFIG

    broker_url: str = Field(
        "", description="RabbitMQ AMQP URL; empty runs tasks eagerly in one process."
    )
    event_exchange: str = Field("recsys.events", description="Topic exchange for events.")

    @field_validator("broker_url")
    @classmethod
    def _amqp(cls, value: str) -> str:
        return url_of(value, ("amqp://", "amqps://", "pyamqp://"), "an amqp:// URL")


class CacheSettings(BaseSettings):
    model_config = _CONFIG

    redis_url: str = Field("", description="Redis URL; empty means an in-process cache.")
    cache_ttl: int = Field(300, ge=0, description="Seconds a cached recommendation list lives.")
    cache_ttl_jitter: float = Field(
        0.1, ge=0, lt=1, description="Fraction of CACHE_TTL added or taken at random per entry."
    )
    cache_prefix: str = Field(
        "recsys", min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$",
        description="Namespace of the serve cache's Redis keys.",
    )
    cache_socket_timeout: float = Field(
        0.1, gt=0, le=10, description="Seconds serve waits on Redis before computing without it."
    )
    cache_retry_seconds: float = Field(
        2.0, ge=0, description="Seconds serve leaves Redis (and its history reads of "
        "Postgres) alone after a failure or a slow answer."
    )
    recent_feedback_ttl: int = Field(
        86400, ge=60, description="Seconds serve remembers a user's feedback in the cache "
        "while the ingest service persists it.",
    )

    @field_validator("redis_url")
    @classmethod
    def _redis(cls, value: str) -> str:
        return url_of(value, ("redis://", "rediss://", "unix://"), "a redis:// URL")


class TrainingSettings(BaseSettings):
    model_config = _CONFIG

    # 26 and 15 are the values tuned on MovieLens 100K; tuning searches around them.
    als_rank: int = Field(26, ge=1, le=4096, description="ALS latent factors (default rank).")
    als_iterations: int = Field(15, ge=1, le=1000, description="ALS iterations (default).")
    train_threads: int = Field(0, ge=0, description="Threads for training; 0 means all cores.")
    seed: int = Field(42, description="Seed of every random number generator.")
    tune_budget_seconds: float = Field(
        0.0, ge=0, description="Seconds the tuning of a whole training run may take, shared "
        "among the algorithms in proportion to their trial caps; 0 is unlimited.",
    )
    tune_workers: int = Field(
        0, ge=0, le=256, description="Train workers the trials of one search are spread "
        "over (through an optuna study in Postgres); 0 counts the train workers that answer, "
        "1 keeps each search in the worker that runs it.",
    )
    tune_pruning: bool = Field(
        True, description="Stop hopeless ALS and BPR tuning trials early, from their "
        "validation score every few iterations (optuna's median rule).",
    )
    tune_pruning_min_interactions: int = Field(
        500_000, ge=0, description="Prune only where the validation fit matrix holds at least "
        "this many interactions: below, scoring a partial fit costs about what the "
        "iterations it saves do.",
    )
    tune_validation_users: int = Field(
        10_000, ge=0, description="Validation users each tuning trial scores: a seeded sample "
        "where more users have held-out ratings; 0 scores them all.",
    )


class ServingSettings(BaseSettings):
    model_config = _CONFIG

    model_version: str = Field(
        "latest", description="'latest' serves the champion; a number pins that version."
    )
    api_key: SecretStr = Field(
        SecretStr(""), description="Key for writes and admin routes (header X-API-Key)."
    )
    environment: Environment = Field(
        Environment.DEVELOPMENT, description="development or production."
    )
    serve_port: int = Field(8000, ge=1, le=65535, description="Port `recsys serve` listens on.")
    serve_workers: int = Field(2, ge=1, le=64, description="uvicorn worker processes of serve.")
    feedback_anonymous: bool = Field(
        False, description="Accept POST /feedback without the API key."
    )
    max_body_bytes: int = Field(
        1 << 20, ge=1024, description="Largest request body serve reads; larger ones get 413."
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Comma-separated origins allowed by CORS; empty is off."
    )
    challenger_traffic: float = Field(
        0.0, ge=0, le=1, description="Share of users (by user id hash) served by the challenger."
    )
    model_poll_seconds: float = Field(
        30.0, ge=0, description="Seconds between serve's checks of the registry for a new "
        "champion (a safety net for missed events); 0 turns it off.",
    )
    feedback_confirm_seconds: float = Field(
        1.0, gt=0, le=30, description="Seconds serve waits for RabbitMQ to connect or to "
        "confirm a feedback message before keeping the events in its outbox under DATA_PATH "
        "(shipped when the broker answers again).",
    )
    impression_flush_seconds: float = Field(
        1.0, gt=0, le=60, description="Seconds between flushes of logged impressions."
    )
    impression_batch: int = Field(
        200, ge=1, le=10000, description="Lists of impressions that trigger an early flush."
    )

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _origins(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("model_version")
    @classmethod
    def _version(cls, value: str) -> str:
        value = value.strip().lower()
        if value != "latest" and not (value.isdigit() and int(value) > 0):
            raise ValueError(f"expected 'latest' or a positive version number, got {value!r}")
        return value


class MonitoringSettings(BaseSettings):
    model_config = _CONFIG

    flower_user: str = Field("admin", description="User name of Flower's basic auth.")
    flower_password: SecretStr = Field(
        SecretStr(""),
        description=f"Password of Flower's basic auth; empty means {DEV_FLOWER_PASSWORD!r} in "
        "development and is refused in production.",
    )
    flower_port: int = Field(5555, ge=1, le=65535, description="Port Flower listens on.")
    dashboard_user: str = Field("admin", description="User name of the dashboard's login.")
    dashboard_password: SecretStr = Field(
        SecretStr(""),
        description=f"Password of the dashboard's login; empty means {DEV_DASHBOARD_PASSWORD!r} "
        "in development and is refused in production.",
    )
    dashboard_port: int = Field(8050, ge=1, le=65535,
                                description="Port `recsys dashboard` listens on.")
    worker_metrics_port: int = Field(
        0,
        ge=0,
        le=65535,
        description="Base port of the workers' Prometheus metrics (the worker of the i-th "
        "service queue listens on base + i); 0 turns them off.",
    )

    @field_validator("flower_user")
    @classmethod
    def _flower_user(cls, value: str) -> str:
        value = value.strip()
        # Flower splits its basic-auth option on commas and the credential on the colon.
        if not value or any(c in value for c in ":,"):
            raise ValueError(f"expected a non-empty name without ':' or ',', got {value!r}")
        return value

    @field_validator("dashboard_user")
    @classmethod
    def _dashboard_user(cls, value: str) -> str:
        value = value.strip()
        if not value:
            raise ValueError("expected a non-empty user name")
        return value

    # A model validator, not a field one: a field's error would echo the password.
    @model_validator(mode="after")
    def _flower_password(self) -> MonitoringSettings:
        if "," in self.flower_password.get_secret_value():
            raise ValueError("FLOWER_PASSWORD must not contain ',' (Flower splits on commas)")
        return self


class EvaluationSettings(BaseSettings):
    model_config = _CONFIG

    eval_split_date: dt.date = Field(
        dt.date(2000, 11, 1), description="Temporal protocol: ratings before it train."
    )
    eval_k_values: Annotated[list[int], NoDecode] = Field(
        default_factory=lambda: [5, 10, 20], description="Cut-offs k for ranking metrics."
    )
    eval_protocol: EvalProtocol = Field(
        EvalProtocol.RANDOM, description="random, temporal or leave-last-n."
    )
    eval_stratify: EvalStratify = Field(
        EvalStratify.USER, description="Random protocol: 75/25 within each user (user) or "
        "within each item (item), as Recommenders' python_stratified_split filter_by."
    )
    eval_sample_users: int = Field(
        0, ge=0, description="Test users measured per evaluation, a seeded sample with 95% "
        "confidence intervals (0: every test user)."
    )

    batch_chunk_users: int = Field(
        10_000, ge=1, le=1_000_000, description="Users per chunk of `recsys recommend` and "
        "eval.recommend_batch: each chunk is read, scored and written as one part file, the "
        "unit a rerun resumes from."
    )

    feedback_implicit_rating: float = Field(
        4.0, ge=0.5, le=5.0, description="Stars a click or watch counts for when feedback "
        "joins the ratings in a snapshot.",
    )
    retrain_algorithms: str = Field(
        "", description="Comma-separated algorithms a policy retrain trains (empty: all)."
    )
    retrain_trials: int = Field(
        0, ge=0, description="Tuning trials per algorithm in a policy retrain (0: each "
        "algorithm's own budget).",
    )
    online_window_seconds: int = Field(
        3600, ge=60, description="Length of the sliding window the online metrics cover."
    )
    online_interval_seconds: int = Field(
        300, ge=5, description="How often the beat schedule computes the online window."
    )
    online_match_seconds: int = Field(
        3600, ge=1, description="Feedback without a request id answers a list served this "
        "many seconds before it (same user and item).",
    )
    online_k: int = Field(10, ge=1, description="Cut-off k of the online CTR@k and hit rate.")
    retrain_min_feedback: int = Field(
        1000, ge=1, description="New feedback events since the champion's snapshot that "
        "trigger a retrain.",
    )
    retrain_ctr_margin: float = Field(
        0.2, ge=0, le=1, description="Retrain when online CTR falls this fraction below the "
        "champion's baseline ...",
    )
    retrain_low_windows: int = Field(
        3, ge=1, description="... for this many consecutive windows."
    )
    retrain_lock_seconds: int = Field(
        3600, ge=10, description="Expiry of the lock that keeps retrains one at a time."
    )
    policy_reconnect_seconds: float = Field(
        1.0, gt=0, description="First wait of `recsys policy` before reconnecting to RabbitMQ "
        "or Postgres; it doubles on each failed attempt ...",
    )
    policy_reconnect_max_seconds: float = Field(
        30.0, gt=0, description="... up to this many seconds."
    )
    ab_alpha: float = Field(0.05, gt=0, lt=1, description="Significance level of the A/B "
                            "z-test on CTR.")
    ab_power: float = Field(0.8, gt=0, lt=1, description="Power the A/B minimum sample is "
                            "computed for.")
    ab_min_effect: float = Field(0.1, gt=0, description="Smallest relative CTR change the A/B "
                                 "test should detect.")
    ab_auto_promote: bool = Field(False, description="Promote a challenger that wins the A/B "
                                  "test without asking.")
    rollback_auto: bool = Field(
        False, description="Roll a new champion back when its online CTR falls below the "
        "previous champion's by ROLLBACK_CTR_MARGIN.",
    )
    rollback_ctr_margin: float = Field(
        0.2, ge=0, le=1, description="Relative CTR drop against the previous champion that "
        "rolls back.",
    )

    @field_validator("eval_k_values", mode="before")
    @classmethod
    def _parse_k(cls, value: Any) -> Any:
        if isinstance(value, str):
            parts = [p.strip() for p in value.split(",") if p.strip()]
            if not parts:
                raise ValueError("expected comma-separated positive integers, got nothing")
            try:
                value = [int(p) for p in parts]
            except ValueError:
                raise ValueError(
                    f"expected comma-separated positive integers, got {value!r}"
                ) from None
        return value

    @field_validator("eval_k_values")
    @classmethod
    def _positive_k(cls, value: list[int]) -> list[int]:
        if any(k <= 0 for k in value):
            raise ValueError(f"every k must be positive, got {value}")
        return sorted(set(value))


class Settings(
    PathSettings,
    ObjectStoreSettings,
    DatabaseSettings,
    BrokerSettings,
    CacheSettings,
    TrainingSettings,
    ServingSettings,
    EvaluationSettings,
    MonitoringSettings,
):
    """Every setting of the product; services read the groups they need."""

    model_config = _CONFIG

    @model_validator(mode="after")
    def _enforce_non_default_secrets(self) -> Settings:
        if self.environment is Environment.PRODUCTION:
            if self.api_key.get_secret_value().strip().lower() in PLACEHOLDER_SECRETS:
                raise ValueError("API_KEY must be set to a real secret when ENVIRONMENT=production")
            password = self.flower_password.get_secret_value().strip().lower()
            if password in PLACEHOLDER_SECRETS | {DEV_FLOWER_PASSWORD}:
                raise ValueError(
                    "FLOWER_PASSWORD must be set to a real secret when ENVIRONMENT=production"
                )
            password = self.dashboard_password.get_secret_value().strip().lower()
            if password in PLACEHOLDER_SECRETS | {DEV_DASHBOARD_PASSWORD}:
                raise ValueError(
                    "DASHBOARD_PASSWORD must be set to a real secret when ENVIRONMENT=production"
                )
        return self

    @property
    def embedded(self) -> bool:
        """True when no servers are configured: SQLite, eager tasks, in-process bus."""
        return not (self.database_url or self.broker_url or self.redis_url)

    @property
    def flower_basic_auth(self) -> str:
        """Flower's `user:password`; the development password when none is set there."""
        password = self.flower_password.get_secret_value()
        if not password.strip() and self.environment is Environment.DEVELOPMENT:
            password = DEV_FLOWER_PASSWORD
        return f"{self.flower_user}:{password}"

    @property
    def dashboard_credentials(self) -> tuple[str, str]:
        """The dashboard's (user, password); the development password when none is set."""
        password = self.dashboard_password.get_secret_value()
        if not password.strip() and self.environment is Environment.DEVELOPMENT:
            password = DEV_DASHBOARD_PASSWORD
        return self.dashboard_user, password

    @property
    def resolved_artifact_cache_path(self) -> Path:
        return self.artifact_cache_path or self.data_path / "artifact-cache"

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_path / 'recsys.sqlite3').resolve()}"


def setting_names() -> set[str]:
    """Every environment variable name the product reads."""
    return {name.upper() for name in Settings.model_fields}


_URL_PASSWORD = re.compile(r"(://[^:/@\s]*:)[^@/\s]*@")


def _describe(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        name = str(item["loc"][0]).upper() if item["loc"] else "settings"
        value = item.get("input")
        if name in ("API_KEY", "FLOWER_PASSWORD", "AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID"):
            value = "***"
        shown = "" if isinstance(value, dict) else f" (got {value!r})"
        # An invalid URL is shown without its password.
        lines.append(_URL_PASSWORD.sub(r"\1***@", f"{name}: {item['msg']}{shown}"))
    return "invalid setting: " + "; ".join(lines)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The settings in force; raises SettingsError naming any invalid variable."""
    try:
        return Settings()
    except ValidationError as error:
        raise SettingsError(_describe(error)) from None
