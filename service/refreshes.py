"""Refreshes: a student retrained elsewhere (CI) asks for the next iteration(s) of a job.

`POST /v1/jobs/{id}/refresh` records a `JobRefresh` and (re)starts the job; the loop starts it
at its next decision point (`workers/steps/refresh.py`, called from `decide_and_continue`), so
a refresh never races the iteration under way:

- a finished (succeeded) job is reopened: succeeded → running, and its last iteration is the
  decision point; a paused job is resumed; a running job takes the refresh when its current
  iteration completes.
- "the latest student" is, by student type: builtin — the loop's own student, retrained on the
  current data; external — the predictions posted to the last iteration (POST them first:
  a refresh of a job whose last iteration still awaits feedback is a 409); endpoint (without a
  trainer command) — the served model, which may have a new name or URL: it is evaluated first,
  in an iteration of its own, because its errors are not known yet.
- the first generation iteration is planned from that student's predictions (aimed at its
  errors) and carries the refresh's note; the extra budget adds iterations (counted from the
  refresh when it reopened a finished job) and raises the token, money and example limits.

An Idempotency-Key makes a retried CI step return the same refresh instead of starting another.
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service import tasks
from service.domain.spec import StudentType, Text
from service.domain.statuses import IterationStatus, JobStatus, RefreshStatus
from service.errors import Conflict, NotFound, ValidationFailed
from service.jobs import STUDENT_PRIVATE_KEY, request_transition, transition_job
from service.models import Iteration, Job, JobRefresh, utcnow
from service.secrets import KeyEnvPolicy
from service.splits import job_spec
from service.teachers import STUDENT_PRIVATE_HINT, check_base_url

# Budget.max_iterations' upper bound (service/domain/spec.py).
MAX_ITERATIONS = 1000


class StudentRevision(BaseModel):
    """The student a refresh is about. An endpoint student may name its new revision (served
    model name and/or URL); an external student's predictions are posted as feedback first."""

    model_config = ConfigDict(extra="forbid")
    model: Text | None = Field(
        None, min_length=1, max_length=500, description="endpoint: the served model name."
    )
    base_url: Text | None = Field(None, max_length=2000, description="endpoint: its base URL.")
    revision: Text | None = Field(
        None, max_length=200, description="A label kept with the refresh (checkpoint, tag)."
    )


