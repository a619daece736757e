"""Settings for every service, read from the environment and `.env`.

One class per concern, composed into `Settings`. Read them through `get_settings()`,
which caches; tests change the environment and call `get_settings.cache_clear()`.
"""

from __future__ import annotations

import datetime as dt
from enum import StrEnum
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from shared.errors import RecsysError

GROUPLENS_ML_100K = "https://files.grouplens.org/datasets/movielens/ml-100k.zip"
PLACEHOLDER_SECRETS = {"", "changeme", "change-me", "changethis", "secret", "dev"}


class SettingsError(RecsysError):
    """A setting has an invalid value; the message names the variable."""


class Environment(StrEnum):
    DEVELOPMENT = "development"
    PRODUCTION = "production"


class EvalProtocol(StrEnum):
    RANDOM = "random"
    TEMPORAL = "temporal"
    LEAVE_LAST_N = "leave-last-n"


_CONFIG = SettingsConfigDict(
    env_file=".env", env_file_encoding="utf-8", extra="ignore", case_sensitive=False
)


class PathSettings(BaseSettings):
    model_config = _CONFIG

    data_path: Path = Field(Path("data"), description="Working data: SQLite file, downloads.")
    model_path: Path = Field(Path("models"), description="Artifact store for snapshots and models.")
    data_source: str = Field(
        GROUPLENS_ML_100K,
        description="MovieLens source for the pipeline: a directory, a .zip or a URL.",
    )


class DatabaseSettings(BaseSettings):
    model_config = _CONFIG

    database_url: str = Field(
        "", description="SQLAlchemy URL of Postgres; empty means SQLite under DATA_PATH."
    )

    @field_validator("database_url")
    @classmethod
    def _known_dialect(cls, value: str) -> str:
        value = value.strip()
        if value and not value.startswith(("postgresql", "sqlite")):
            raise ValueError(f"expected a postgresql:// or sqlite:// URL, got {value!r}")
        return value


class BrokerSettings(BaseSettings):
    model_config = _CONFIG

    broker_url: str = Field(
        "", description="RabbitMQ AMQP URL; empty runs tasks eagerly in one process."
    )
    event_exchange: str = Field("recsys.events", description="Topic exchange for events.")

    @field_validator("broker_url")
    @classmethod
    def _amqp(cls, value: str) -> str:
        value = value.strip()
        if value and not value.startswith(("amqp://", "amqps://", "pyamqp://")):
            raise ValueError(f"expected an amqp:// URL, got {value!r}")
        return value


class CacheSettings(BaseSettings):
    model_config = _CONFIG

    redis_url: str = Field("", description="Redis URL; empty means an in-process cache.")
    cache_ttl: int = Field(300, ge=0, description="Seconds a cached recommendation list lives.")

    @field_validator("redis_url")
    @classmethod
    def _redis(cls, value: str) -> str:
        value = value.strip()
        if value and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"expected a redis:// URL, got {value!r}")
        return value


class TrainingSettings(BaseSettings):
    model_config = _CONFIG

    # 26 and 15 are the values tuned on MovieLens 100K; tuning searches around them.
    als_rank: int = Field(26, ge=1, le=4096, description="ALS latent factors (default rank).")
    als_iterations: int = Field(15, ge=1, le=1000, description="ALS iterations (default).")
    train_threads: int = Field(0, ge=0, description="Threads for training; 0 means all cores.")
    seed: int = Field(42, description="Seed of every random number generator.")


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

    @field_validator("model_version")
    @classmethod
    def _version(cls, value: str) -> str:
        value = value.strip().lower()
        if value != "latest" and not (value.isdigit() and int(value) > 0):
            raise ValueError(f"expected 'latest' or a positive version number, got {value!r}")
        return value


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
    DatabaseSettings,
    BrokerSettings,
    CacheSettings,
    TrainingSettings,
    ServingSettings,
    EvaluationSettings,
):
    """Every setting of the product; services read the groups they need."""

    model_config = _CONFIG

    @model_validator(mode="after")
    def _enforce_non_default_secrets(self) -> Settings:
        if self.environment is Environment.PRODUCTION:
            if self.api_key.get_secret_value().strip().lower() in PLACEHOLDER_SECRETS:
                raise ValueError("API_KEY must be set to a real secret when ENVIRONMENT=production")
        return self

    @property
    def embedded(self) -> bool:
        """True when no servers are configured: SQLite, eager tasks, in-process bus."""
        return not (self.database_url or self.broker_url or self.redis_url)

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_path / 'recsys.sqlite3').resolve()}"


def setting_names() -> set[str]:
    """Every environment variable name the product reads."""
    return {name.upper() for name in Settings.model_fields}


def _describe(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        name = str(item["loc"][0]).upper() if item["loc"] else "settings"
        value = item.get("input")
        shown = "" if isinstance(value, dict) else f" (got {value!r})"
        lines.append(f"{name}: {item['msg']}{shown}")
    return "invalid setting: " + "; ".join(lines)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The settings in force; raises SettingsError naming any invalid variable."""
    try:
        return Settings()
    except ValidationError as error:
        raise SettingsError(_describe(error)) from None
