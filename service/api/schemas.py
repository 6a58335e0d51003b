"""Request and response models of the REST API (separate from the ORM models)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import Query
from pydantic import BaseModel, ConfigDict, Field, PlainSerializer, WithJsonSchema

from service.domain.export_formats import ALL_FORMATS, FORMAT_HELP, FORMAT_ORDER, ExportSelection
from service.domain.spec import ReplicaUrls, TeacherSpec, Text
from service.domain.statuses import (
    DeliveryStatus,
    ExampleStatus,
    ExportStatus,
    IterationStatus,
    JobStatus,
)
from service.domain.teacher import GenerationParams, StructuredMode, TeacherLimits, TeacherPrices
from service.models import isoformat_utc
from service.pagination import CURSOR_PATTERN

# The largest value of a Postgres `integer` column (iteration numbers and the like).
PG_INT_MAX = 2**31 - 1

# The formats, listed in the document; plan_export refuses any other with its own message
# (naming the field and the formats) and says which one a job's strategy allows.
_FORMAT_ENUM: dict[str, Any] = {"enum": [f for f in FORMAT_ORDER if f in ALL_FORMATS]}
assert set(_FORMAT_ENUM["enum"]) == ALL_FORMATS
# An http(s) URL: what check_base_url asks before it resolves the host.
HTTP_URL_PATTERN = r"^[Hh][Tt][Tt][Pp][Ss]?://[^/?#]+"

# The `cursor` query parameter of every paginated list: the `next_cursor` of the page before.
CursorQuery = Annotated[
    str | None,
    Query(
        pattern=CURSOR_PATTERN,
        description="The next_cursor of the page before; omit for the first.",
    ),
]


# Every moment a response carries is written one way: UTC with a Z. Read back, Postgres gives
# the session's offset and SQLite none at all, while a row just created holds UTC.
UtcDateTime = Annotated[
    datetime,
    PlainSerializer(isoformat_utc, return_type=str, when_used="json"),
    WithJsonSchema({"type": "string", "format": "date-time"}),
]


class _Read(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class ErrorDetail(BaseModel):
    code: str
    message: str
    details: Any = None


class ErrorBody(BaseModel):
    error: ErrorDetail


class DatasetRead(_Read):
    id: uuid.UUID
    name: str
    content_hash: str
    row_count: int
    size_bytes: int
    fields: list[str]
    created_at: UtcDateTime


class DatasetRowRead(_Read):
    id: uuid.UUID
    index: int
    data: dict[str, Any]


class DatasetDetail(DatasetRead):
    preview: list[DatasetRowRead]


# Teacher text fields are limited to their columns (service/models.py Teacher).
class TeacherCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    name: Text = Field(..., min_length=1, max_length=200)
    base_url: Text = Field(
        ...,
        max_length=2000,
        pattern=HTTP_URL_PATTERN,
        description="OpenAI-compatible base URL, e.g. http://vllm:8000/v1",
    )
    replica_urls: ReplicaUrls = Field(default_factory=list)
    model: Text = Field(..., min_length=1, max_length=500)
    api_key: Text | None = Field(None, description="Stored encrypted; never returned.")
    api_key_env: Text | None = Field(
        None,
        max_length=200,
        description="Or: the worker environment variable that holds the key.",
    )
    limits: TeacherLimits = Field(default_factory=TeacherLimits)
    prices: TeacherPrices = Field(default_factory=TeacherPrices)
    generation: GenerationParams = Field(default_factory=GenerationParams)
    structured_mode: StructuredMode = StructuredMode.auto
    timeout_s: float = Field(120.0, gt=0, le=3600, strict=True)
    max_attempts: int = Field(6, ge=1, le=50, strict=True)

    def as_spec(self) -> TeacherSpec:
        """Everything but the name and the key: what `teachers.create_teacher` stores."""
        return TeacherSpec.model_validate(self.model_dump(exclude={"name", "api_key"}))


class TeacherUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    name: Text | None = Field(None, min_length=1, max_length=200)
    base_url: Text | None = Field(None, max_length=2000, pattern=HTTP_URL_PATTERN)
    replica_urls: ReplicaUrls | None = None
    model: Text | None = Field(None, min_length=1, max_length=500)
    api_key: Text | None = None
    api_key_env: Text | None = Field(None, max_length=200)
    limits: TeacherLimits | None = None
    prices: TeacherPrices | None = None
    generation: GenerationParams | None = None
    structured_mode: StructuredMode | None = None
    timeout_s: float | None = Field(None, gt=0, le=3600, strict=True)
    max_attempts: int | None = Field(None, ge=1, le=50, strict=True)


class TeacherRead(_Read):
    id: uuid.UUID
    name: str
    base_url: str
    replica_urls: list[str]
    model: str
    has_api_key: bool
    api_key_env: str | None
    limits: dict[str, Any]
    prices: dict[str, Any]
    generation: dict[str, Any]
    structured_mode: str
    timeout_s: float
    max_attempts: int
    created_at: UtcDateTime
    updated_at: UtcDateTime


class JobRead(_Read):
    id: uuid.UUID
    name: str
    strategy: str
    status: JobStatus
    status_reason: str | None
    spec: dict[str, Any]
    teacher_id: uuid.UUID
    current_iteration: int
    best_iteration: int | None
    tokens_in: int
    tokens_out: int
    cost_usd: float
    examples_accepted: int
    examples_rejected: int
    created_at: UtcDateTime
    started_at: UtcDateTime | None
    finished_at: UtcDateTime | None


class IterationRead(_Read):
    id: uuid.UUID
    number: int
    status: IterationStatus
    phase: str | None
    metric: float | None
    metrics: dict[str, Any] | None
    test_metrics: dict[str, Any] | None
    targets_count: int
    batches_total: int
    batches_done: int
    examples_accepted: int
    examples_rejected: int
    rejected_by_reason: dict[str, Any]
    tokens_in: int
    tokens_out: int
    cost_usd: float
    teacher_calls: int
    regressed: bool
    included: bool
    selection_reason: str | None = Field(
        None, description="Why the iteration's examples were kept in or excluded from the dataset."
    )
    comparisons: list[dict[str, Any]] | None = Field(
        None,
        description="The comparisons behind that decision, each with its reference "
        "iteration, `measure`, `delta`, 90% bootstrap interval (`low`, `high`) and `n`: "
        "`metric` (the validation metric's difference), `gold_log_probability` (the mean "
        "log-probability of the gold label's difference) and `teacher_label_agreement` (how "
        "often a student without the iteration's examples predicts their labels, over its "
        "held-out accuracy; 10 labels or more).",
    )
    timings: dict[str, Any]
    started_at: UtcDateTime | None
    finished_at: UtcDateTime | None
    note: str | None = Field(None, description="The note of the refresh that started it.")
    refresh_id: uuid.UUID | None = None


class ExampleRead(_Read):
    id: uuid.UUID
    iteration_id: uuid.UUID | None
    kind: str
    status: ExampleStatus
    rejection_reason: str | None
    rejection_detail: str | None
    input: str
    output: str | None
    rationale: str | None
    source_row_id: uuid.UUID | None
    target_id: str | None
    target_reason: str | None
    prompt_fingerprint: str | None
    teacher_call_id: uuid.UUID | None
    meta: dict[str, Any]
    created_at: UtcDateTime


class ExportCreate(ExportSelection):
    """An export to write: a format, the selection (the best dataset by default) and gzip."""

    format: Text = Field(
        "jsonl", max_length=32, description=FORMAT_HELP + ".", json_schema_extra=_FORMAT_ENUM
    )
    gzip: bool = Field(False, description="Write .jsonl.gz files (gzip, no timestamp).")

    @property
    def selection(self) -> ExportSelection:
        return ExportSelection.model_validate(
            self.model_dump(include=set(ExportSelection.model_fields))
        )


class ExportStreamQuery(ExportSelection):
    """`GET /v1/jobs/{id}/export`: the format, the selection, the file and gzip."""

    format: Text = Field(
        "jsonl", max_length=32, description=FORMAT_HELP + ".", json_schema_extra=_FORMAT_ENUM
    )
    split: Literal["train", "validation"] | None = Field(
        None,
        description="With a validation_fraction: which of the two files to stream.",
    )
    gzip: bool = Field(
        False, description="Send a .jsonl.gz file (application/gzip) instead of plain JSONL."
    )

    @property
    def selection(self) -> ExportSelection:
        return ExportSelection.model_validate(
            self.model_dump(include=set(ExportSelection.model_fields))
        )


class ExportRead(_Read):
    id: uuid.UUID
    job_id: uuid.UUID
    format: str
    status: ExportStatus
    row_count: int
    manifest: dict[str, Any]
    error: str | None
    iteration: int | None = None
    options: dict[str, Any] = Field(
        default_factory=dict, description="The selection and gzip the export was requested with."
    )
    created_at: UtcDateTime


class Health(BaseModel):
    status: str
    checks: dict[str, str] = {}


# --- API keys ---------------------------------------------------------------------------------


class ApiKeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    name: Text = Field("default", min_length=1, max_length=200)
    job_id: uuid.UUID | None = Field(
        None, description="Scope the key to this job: it may read and refresh it, nothing else."
    )
    expires_at: datetime | None = Field(None, description="When the key stops working.")
    # strict: a JSON body's true is not 1 (pydantic's lax mode would take it).
    expires_in_s: int | None = Field(
        None,
        ge=1,
        le=10 * 366 * 86400,
        strict=True,
        description="Or: seconds from now until it expires.",
    )


class ApiKeyRead(_Read):
    id: uuid.UUID
    name: str
    prefix: str = Field(..., description="The first characters of the key, to recognise it.")
    job_id: uuid.UUID | None
    expires_at: UtcDateTime | None
    revoked_at: UtcDateTime | None
    last_used_at: UtcDateTime | None
    created_at: UtcDateTime


class ApiKeyCreated(ApiKeyRead):
    key: str = Field(..., description="The key itself; shown this once, never stored.")


# --- refreshes --------------------------------------------------------------------------------


class RefreshRead(BaseModel):
    id: uuid.UUID
    job_id: uuid.UUID
    status: str = Field(
        ...,
        description="pending (waits for the iteration under way), evaluating (an endpoint "
        "student's revision is scored first), started (its iteration is planned).",
    )
    outcome: str = Field(
        ...,
        description="waiting; ready_for_student (an external student's turn: train on the new "
        "data and post predictions); succeeded; failed; cancelled.",
    )
    note: str | None
    student: dict[str, Any]
    extra_budget: dict[str, Any]
    student_iteration: int | None = Field(
        None, description="The iteration whose metric is the refreshed student's."
    )
    iteration: int | None = Field(None, description="The first iteration the refresh generates.")
    dataset_iteration: int | None = Field(
        None,
        description="Export as of this iteration for the next student to train on (the "
        "refresh's newest iteration when the student is trained outside the loop).",
    )
    metric: float | None = Field(None, description="The refreshed student's metric.")
    baseline_metric: float | None = Field(
        None, description="The best metric before the refreshed student's iteration."
    )
    job_status: JobStatus
    job_status_reason: str | None
    best_iteration: int | None
    iterations: list[IterationRead]
    created_at: UtcDateTime
    started_at: UtcDateTime | None


# --- webhooks ---------------------------------------------------------------------------------


class WebhookCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    url: Text = Field(
        ...,
        max_length=2000,
        pattern=HTTP_URL_PATTERN,
        description="Where events are POSTed (http or https).",
    )
    events: list[Literal["iteration.completed", "job.completed", "job.failed"]] = Field(
        ...,
        min_length=1,
        description="Any of iteration.completed, job.completed, job.failed.",
    )
    job_id: uuid.UUID | None = Field(None, description="Only this job's events; default: all.")
    secret: Text | None = Field(
        None,
        min_length=16,
        max_length=200,
        description="Signing secret; generated (and shown once) when omitted.",
    )
    description: Text | None = Field(None, max_length=500)


class WebhookRead(_Read):
    id: uuid.UUID
    url: str
    events: list[str]
    job_id: uuid.UUID | None
    description: str | None
    created_at: UtcDateTime


class WebhookCreated(WebhookRead):
    secret: str = Field(..., description="The signing secret; shown this once.")


class WebhookDeliveryRead(_Read):
    id: uuid.UUID = Field(..., description="Also the X-Distill-Delivery header: dedupe on it.")
    subscription_id: uuid.UUID
    job_id: uuid.UUID | None
    event: str
    payload: dict[str, Any]
    status: DeliveryStatus
    attempts: int
    next_attempt_at: UtcDateTime | None
    last_attempt_at: UtcDateTime | None
    response_status: int | None
    last_error: str | None
    delivered_at: UtcDateTime | None
    created_at: UtcDateTime
