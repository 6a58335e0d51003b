"""ORM models: the single source of the schema (Alembic autogenerates from these)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    Uuid,
    false,
    text,
)
from sqlalchemy import Enum as SAEnum
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from service.domain.statuses import (
    BatchStatus,
    DeliveryStatus,
    ExampleStatus,
    ExportStatus,
    IterationStatus,
    JobStatus,
    RefreshStatus,
)

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# JSONB on Postgres (indexable, compact), plain JSON on SQLite (embedded mode).
JSONType = JSON().with_variant(JSONB(), "postgresql")


def utcnow() -> datetime:
    return datetime.now(UTC)


def isoformat_utc(moment: datetime) -> str:
    """A moment as API responses and webhook payloads write it: ISO 8601 in UTC with a Z. A
    naive value is UTC already (every stored moment is; SQLite only drops the offset)."""
    aware = moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
    return aware.isoformat().replace("+00:00", "Z")


def _enum(enum_cls: type[Any], name: str) -> SAEnum:
    # Stored as VARCHAR + CHECK, not a native PG enum: adding a status is a plain migration.
    return SAEnum(
        enum_cls,
        name=name,
        native_enum=False,
        create_constraint=True,
        length=32,
        values_callable=lambda e: [m.value for m in e],
        validate_strings=True,
    )


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {dict[str, Any]: JSONType, list[Any]: JSONType}


class IdMixin:
    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)


class TimestampMixin:
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, onupdate=utcnow
    )


# --- tenants and auth ---------------------------------------------------------------------


class Tenant(IdMixin, TimestampMixin, Base):
    __tablename__ = "tenants"
    name: Mapped[str] = mapped_column(String(200), unique=True)


class ApiKey(IdMixin, TimestampMixin, Base):
    __tablename__ = "api_keys"
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(200), default="default")
    prefix: Mapped[str] = mapped_column(String(16))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Scoped keys (service/auth.py): set, the key reads and refreshes this one job, nothing else.
    job_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("jobs.id", ondelete="CASCADE"), index=True
    )
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    tenant: Mapped[Tenant] = relationship(lazy="raise")


# --- datasets -------------------------------------------------------------------------------


class Dataset(IdMixin, TimestampMixin, Base):
    """Uploaded rows; immutable once stored, identified by a content hash."""

    __tablename__ = "datasets"
    tenant_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("tenants.id", ondelete="CASCADE"), index=True
    )
    name: Mapped[str] = mapped_column(String(200))
    content_hash: Mapped[str] = mapped_column(String(64), index=True)
    row_count: Mapped[int] = mapped_column(Integer)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    fields: Mapped[list[Any]] = mapped_column(default=list)


class DatasetRow(IdMixin, Base):
    __tablename__ = "dataset_rows"
    __table_args__ = (UniqueConstraint("dataset_id", "index"),)
    dataset_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"))
    index: Mapped[int] = mapped_column(Integer)
    data: Mapped[dict[str, Any]]


# --- teachers -------------------------------------------------------------------------------


class Teacher(IdMixin, TimestampMixin, Base):
    """An OpenAI-compatible endpoint; its key is stored encrypted or as an env-var reference."""

    __tablename__ = "teachers"
    __table_args__ = (UniqueConstraint("tenant_id", "name"),)
    tenant_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("tenants.id", ondelete="CASCADE"), index=True
    )
    name: Mapped[str] = mapped_column(String(200))
    base_url: Mapped[str] = mapped_column(String(2000))
    # More base URLs serving the same model (replicas): the gateway balances requests over
    # base_url and these by their load; each has the teacher's limits.
    replica_urls: Mapped[list[Any]] = mapped_column(default=list, server_default="[]")
    model: Mapped[str] = mapped_column(String(500))
    api_key_encrypted: Mapped[str | None] = mapped_column(Text)
    api_key_env: Mapped[str | None] = mapped_column(String(200))
    limits: Mapped[dict[str, Any]] = mapped_column(default=dict)
    prices: Mapped[dict[str, Any]] = mapped_column(default=dict)
    generation: Mapped[dict[str, Any]] = mapped_column(default=dict)
    structured_mode: Mapped[str] = mapped_column(String(32), default="auto")
    timeout_s: Mapped[float] = mapped_column(Float, default=120.0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=6)
    # Set by an operator (CLI, or DISTILL_API__ALLOW_PRIVATE_TEACHER_URLS): workers may connect
    # to private addresses for it. Otherwise they refuse to, whatever the name resolves to.
    allow_private_network: Mapped[bool] = mapped_column(
        Boolean, default=False, server_default=false()
    )


# --- jobs and iterations -------------------------------------------------------------------


class Job(IdMixin, TimestampMixin, Base):
    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("tenant_id", "idempotency_key"),
        Index("ix_jobs_tenant_created", "tenant_id", "created_at", "id"),
    )
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(200))
    strategy: Mapped[str] = mapped_column(String(32))
    spec: Mapped[dict[str, Any]]
    status: Mapped[JobStatus] = mapped_column(_enum(JobStatus, "job_status"), index=True)
    status_reason: Mapped[str | None] = mapped_column(Text)
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    teacher_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("teachers.id", ondelete="RESTRICT"))
    train_dataset_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("datasets.id", ondelete="RESTRICT")
    )
    validation_dataset_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("datasets.id", ondelete="RESTRICT")
    )
    test_dataset_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("datasets.id", ondelete="RESTRICT")
    )
    current_iteration: Mapped[int] = mapped_column(Integer, default=0)
    best_iteration: Mapped[int | None] = mapped_column(Integer)
    tokens_in: Mapped[int] = mapped_column(BigInteger, default=0)
    tokens_out: Mapped[int] = mapped_column(BigInteger, default=0)
    cost_usd: Mapped[float] = mapped_column(Float, default=0.0)
    examples_accepted: Mapped[int] = mapped_column(Integer, default=0)
    examples_rejected: Mapped[int] = mapped_column(Integer, default=0)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    teacher: Mapped[Teacher] = relationship(lazy="raise")
    iterations: Mapped[list[Iteration]] = relationship(
        back_populates="job", lazy="raise", order_by="Iteration.number"
    )


class Iteration(IdMixin, TimestampMixin, Base):
    """One round: evaluate → mine → generate → filter → train, with its metrics and spend."""

    __tablename__ = "iterations"
    __table_args__ = (UniqueConstraint("job_id", "number"),)
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    number: Mapped[int] = mapped_column(Integer)
    status: Mapped[IterationStatus] = mapped_column(_enum(IterationStatus, "iteration_status"))
    phase: Mapped[str | None] = mapped_column(String(32))
    metric: Mapped[float | None] = mapped_column(Float)
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    test_metrics: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    targets_count: Mapped[int] = mapped_column(Integer, default=0)
    batches_total: Mapped[int] = mapped_column(Integer, default=0)
    batches_done: Mapped[int] = mapped_column(Integer, default=0)
    examples_accepted: Mapped[int] = mapped_column(Integer, default=0)
    examples_rejected: Mapped[int] = mapped_column(Integer, default=0)
    rejected_by_reason: Mapped[dict[str, Any]] = mapped_column(default=dict)
    tokens_in: Mapped[int] = mapped_column(BigInteger, default=0)
    tokens_out: Mapped[int] = mapped_column(BigInteger, default=0)
    cost_usd: Mapped[float] = mapped_column(Float, default=0.0)
    teacher_calls: Mapped[int] = mapped_column(Integer, default=0)
    regressed: Mapped[bool] = mapped_column(Boolean, default=False)
    included: Mapped[bool] = mapped_column(
        Boolean,
        default=True,
        doc="Its examples are in the exported dataset (False once they made the student "
        "measurably worse; see service/domain/selection.py).",
    )
    selection_reason: Mapped[str | None] = mapped_column(
        Text, doc="Why the iteration's examples were kept or excluded, in words."
    )
    comparisons: Mapped[list[Any] | None] = mapped_column(
        JSONType, doc="The paired bootstrap comparisons behind the decision (selection.Comparison)."
    )
    timings: Mapped[dict[str, Any]] = mapped_column(default=dict)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Set on the iterations a refresh started: its note (commit SHA, CI run URL) and its id.
    note: Mapped[str | None] = mapped_column(Text)
    refresh_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("job_refreshes.id", ondelete="SET NULL")
    )

    job: Mapped[Job] = relationship(back_populates="iterations", lazy="raise")


class GenerationBatch(IdMixin, TimestampMixin, Base):
    """A slice of an iteration's targets, generated by one task; the unit of fan-out."""

    __tablename__ = "generation_batches"
    __table_args__ = (UniqueConstraint("iteration_id", "phase", "index"),)
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    iteration_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("iterations.id", ondelete="CASCADE"))
    phase: Mapped[str] = mapped_column(String(32))
    index: Mapped[int] = mapped_column(Integer)
    status: Mapped[BatchStatus] = mapped_column(_enum(BatchStatus, "batch_status"), index=True)
    # Deferred: read only where a batch is loaded to be run (`workers.steps.generate`) or a
    # target looked up. Every other load of a batch (its status, its lease, a close) left the
    # whole JSON, 512 targets with their prompts, to be parsed again after each commit.
    targets: Mapped[list[Any]] = mapped_column(deferred=True)
    # Incremented by every claim: the claim's token. A worker whose lease lapsed (and whose batch
    # another worker took over) can no longer move the batch, since its token is stale.
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text)
    # A pending batch whose teacher calls failed transiently is not claimed before this time.
    retry_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # When the teacher first failed this batch; it fails for good past the retry deadline.
    unavailable_since: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Claims that ended with the worker crashing or dead (not retries): a poison batch's count.
    crashes: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class TeacherCall(IdMixin, TimestampMixin, Base):
    """One teacher request and its outcome; the fingerprint cache that makes resume free."""

    __tablename__ = "teacher_calls"
    __table_args__ = (UniqueConstraint("teacher_id", "fingerprint"),)
    teacher_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("teachers.id", ondelete="CASCADE"))
    job_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("jobs.id", ondelete="SET NULL"), index=True
    )
    batch_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("generation_batches.id", ondelete="SET NULL")
    )
    fingerprint: Mapped[str] = mapped_column(String(64))
    template_id: Mapped[str] = mapped_column(String(100))
    template_version: Mapped[str] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(16))
    text: Mapped[str | None] = mapped_column(Text)
    parsed: Mapped[Any | None] = mapped_column(JSONType)
    error_code: Mapped[str | None] = mapped_column(String(64))
    error: Mapped[str | None] = mapped_column(Text)
    finish_reason: Mapped[str | None] = mapped_column(String(32))
    tokens_in: Mapped[int] = mapped_column(Integer, default=0)
    tokens_out: Mapped[int] = mapped_column(Integer, default=0)
    latency_s: Mapped[float] = mapped_column(Float, default=0.0)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    reasks: Mapped[int] = mapped_column(Integer, default=0)
    cost_usd: Mapped[float] = mapped_column(Float, default=0.0)
    retry_causes: Mapped[dict[str, Any]] = mapped_column(default=dict)


