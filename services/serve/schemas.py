"""Request and response bodies of the serve API (pydantic, so OpenAPI documents them)."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    field_validator,
    model_validator,
)

from shared.recommenders import MODEL_KINDS
from shared.settings import EvalProtocol

MAX_ID = 2**31 - 1  # ids are Postgres integers; larger ones cannot name anything
MAX_K = 100
MAX_OFFSET = 1000
MAX_FEEDBACK_BATCH = 1000
FEEDBACK_TYPES = ("rating", "click", "view", "watch")
FeedbackType = Literal["rating", "click", "view", "watch"]
Source = Literal["model", "fold-in", "popular"]
Variant = Literal["champion", "challenger", "pinned"]
Alias = Literal["champion", "challenger"]
# Request ids travel into Postgres via the ingest worker, which retries forever: refuse
# anything (NUL bytes, odd unicode) that could make such a message a poison pill.
REQUEST_ID_PATTERN = r"^[A-Za-z0-9._:-]{1,64}$"
# Event ids go the same way, and are the key that stores an event once.
EVENT_ID_PATTERN = REQUEST_ID_PATTERN
IDEMPOTENCY_KEY_PATTERN = r"^[A-Za-z0-9._:-]{1,128}$"


# Request bodies refuse unknown keys, and NaN or infinite numbers in any field (Python's
# JSON parser reads NaN, Infinity and 1e400 as floats).
REQUEST_BODY = ConfigDict(extra="forbid", allow_inf_nan=False)

IDS_PATTERN = r"^ *[0-9]{1,10}( *, *[0-9]{1,10}){0,999} *$"


class ListQuery(BaseModel):
    """The query of GET /recommendations/{user_id}: one model, validated in one pass (as
    four separate parameters, FastAPI's per-request work was a tenth of a cache hit)."""

    k: int = Field(10, ge=1, le=MAX_K, description="How many items.")
    offset: int = Field(0, ge=0, le=MAX_OFFSET, description="Items to skip (paging).")
    exclude: str | None = Field(None, pattern=IDS_PATTERN,
                                description="Comma-separated movie ids never to return.")
    genres: str | None = Field(None, max_length=400, description="Comma-separated genres; "
                               "items of any of them are kept.")


class Item(BaseModel):
    movie_id: int = Field(description="MovieLens movie id.")
    title: str
    year: int | None
    genres: list[str]
    score: float = Field(description="Model score (train count for the popular list).")


class RecommendationList(BaseModel):
    user_id: int
    items: list[Item]
    model_version: int
    variant: Variant = Field(description="Which model answered: champion, challenger, or "
                             "pinned (MODEL_VERSION).")
    source: Source = Field(description="model: the user is in the model; fold-in: the user's "
                           "interactions were folded in; popular: cold start.")
    request_id: str = Field(description="Id of this list; send it back with feedback.")


class SimilarItems(BaseModel):
    movie_id: int
    items: list[Item]
    model_version: int


class PopularList(BaseModel):
    items: list[Item]
    genres: list[str]
    model_version: int


class FeedbackIn(BaseModel):
    """One feedback event; a batch is a JSON array of these."""

    model_config = REQUEST_BODY

    event_id: str | None = Field(
        None, pattern=EVENT_ID_PATTERN,
        description="The client's id of this event (a UUID, say): the event is stored once "
        "however often it is posted, so a retry with the same id is safe. Without one, "
        "serve derives it from the Idempotency-Key header and the event's position, or "
        "assigns a new one.",
    )
    user_id: int = Field(ge=1, le=MAX_ID)
    movie_id: int = Field(ge=1, le=MAX_ID)
    type: FeedbackType
    value: float | None = Field(
        None, ge=-1e6, le=1e6, allow_inf_nan=False,
        description="Rating value (required for `rating`, 0.5 to 5); optional and only "
        "stored for the other types (a click or watch counts as FEEDBACK_IMPLICIT_RATING "
        "stars, a view as seen). Kept to 4 decimals.",
    )
    timestamp: dt.datetime | None = Field(
        None, description="When it happened (ISO 8601); now when omitted, UTC when naive."
    )
    request_id: str | None = Field(
        None, pattern=REQUEST_ID_PATTERN, description="request_id of the list it answers."
    )

    @field_validator("timestamp")
    @classmethod
    def _utc(cls, value: dt.datetime | None) -> dt.datetime | None:
        if value is None:
            return None
        try:
            value = (value.replace(tzinfo=dt.UTC) if value.tzinfo is None
                     else value.astimezone(dt.UTC))
        except (OverflowError, ValueError):
            raise ValueError("timestamp is outside the range of dates that can be stored") from None
        if value > dt.datetime.now(dt.UTC) + dt.timedelta(days=1):
            raise ValueError("timestamp is more than a day in the future")
        return value

    @model_validator(mode="after")
    def _rating_needs_value(self) -> FeedbackIn:
        if self.type == "rating" and (self.value is None or not 0.5 <= self.value <= 5.0):
            raise ValueError("a rating needs a value from 0.5 to 5")
        if self.value is not None:
            # REAL columns refuse magnitudes they cannot hold (underflow too): round first.
            self.value = round(self.value, 4)
        return self


EVENT, BATCH = "event", "batch"
UNION_BRANCHES = frozenset({EVENT, BATCH})  # pydantic names them in error locations


def _feedback_shape(value: Any) -> str | None:
    """Which form a feedback body takes: an array is a batch, an object one event."""
    if isinstance(value, list):
        return BATCH
    return EVENT if isinstance(value, dict | FeedbackIn) else None


# Chosen by the body's shape, so an error names the field that is wrong (body[3].movie_id)
# rather than every form the body could have taken.
FeedbackBatch = Annotated[
    Annotated[FeedbackIn, Tag(EVENT)]
    | Annotated[list[FeedbackIn], Field(min_length=1, max_length=MAX_FEEDBACK_BATCH), Tag(BATCH)],
    Discriminator(_feedback_shape, custom_error_type="feedback_shape",
                  custom_error_message="Input should be one feedback event (a JSON object) "
                  f"or a JSON array of 1 to {MAX_FEEDBACK_BATCH} of them"),
]


class FeedbackAccepted(BaseModel):
    accepted: int = Field(description="Events now durably queued for persistence: each will "
                          "be stored exactly once.")
    event_ids: list[str]


class FeedbackRefused(BaseModel):
    detail: str
    event_ids: list[str] = Field(description="The ids the events had: they may have been "
                                 "stored, and a retry with these ids stores each once.")


class ModelInfo(BaseModel):
    name: str
    version: int
    algorithm: str
    params: dict[str, Any]
    metrics: dict[str, Any]
    snapshot: str
    artifact_path: str
    sha256: str
    aliases: list[str]
    created_at: str | None


class ModelList(BaseModel):
    models: list[ModelInfo]
    serving: dict[str, int] = Field(description="Version each variant of this process serves.")


class PromoteIn(BaseModel):
    model_config = REQUEST_BODY

    alias: Alias = "champion"
    reason: str = Field("promoted through the API", max_length=500)


class RollbackIn(BaseModel):
    model_config = REQUEST_BODY

    alias: Alias = "champion"
    reason: str = Field("rolled back through the API", max_length=500)


class AliasMove(BaseModel):
    status: Literal["done", "queued"] = Field(
        description="done: the alias moved; queued: the registry worker has not answered "
        "yet and will move it when it takes the task."
    )
    task_id: str | None = None
    alias: str
    version: int | None = None
    previous: int | None = None
    action: str | None = None
    reason: str | None = None


class RetrainIn(BaseModel):
    model_config = REQUEST_BODY

    algorithms: list[str] | None = Field(
        None, min_length=1, max_length=len(MODEL_KINDS),
        description=f"Algorithms to train (all when omitted): {', '.join(sorted(MODEL_KINDS))}.",
    )
    trials: int | None = Field(None, ge=1, le=1000, description="Tuning trials per algorithm.")
    protocol: EvalProtocol | None = None

    @field_validator("algorithms")
    @classmethod
    def _known(cls, value: list[str] | None) -> list[str] | None:
        unknown = [a for a in value or [] if a not in MODEL_KINDS]
        if unknown:
            raise ValueError(f"unknown algorithm {unknown[0]!r}; one of "
                             f"{', '.join(sorted(MODEL_KINDS))}")
        return value


class RetrainQueued(BaseModel):
    task_id: str | None = Field(description="Id of the chain's last task (None when it runs "
                                "in-process, embedded mode).")
    stages: list[str]
    status: Literal["queued", "running"]


class RunningRetrain(BaseModel):
    task_id: str | None = Field(description="Id of the running chain's last task (None when "
                                "it runs in-process, embedded mode).")
    holder: str = Field(description="Who started it: `api-...`, `pipeline-...`, or the "
                        "policy rule (`new_feedback-...`, `ctr_drop-...`).")
    since: str = Field(description="When it took the lock (ISO 8601, UTC).")
    expires_at: str = Field(description="When the lock expires if the chain never ends.")


class RetrainConflict(BaseModel):
    detail: str
    running: RunningRetrain


class Health(BaseModel):
    status: Literal["ok"]


class Dependency(BaseModel):
    ok: bool
    detail: str


class Readiness(BaseModel):
    ready: bool = Field(description="A model is loaded, so recommendations are served.")
    status: Literal["ready", "degraded", "not-ready"] = Field(
        description="degraded: serving, but a dependency is down (answers are computed "
        "without the cache, or from the snapshot alone, or feedback is refused)."
    )
    models: dict[str, int]
    last_error: str | None
    dependencies: dict[str, Dependency]


class Problem(BaseModel):
    detail: str


class OnlineWindow(BaseModel):
    """One model version's and variant's online figures over one window."""

    window_start: dt.datetime
    window_end: dt.datetime
    model_version: int | None = Field(description="0: lists served without a model.")
    variant: str
    k: int
    lists: int
    impressions: int
    clicks: int
    ctr: float
    hit_rate: float
    mean_click_position: float | None
    feedback: int
    satisfaction: float | None


class OnlineMetrics(BaseModel):
    """The newest online windows, newest first (empty before eval.online has run)."""

    windows: list[OnlineWindow]


BatchUserId = Annotated[int, Field(ge=1, le=MAX_ID)]


class BatchIn(BaseModel):
    """What `POST /recommendations/batch` queues on the eval worker."""

    model_config = ConfigDict(extra="forbid")

    users: Literal["all"] | list[BatchUserId] = Field(
        "all", description="'all' (every user the model knows and every user with "
        "interactions), or a list of user ids.")
    k: int = Field(10, ge=1, le=MAX_K, description="Items per user.")
    model: str = Field("latest", pattern=r"^([0-9]{1,9}|latest|challenger)$",
                       description="A version number, 'latest' (the champion) or 'challenger'.")
    exclude_seen: bool = Field(True, description="Leave out what each user rated or gave "
                               "feedback on, as the lists of GET /recommendations do.")
    genres: list[str] = Field(default_factory=list, max_length=50,
                              description="Keep items of any of these genres.")
    output: str | None = Field(None, max_length=1000, pattern=r"(?i)\.(parquet|csv|jsonl)$",
                               description="File the eval worker writes (.parquet, .csv or "
                               ".jsonl); by default MODEL_PATH/batches/<task id>.parquet "
                               "(uploaded there when MODEL_PATH is an s3:// store).")


class BatchQueued(BaseModel):
    task_id: str
    status: Literal["queued"]


class BatchStatus(BaseModel):
    task_id: str
    state: str = Field(description="PENDING (queued, or an id never issued), STARTED, "
                       "PROGRESS, SUCCESS or FAILURE.")
    output: str | None = Field(None, description="Where the file is, once written.")
    summary: dict[str, Any] | None = Field(None, description="users, rows, output, "
                                           "model_version, seconds, resumed_chunks, ...")
    progress: dict[str, int] | None = None
    error: str | None = None
