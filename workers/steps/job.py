"""Job-level steps: start or resume a job, plan an iteration, decide, reconcile stuck work."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import timedelta

import structlog
from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.orm import Session

from service import tasks
from service.db import insert_ignore
from service.domain.statuses import (
    ITERATION_TERMINAL,
    BatchStatus,
    IterationStatus,
    JobStatus,
)
from service.domain.strategies.base import (
    GenerationTarget,
    IterationOutcome,
    PlanContext,
    examples_for_iteration,
)
from service.jobs import transition_job
from service.models import GenerationBatch, Iteration, Job, utcnow
from service.settings import WorkerSettings
from workers.steps.context import (
    JobContext,
    best_iteration,
    evaluated_rows,
    load_job_context,
)

log = structlog.get_logger()


def start_job(session: Session, job_id: uuid.UUID) -> None:
    """Move a queued job to running and enqueue whatever its rows say comes next."""
    job = session.get(Job, job_id)
    if job is None:
        return
    if job.status is JobStatus.queued:
        transition_job(session, job, JobStatus.running)
    if job.status is not JobStatus.running:
        return  # paused, cancelled or finished: a redelivered start is a no-op
    advance(session, job)


def advance(session: Session, job: Job) -> None:
    """Look at the job's rows and enqueue the next step; safe to call any number of times."""
    job.heartbeat_at = utcnow()
    latest = session.scalar(
        select(Iteration).where(Iteration.job_id == job.id).order_by(Iteration.number.desc())
    )
    if latest is None:
        baseline = Iteration(job_id=job.id, number=0, status=IterationStatus.pending)
        session.add(baseline)
        session.flush()
        tasks.enqueue(session, tasks.ITERATION_EVALUATE, str(baseline.id))
        return
    if latest.status in (IterationStatus.pending, IterationStatus.evaluating):
        tasks.enqueue(session, tasks.ITERATION_EVALUATE, str(latest.id))
    elif latest.status in (IterationStatus.generating, IterationStatus.scoring):
        pending = session.scalars(
            select(GenerationBatch.id).where(
                GenerationBatch.iteration_id == latest.id,
                GenerationBatch.phase == latest.phase,
                GenerationBatch.status.in_([BatchStatus.pending, BatchStatus.running]),
            )
        ).all()
        for batch_id in pending:
            tasks.enqueue(session, tasks.BATCH_GENERATE, str(batch_id))
        if not pending:
            tasks.enqueue(session, tasks.PHASE_FINISH, str(latest.id), latest.phase or "")
    elif latest.status is IterationStatus.training:
        tasks.enqueue(session, tasks.ITERATION_EVALUATE, str(latest.id))
    elif latest.status in ITERATION_TERMINAL:
        decide_and_continue(session, job)


def history(session: Session, job: Job) -> list[IterationOutcome]:
    rows = session.scalars(
        select(Iteration)
        .where(Iteration.job_id == job.id, Iteration.status == IterationStatus.completed)
        .order_by(Iteration.number)
    )
    return [
        IterationOutcome(
            iteration=it.number,
            metric=it.metric,
            accepted=it.examples_accepted,
            targets=it.targets_count,
            included=it.included,
        )
        for it in rows
    ]


def budget_reason(job: Job, ctx: JobContext) -> str | None:
    budget = ctx.spec.budget
    if budget.max_tokens is not None and job.tokens_in + job.tokens_out >= budget.max_tokens:
        return "token budget reached"
    if budget.max_cost_usd is not None and job.cost_usd >= budget.max_cost_usd:
        return "cost budget reached"
    if budget.max_examples is not None and job.examples_accepted >= budget.max_examples:
        return "example budget reached"
    return None


def decide_and_continue(session: Session, job: Job) -> None:
    """After an iteration completed: stop (and mark the best) or plan the next one."""
    from workers.steps.refresh import start_due_refresh  # it plans through this module

    if start_due_refresh(session, job):
        return  # a refresh asked for the next iteration (workers/steps/refresh.py)
    ctx = load_job_context(session, job)
    past = history(session, job)
    last = past[-1].iteration if past else 0
    best = best_iteration(session, job)
    plan_ctx = plan_context(session, job, ctx, last + 1, ctx.strategy.phases[0], best)
    decision = ctx.strategy.decide(
        past, stopping=ctx.spec.stopping, budget=ctx.spec.budget, ctx=plan_ctx
    )
    reason = decision.reason if decision.stop else budget_reason(job, ctx)
    if decision.stop or reason:
        finish_job(session, job, reason or "stopping rule")
        return
    plan_iteration(session, job, ctx, last + 1, plan_ctx)