class Example(IdMixin, Base):
    """One candidate training row, accepted or rejected with its reason, with lineage."""

    __tablename__ = "examples"
    __table_args__ = (
        UniqueConstraint("job_id", "dedup_key"),
        # Also the order an export reads an iteration's rows in (created_at, id): the first row
        # of a million is found without sorting them (service/export_rows.py).
        Index("ix_examples_job_iteration", "job_id", "iteration_id", "status", "created_at", "id"),
        # The examples a job committed after a given point (`seq`), for the dedup indexes.
        Index("ix_examples_job_seq", "job_id", "seq"),
    )
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    iteration_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("iterations.id", ondelete="CASCADE")
    )
    batch_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("generation_batches.id", ondelete="SET NULL")
    )
    teacher_call_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("teacher_calls.id", ondelete="SET NULL")
    )
    # Natural key that makes a redelivered batch a no-op: "<fingerprint>:<item index>".
    dedup_key: Mapped[str] = mapped_column(String(200))
    kind: Mapped[str] = mapped_column(String(32))
    status: Mapped[ExampleStatus] = mapped_column(_enum(ExampleStatus, "example_status"))
    rejection_reason: Mapped[str | None] = mapped_column(String(64))
    rejection_detail: Mapped[str | None] = mapped_column(Text)
    input: Mapped[str] = mapped_column(Text)
    output: Mapped[str | None] = mapped_column(Text)
    rationale: Mapped[str | None] = mapped_column(Text)
    input_hash: Mapped[str] = mapped_column(String(64))
    source_row_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("dataset_rows.id", ondelete="SET NULL")
    )
    target_id: Mapped[str | None] = mapped_column(String(200))
    target_reason: Mapped[str | None] = mapped_column(String(64))
    prompt_fingerprint: Mapped[str | None] = mapped_column(String(64))
    meta: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # The job's commit order: one number per write of a job's examples (a batch's close, a set
    # of preference pairs), given under the job's lock (`service.jobs.next_example_seq`), so
    # every example with a lower number was committed before. Null on rows stored before it.
    seq: Mapped[int | None] = mapped_column(BigInteger)