class ExtraBudget(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    iterations: int = Field(1, ge=1, le=100, description="Generation iterations to run.")
    examples: int | None = Field(None, ge=1, description="Added to budget.max_examples.")
    tokens: int | None = Field(None, ge=1, description="Added to budget.max_tokens.")
    cost_usd: float | None = Field(None, gt=0, le=1e9, description="Added to budget.max_cost_usd.")


class RefreshCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    student: StudentRevision | None = None
    extra_budget: ExtraBudget = Field(default_factory=ExtraBudget)
    note: Text | None = Field(
        None, max_length=2000, description="Kept on the new iteration(s): commit SHA, CI run URL."
    )


def trained_outside(job: Job) -> bool:
    """Students the loop does not train itself: their evaluation of an iteration's data comes
    from outside (posted predictions, or a revision a CI served) after they learned from it."""
    student = job_spec(job).student
    return student.type is StudentType.external or (
        student.type is StudentType.endpoint and not student.trainer_command
    )


def evaluates_first(job: Job) -> bool:
    """An endpoint student the loop does not retrain: a refresh scores the served model (maybe
    a new revision) before planning, since the errors of what is served now are not known."""
    student = job_spec(job).student
    return student.type is StudentType.endpoint and not student.trainer_command


def _request_hash(body: RefreshCreate) -> str:
    return hashlib.sha256(body.model_dump_json().encode()).hexdigest()


def _lock_job(session: Session, job: Job) -> None:
    """Take the job's row (Postgres) or the write lock (SQLite) before reading its state, so
    a refresh and the loop's decision point (which takes the same lock) see each other."""
    session.execute(
        update(Job)
        .where(Job.id == job.id)
        .values(updated_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    session.refresh(job)


def _latest(session: Session, job: Job) -> Iteration | None:
    return session.scalar(
        select(Iteration)
        .where(Iteration.job_id == job.id)
        .order_by(Iteration.number.desc())
        .limit(1)
    )


def _check_state(session: Session, job: Job) -> Iteration | None:
    if job.status in (JobStatus.failed, JobStatus.cancelled):
        raise Conflict(
            f"cannot refresh a job that is {job.status.value}: create a new job",
            details=[{"field": "status", "message": job.status.value}],
        )
    if job.status is JobStatus.queued:
        raise Conflict(
            "cannot refresh a job that has not started yet",
            details=[{"field": "status", "message": job.status.value}],
        )
    latest = _latest(session, job)
    if latest is not None and latest.status is IterationStatus.awaiting_feedback:
        raise Conflict(
            f"iteration {latest.number} still waits for the student's predictions: post them "
            f"to /v1/jobs/{job.id}/iterations/{latest.number}/feedback, then refresh",
            details=[{"field": "student", "message": "awaiting_feedback"}],
            code="awaiting_feedback",
        )
    return latest


def _check_student(
    job: Job, body: RefreshCreate, *, allow_private: bool, key_envs: KeyEnvPolicy
) -> None:
    revision = body.student
    if revision is None or (revision.model is None and revision.base_url is None):
        return
    student = job_spec(job).student
    if student.type is not StudentType.endpoint:
        raise ValidationFailed(
            f"student: a {student.type.value} student has no served model to name: "
            + (
                "post its predictions as feedback, then refresh"
                if student.type is StudentType.external
                else "the loop trains it"
            ),
            details=[{"field": "student", "message": f"the job's student is {student.type.value}"}],
        )
    if student.trainer_command:
        raise ValidationFailed(
            "student: this job's trainer_command serves each new revision itself",
            details=[{"field": "student", "message": "trainer_command is set"}],
        )
    if revision.base_url is not None:
        check_base_url(
            revision.base_url,
            allow_private=allow_private,
            field="student.base_url",
            private_hint=STUDENT_PRIVATE_HINT,
        )
        # The job's key goes to the new URL: it must be allowed there.
        key_envs.check(student.api_key_env, [revision.base_url], field="student.api_key_env")


def _check_budget(job: Job, body: RefreshCreate, latest: Iteration | None) -> None:
    budget = job_spec(job).budget
    extra = body.extra_budget
    first = (latest.number if latest is not None else 0) + (2 if evaluates_first(job) else 1)
    if first + extra.iterations - 1 > MAX_ITERATIONS:
        raise ValidationFailed(
            f"extra_budget.iterations: a job runs at most {MAX_ITERATIONS} iterations",
            details=[{"field": "extra_budget.iterations", "message": f"first would be {first}"}],
        )
    spent = {
        "tokens": (budget.max_tokens, job.tokens_in + job.tokens_out),
        "cost_usd": (budget.max_cost_usd, job.cost_usd),
        "examples": (budget.max_examples, job.examples_accepted),
    }
    for name, (limit, used) in spent.items():
        if limit is not None and used >= limit and getattr(extra, name) is None:
            raise ValidationFailed(
                f"extra_budget.{name}: the job's {name} budget is spent ({used} of {limit}); "
                "a refresh must raise it",
                details=[{"field": f"extra_budget.{name}", "message": "budget spent"}],
            )


def request_refresh(
    session: Session,
    job: Job,
    body: RefreshCreate,
    *,
    idempotency_key: str | None,
    api_key_id: uuid.UUID | None,
    allow_private: bool,
    key_envs: KeyEnvPolicy,
) -> tuple[JobRefresh, bool]:
    """Returns (refresh, created). The same Idempotency-Key with the same body returns the
    refresh it started; with another body it is a 409."""
    request_hash = _request_hash(body)
    _lock_job(session, job)  # also serialises two requests with the same key
    if idempotency_key:
        existing = session.scalar(
            select(JobRefresh).where(
                JobRefresh.job_id == job.id, JobRefresh.idempotency_key == idempotency_key
            )
        )
        if existing is not None:
            if existing.request_hash != request_hash:
                raise Conflict(
                    "Idempotency-Key was already used with a different refresh",
                    details=[{"field": "Idempotency-Key", "message": idempotency_key}],
                )
            return existing, False
    latest = _check_state(session, job)
    _check_student(job, body, allow_private=allow_private, key_envs=key_envs)
    _check_budget(job, body, latest)
    student = body.student.model_dump(exclude_none=True) if body.student else {}
    if student.get("base_url"):
        # What the workers check its connections by once it is applied (`STUDENT_PRIVATE_KEY`).
        student[STUDENT_PRIVATE_KEY] = allow_private
    refresh = JobRefresh(
        job_id=job.id,
        status=RefreshStatus.pending,
        idempotency_key=idempotency_key,
        request_hash=request_hash,
        note=body.note,
        student=student,
        extra_budget=body.extra_budget.model_dump(exclude_none=True),
        reopened=job.status is JobStatus.succeeded,
        api_key_id=api_key_id,
    )
    try:
        with session.begin_nested():
            session.add(refresh)
            session.flush()
    except IntegrityError as exc:  # a concurrent request with the same key won (SQLite)
        raise Conflict(
            "a refresh with this Idempotency-Key is being created; retry the request",
            details=[{"field": "Idempotency-Key", "message": idempotency_key}],
        ) from exc
    if job.status is JobStatus.succeeded:
        if not transition_job(session, job, JobStatus.running, reason="refresh"):
            raise Conflict("the job changed concurrently; retry")
        tasks.enqueue(session, tasks.JOB_START, str(job.id))
    elif job.status is JobStatus.paused:
        request_transition(session, job, JobStatus.running)
    # running: its next decision point starts the refresh.
    return refresh, True


def get_refresh(session: Session, job: Job, refresh_id: uuid.UUID) -> JobRefresh:
    refresh = session.get(JobRefresh, refresh_id)
    if refresh is None or refresh.job_id != job.id:
        raise NotFound(f"refresh {refresh_id} of job {job.id} not found")
    return refresh


def list_refreshes(session: Session, job: Job) -> list[JobRefresh]:
    return list(
        session.scalars(
            select(JobRefresh)
            .where(JobRefresh.job_id == job.id)
            .order_by(JobRefresh.created_at.desc(), JobRefresh.id)
        )
    )


def _next_start(session: Session, refresh: JobRefresh, eval_first: bool) -> int | None:
    """Where the next started refresh of the same job began, which ends this one's span."""
    later = session.execute(
        select(JobRefresh.student_iteration, JobRefresh.iteration)
        .where(
            JobRefresh.job_id == refresh.job_id,
            JobRefresh.status != RefreshStatus.pending,
            JobRefresh.created_at > refresh.created_at,
        )
        .order_by(JobRefresh.created_at)
        .limit(1)
    ).first()
    if later is None:
        return None
    number = later.student_iteration if eval_first else later.iteration
    return int(number) if number is not None else None


@dataclass
class RefreshState:
    """What a refresh led to, read from the job's rows."""

    job: Job
    outcome: str  # waiting | ready_for_student | succeeded | failed | cancelled
    student_iteration: int | None
    metric: float | None
    dataset_iteration: int | None
    iterations: list[Iteration] = field(default_factory=list)


def refresh_state(session: Session, refresh: JobRefresh) -> RefreshState:
    """The refresh's iterations (from the revision's evaluation or its first generation up to
    the next refresh), the refreshed student's metric, and an outcome a CI step can wait for:
    `ready_for_student` when an external student must now learn from the new data and post
    its predictions, `succeeded` once the job finished the refresh's iterations."""
    job = session.get(Job, refresh.job_id)
    assert job is not None
    outside, eval_first = trained_outside(job), evaluates_first(job)
    first = refresh.student_iteration if eval_first else refresh.iteration
    end = _next_start(session, refresh, eval_first)
    span: list[Iteration] = []
    if first is not None:
        stmt = select(Iteration).where(Iteration.job_id == job.id, Iteration.number >= first)
        if end is not None:
            stmt = stmt.where(Iteration.number < end)
        span = list(session.scalars(stmt.order_by(Iteration.number)))
    generated = [
        it for it in span if refresh.iteration is not None and it.number >= refresh.iteration
    ]

    student_iteration = refresh.student_iteration
    if not outside:  # the loop's own student: the one trained on the refresh's newest data
        done = [it for it in generated if it.status is IterationStatus.completed]
        student_iteration = done[-1].number if done else None
    metric = None
    if student_iteration is not None:
        metric = session.scalar(
            select(Iteration.metric).where(
                Iteration.job_id == job.id, Iteration.number == student_iteration
            )
        )

    if job.status is JobStatus.failed:
        outcome = "failed"
    elif job.status is JobStatus.cancelled:
        outcome = "cancelled"
    elif refresh.status is not RefreshStatus.started:
        outcome = "waiting"
    elif any(it.status is IterationStatus.awaiting_feedback for it in generated):
        outcome = "ready_for_student"
    elif job.status is JobStatus.succeeded or end is not None:
        outcome = "succeeded"
    else:
        outcome = "waiting"
    return RefreshState(
        job=job,
        outcome=outcome,
        student_iteration=student_iteration,
        metric=metric,
        dataset_iteration=generated[-1].number if outside and generated else None,
        iterations=span,
    )