def finish_job(session: Session, job: Job, reason: str) -> None:
    calls, accepted, top = _yield_summary(session, job)
    if calls and not accepted:
        # Finished by its rules, but nothing the teacher wrote was usable: say so where the
        # user looks first, instead of a bare "max_iterations".
        reason = f"{reason}; no example accepted from {calls} teacher calls ({top})"
    elif accepted and job.best_iteration == 0:
        # The teacher's examples were accepted, but every iteration made the student
        # measurably worse: that is a failure of the loop to report, not a dataset to celebrate.
        reason = (
            f"{reason}; every iteration's examples were excluded (each made the student "
            "measurably worse on validation, or its labels looked wrong: see each iteration's "
            "reason): the export holds the seed set only (iteration 0)"
        )
    if transition_job(session, job, JobStatus.succeeded, reason=reason):
        log.info("job.succeeded", job_id=str(job.id), reason=reason, best=job.best_iteration)


def _yield_summary(session: Session, job: Job) -> tuple[int, int, str]:
    """(teacher calls, accepted examples, the most common rejection reasons) of the job."""
    iterations = session.scalars(select(Iteration).where(Iteration.job_id == job.id)).all()
    calls = sum(it.teacher_calls for it in iterations)
    accepted = sum(it.examples_accepted for it in iterations)
    reasons: dict[str, int] = {}
    for it in iterations:
        for reason, count in (it.rejected_by_reason or {}).items():
            reasons[reason] = reasons.get(reason, 0) + int(count)
    top = ", ".join(f"{r}={n}" for r, n in sorted(reasons.items(), key=lambda x: -x[1])[:3])
    return calls, accepted, top or "no rejections recorded"


def plan_context(
    session: Session,
    job: Job,
    ctx: JobContext,
    number: int,
    phase: str,
    best: Iteration | None,
) -> PlanContext:
    evaluated = evaluated_rows(session, best, ctx) if best is not None else []
    # The strategy sees only the validation rows that steer this iteration; the others judge
    # whether its examples are kept (service/domain/selection.py).
    steering = ctx.validation_roles(number).steering
    evaluated = [r for r in evaluated if r.split != "validation" or r.row_id in steering]
    max_examples = examples_for_iteration(
        ctx.spec.budget,
        iteration=number,
        accepted_so_far=job.examples_accepted,
        n_labels=len(ctx.labels) if ctx.labels else None,
    )
    return PlanContext(
        task=ctx.spec.task,
        params=ctx.params,
        iteration=number,
        phase=phase,
        seed=ctx.spec.seed,
        labels=ctx.labels,
        train_rows=ctx.train,
        evaluated=evaluated,
        max_examples=max_examples,
    )


def plan_iteration(
    session: Session, job: Job, ctx: JobContext, number: int, plan_ctx: PlanContext
) -> None:
    """Store the iteration's targets as batches BEFORE generating: a crash resumes with them."""
    targets = ctx.strategy.plan(plan_ctx)
    insert_ignore(
        session,
        Iteration,
        [
            {
                "id": uuid.uuid4(),
                "job_id": job.id,
                "number": number,
                "status": IterationStatus.generating.value,
                "phase": plan_ctx.phase,
                "started_at": utcnow(),
                "created_at": utcnow(),
                "updated_at": utcnow(),
                "rejected_by_reason": {},
                "timings": {},
            }
        ],
        ["job_id", "number"],
    )
    iteration = session.scalar(
        select(Iteration).where(Iteration.job_id == job.id, Iteration.number == number)
    )
    assert iteration is not None
    job.current_iteration = number
    store_batches(session, job, iteration, plan_ctx.phase, targets, ctx.spec.batch_size)


def store_batches(
    session: Session,
    job: Job,
    iteration: Iteration,
    phase: str,
    targets: Sequence[GenerationTarget],
    batch_size: int,
) -> None:
    dumped = [t.model_dump(mode="json") for t in targets]
    rows = [
        {
            "id": uuid.uuid4(),
            "job_id": job.id,
            "iteration_id": iteration.id,
            "phase": phase,
            "index": i // batch_size,
            "status": BatchStatus.pending.value,
            "targets": dumped[i : i + batch_size],
            "attempts": 0,
            "created_at": utcnow(),
            "updated_at": utcnow(),
        }
        for i in range(0, len(dumped), batch_size)
    ]
    insert_ignore(session, GenerationBatch, rows, ["iteration_id", "phase", "index"])
    iteration.phase = phase
    iteration.status = IterationStatus.generating
    iteration.targets_count = (iteration.targets_count or 0) + len(dumped)
    iteration.batches_total = int(
        session.scalar(select(func.count()).where(GenerationBatch.iteration_id == iteration.id))
        or 0
    )
    session.flush()
    if not rows:
        tasks.enqueue(session, tasks.PHASE_FINISH, str(iteration.id), phase)
        return
    for batch_id in session.scalars(
        select(GenerationBatch.id).where(
            GenerationBatch.iteration_id == iteration.id,
            GenerationBatch.phase == phase,
            GenerationBatch.status == BatchStatus.pending,
        )
    ):
        tasks.enqueue(session, tasks.BATCH_GENERATE, str(batch_id))