class Prediction(IdMixin, Base):
    """A student's answer for one evaluation row in one iteration (builtin, endpoint or posted)."""

    __tablename__ = "predictions"
    __table_args__ = (UniqueConstraint("iteration_id", "split", "row_id"),)
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    iteration_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("iterations.id", ondelete="CASCADE"))
    split: Mapped[str] = mapped_column(String(16))
    row_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("dataset_rows.id", ondelete="CASCADE"))
    gold: Mapped[str | None] = mapped_column(Text)
    predicted: Mapped[str | None] = mapped_column(Text)
    confidence: Mapped[float | None] = mapped_column(Float)
    correct: Mapped[bool | None] = mapped_column(Boolean)
    probabilities: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    raw: Mapped[str | None] = mapped_column(Text)
    error: Mapped[str | None] = mapped_column(Text)
    source: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Export(IdMixin, TimestampMixin, Base):
    __tablename__ = "exports"
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    format: Mapped[str] = mapped_column(String(32))
    status: Mapped[ExportStatus] = mapped_column(_enum(ExportStatus, "export_status"))
    path: Mapped[str | None] = mapped_column(Text)
    row_count: Mapped[int] = mapped_column(Integer, default=0)
    manifest: Mapped[dict[str, Any]] = mapped_column(default=dict)
    error: Mapped[str | None] = mapped_column(Text)
    # The dataset as of this iteration (included iterations up to it); None: the best one.
    iteration: Mapped[int | None] = mapped_column(Integer)
    # The rest of the request: the selection (export_formats.ExportSelection) and gzip.
    options: Mapped[dict[str, Any]] = mapped_column(default=dict, server_default="{}")


