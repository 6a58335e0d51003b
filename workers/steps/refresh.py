"""Starting a refresh at the loop's decision point (see service/refreshes.py for the contract).

`decide_and_continue` calls `start_due_refresh` first: when a refresh waits, it — not the
stopping rule — decides what comes next. A pending refresh applies its student revision and
extra budget, then either plans its first generation iteration from the latest evaluated
student's predictions, or (an endpoint student the loop does not retrain) first evaluates the
served model in an iteration of its own; when that evaluation completes the decision point
comes back here and the generation iteration is planned from it.
"""

from __future__ import annotations

from typing import Any

import structlog
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from service import tasks
from service.domain.spec import StudentType
from service.domain.statuses import IterationStatus, RefreshStatus
from service.jobs import STUDENT_PRIVATE_KEY
from service.models import Iteration, Job, JobRefresh, utcnow
from service.refreshes import MAX_ITERATIONS, evaluates_first
from service.splits import job_spec
from workers.steps.context import load_job_context

log = structlog.get_logger()

# extra_budget key → the job budget limit it raises.
_LIMITS = {"examples": "max_examples", "tokens": "max_tokens", "cost_usd": "max_cost_usd"}


def _due(session: Session, job: Job) -> JobRefresh | None:
    # The same lock request_refresh takes first: either the refresh was committed before this
    # decision point (and is seen here), or it waits for this transaction and sees its outcome.
    session.execute(
        update(Job)
        .where(Job.id == job.id)
        .values(heartbeat_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    return session.scalar(
        select(JobRefresh)
        .where(
            JobRefresh.job_id == job.id,
            JobRefresh.status.in_([RefreshStatus.pending, RefreshStatus.evaluating]),
        )
        .order_by(JobRefresh.created_at, JobRefresh.id)
        .limit(1)
    )


def _best_metric_before(session: Session, job: Job, number: int) -> float | None:
    value = session.scalar(
        select(func.max(Iteration.metric)).where(
            Iteration.job_id == job.id,
            Iteration.number < number,
            Iteration.status == IterationStatus.completed,
        )
    )
    return float(value) if value is not None else None


def _apply_student(job: Job, refresh: JobRefresh) -> None:
    changes = {k: v for k, v in refresh.student.items() if k in ("model", "base_url") and v}
    if changes:
        job.spec = {**job.spec, "student": {**job.spec["student"], **changes}}
    if "base_url" in changes and STUDENT_PRIVATE_KEY in refresh.student:
        job.spec = {**job.spec, STUDENT_PRIVATE_KEY: refresh.student[STUDENT_PRIVATE_KEY]}


def _apply_budget(job: Job, refresh: JobRefresh, first: int) -> None:
    budget: dict[str, Any] = dict(job.spec["budget"])
    extra = refresh.extra_budget
    last = min(first + int(extra.get("iterations", 1)) - 1, MAX_ITERATIONS)
    # A reopened job runs exactly the refresh's iterations; a running one keeps its own too.
    budget["max_iterations"] = last if refresh.reopened else max(budget["max_iterations"], last)
    for key, limit in _LIMITS.items():
        if extra.get(key) is not None and budget.get(limit) is not None:
            budget[limit] = budget[limit] + extra[key]
    job.spec = {**job.spec, "budget": budget}


def start_due_refresh(session: Session, job: Job) -> bool:
    """Start (or continue) the oldest refresh waiting for this job; False when none waits."""
    from workers.steps.job import plan_context, plan_iteration  # job.py calls in here

    refresh = _due(session, job)
    if refresh is None:
        return False
    latest_number = int(
        session.scalar(select(func.max(Iteration.number)).where(Iteration.job_id == job.id)) or 0
    )
    if refresh.status is RefreshStatus.pending:
        _apply_student(job, refresh)
        refresh.started_at = utcnow()
        if evaluates_first(job):
            number = latest_number + 1
            evaluation = Iteration(
                job_id=job.id,
                number=number,
                status=IterationStatus.pending,
                note=refresh.note,
                refresh_id=refresh.id,
            )
            session.add(evaluation)
            job.current_iteration = number
            refresh.status = RefreshStatus.evaluating
            refresh.student_iteration = number
            refresh.baseline_metric = _best_metric_before(session, job, number)
            session.flush()
            tasks.enqueue(session, tasks.ITERATION_EVALUATE, str(evaluation.id))
            log.info("refresh.evaluating", job_id=str(job.id), iteration=number)
            return True
        if job_spec(job).student.type is StudentType.external:
            # The student is the one whose predictions were posted to the last iteration.
            refresh.student_iteration = latest_number
            refresh.baseline_metric = _best_metric_before(session, job, latest_number)
        else:
            refresh.baseline_metric = _best_metric_before(session, job, latest_number + 1)

    number = latest_number + 1
    _apply_budget(job, refresh, number)
    ctx = load_job_context(session, job)
    # Aimed at the latest evaluated student (the one the refresh is about), not at the best.
    evaluated = session.scalar(
        select(Iteration)
        .where(Iteration.job_id == job.id, Iteration.status == IterationStatus.completed)
        .order_by(Iteration.number.desc())
        .limit(1)
    )
    plan_ctx = plan_context(session, job, ctx, number, ctx.strategy.phases[0], evaluated)
    plan_iteration(session, job, ctx, number, plan_ctx)
    session.execute(
        update(Iteration)
        .where(Iteration.job_id == job.id, Iteration.number == number)
        .values(note=refresh.note, refresh_id=refresh.id)
        .execution_options(synchronize_session="fetch")
    )
    refresh.status = RefreshStatus.started
    refresh.iteration = number
    session.flush()
    log.info(
        "refresh.started",
        job_id=str(job.id),
        refresh_id=str(refresh.id),
        iteration=number,
        aimed_at=evaluated.number if evaluated is not None else None,
    )
    return True