def reconcile(session: Session, worker: WorkerSettings) -> int:
    """Re-send work that a lost message or a dead worker left behind. Every step is
    idempotent (compare-and-set claims), so a spurious re-send costs nothing.

    - A running batch or evaluation whose lease lapsed (not renewed for `lease_s`: its worker
      died or lost Postgres) goes back to pending and is sent again, whatever the state of
      the rest of its job.
    - A pending batch that is due (its retry time passed, or nobody claimed it for
      `requeue_after_s`: its message was lost with the broker) is sent again.
    - A running or queued job with no live lease and no progress for `stuck_after_s` has its
      next step sent again (a lost evaluation or phase-end message).
    """
    from workers.steps.generate import release_crashed_batch

    now = utcnow()
    lapsed = now - timedelta(seconds=worker.lease_s)
    # Batches whose worker stopped renewing their lease: a crash each (put back, or failed at
    # max_crashes: a batch that kills its workers).
    released: list[tuple[uuid.UUID, uuid.UUID]] = []
    for batch_id, job_id in session.execute(
        select(GenerationBatch.id, GenerationBatch.job_id).where(
            GenerationBatch.status == BatchStatus.running, GenerationBatch.updated_at < lapsed
        )
    ).all():
        if release_crashed_batch(session, batch_id, None, worker):
            released.append((batch_id, job_id))
    abandoned = session.execute(
        update(Iteration)
        .where(Iteration.status == IterationStatus.evaluating, Iteration.updated_at < lapsed)
        .values(status=IterationStatus.pending, updated_at=now)
        .returning(Iteration.id, Iteration.job_id)
        .execution_options(synchronize_session=False)
    ).all()
    running_jobs = select(Job.id).where(Job.status == JobStatus.running)
    unclaimed = now - timedelta(seconds=worker.requeue_after_s)
    due = session.execute(
        update(GenerationBatch)
        .where(
            GenerationBatch.status == BatchStatus.pending,
            GenerationBatch.job_id.in_(running_jobs),
            GenerationBatch.id.not_in([batch_id for batch_id, _ in released] or [uuid.uuid4()]),
            or_(
                GenerationBatch.retry_at <= now,
                and_(GenerationBatch.retry_at.is_(None), GenerationBatch.updated_at < unclaimed),
            ),
        )
        .values(retry_at=None, updated_at=now)
        .returning(GenerationBatch.id, GenerationBatch.job_id)
        .execution_options(synchronize_session=False)
    ).all()
    owners = {job_id for _, job_id in (*released, *abandoned)}
    running = set(
        session.scalars(select(Job.id).where(Job.id.in_(owners), Job.status == JobStatus.running))
        if owners
        else ()
    )
    for batch_id, _ in due:
        tasks.enqueue(session, tasks.BATCH_GENERATE, str(batch_id))
    for iteration_id, job_id in abandoned:
        if job_id in running:
            tasks.enqueue(session, tasks.ITERATION_EVALUATE, str(iteration_id))
    if released or abandoned or due:
        log.warning(
            "reconcile.released",
            batches=len(released),
            evaluations=len(abandoned),
            due_batches=len(due),
        )
    # A job with a live lease is making progress; one without, quiet for stuck_after_s, lost
    # the message of its next step.
    live = now - timedelta(seconds=worker.lease_s)
    leased = (
        select(GenerationBatch.job_id)
        .where(GenerationBatch.status == BatchStatus.running, GenerationBatch.updated_at >= live)
        .union(
            select(Iteration.job_id).where(
                Iteration.status == IterationStatus.evaluating, Iteration.updated_at >= live
            )
        )
    )
    deadline = now - timedelta(seconds=worker.stuck_after_s)
    stuck = session.scalars(
        select(Job).where(
            Job.status.in_([JobStatus.running, JobStatus.queued]),
            func.coalesce(Job.heartbeat_at, Job.updated_at) < deadline,
            Job.id.not_in(leased),
        )
    ).all()
    for job in stuck:
        if job.status is JobStatus.queued:
            job.heartbeat_at = now
            tasks.enqueue(session, tasks.JOB_START, str(job.id))
        else:
            advance(session, job)
    return len(stuck)