# --- refreshes and webhooks -------------------------------------------------------------------


class JobRefresh(IdMixin, TimestampMixin, Base):
    """A request for the next iteration(s) of a job, aimed at its latest student's errors."""

    __tablename__ = "job_refreshes"
    __table_args__ = (
        UniqueConstraint("job_id", "idempotency_key"),
        Index("ix_job_refreshes_job_status", "job_id", "status", "created_at"),
    )
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    status: Mapped[RefreshStatus] = mapped_column(_enum(RefreshStatus, "refresh_status"))
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    request_hash: Mapped[str] = mapped_column(String(64))
    note: Mapped[str | None] = mapped_column(Text)
    student: Mapped[dict[str, Any]] = mapped_column(default=dict)
    extra_budget: Mapped[dict[str, Any]] = mapped_column(default=dict)
    # True when the refresh reopened a finished job (its budget then counts from the refresh).
    reopened: Mapped[bool] = mapped_column(Boolean, default=False)
    api_key_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("api_keys.id", ondelete="SET NULL")
    )
    # Filled in when the loop starts it: the iteration whose metric is the refreshed student's,
    # the first iteration it generates, and the best metric before the student's iteration.
    student_iteration: Mapped[int | None] = mapped_column(Integer)
    iteration: Mapped[int | None] = mapped_column(Integer)
    baseline_metric: Mapped[float | None] = mapped_column(Float)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class WebhookSubscription(IdMixin, TimestampMixin, Base):
    """Where a tenant's (or one job's) events are POSTed, signed with the subscription's secret."""

    __tablename__ = "webhook_subscriptions"
    tenant_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("tenants.id", ondelete="CASCADE"), index=True
    )
    job_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("jobs.id", ondelete="CASCADE"), index=True
    )
    url: Mapped[str] = mapped_column(String(2000))
    events: Mapped[list[Any]] = mapped_column(default=list)
    description: Mapped[str | None] = mapped_column(String(500))
    secret_encrypted: Mapped[str] = mapped_column(Text)
    # As for teachers: only an operator's setting lets deliveries reach private addresses.
    allow_private_network: Mapped[bool] = mapped_column(
        Boolean, default=False, server_default=false()
    )


class WebhookDelivery(IdMixin, TimestampMixin, Base):
    """One event for one subscription: attempted and retried with backoff from this row."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        UniqueConstraint("subscription_id", "event_key"),
        Index("ix_webhook_deliveries_due", "status", "next_attempt_at"),
    )
    subscription_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("webhook_subscriptions.id", ondelete="CASCADE")
    )
    job_id: Mapped[uuid.UUID | None] = mapped_column(Uuid)
    event: Mapped[str] = mapped_column(String(64))
    # What makes a redelivered step emit nothing twice, e.g. "iteration.completed:<id>".
    event_key: Mapped[str] = mapped_column(String(200))
    payload: Mapped[dict[str, Any]]
    status: Mapped[DeliveryStatus] = mapped_column(_enum(DeliveryStatus, "delivery_status"))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    last_attempt_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    response_status: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    delivered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
