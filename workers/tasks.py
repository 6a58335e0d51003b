# Celery's task decorator is untyped; the task bodies are typed all the same.
# mypy: disable-error-code="untyped-decorator"
"""Celery tasks: thin wrappers, ids in, one step each; names are the stable strings in
`service.tasks`."""

from __future__ import annotations

from typing import Any

from service import tasks as names
from service.settings import get_settings
from workers.celery_app import celery_app
from workers.runtime import run_step
from workers.steps.evaluate import StudentUnavailable, evaluate_iteration, finish_phase
from workers.steps.export import write_export
from workers.steps.generate import generate_batch
from workers.steps.job import reconcile, start_job
from workers.steps.webhooks import deliver_due

_COMMON: dict[str, Any] = {"acks_late": True, "reject_on_worker_lost": True}


@celery_app.task(name=names.JOB_START, **_COMMON)
def job_start(job_id: str) -> None:
    run_step(start_job, job_id, with_ports=False)


@celery_app.task(name=names.BATCH_GENERATE, **_COMMON)
def batch_generate(batch_id: str) -> None:
    # No Celery retries: a batch whose teacher calls failed transiently is put back with its
    # retry time in its row and re-sent (by this step with a countdown, or by the reconcile if
    # that message is lost), until the teacher retry deadline fails it. An infrastructure
    # error (Postgres, Redis) ends the task; the batch's lease lapses and it is taken over.
    run_step(generate_batch, batch_id)


@celery_app.task(name=names.PHASE_FINISH, **_COMMON)
def phase_finish(iteration_id: str, phase: str) -> None:
    run_step(finish_phase, iteration_id, phase)


@celery_app.task(
    name=names.ITERATION_EVALUATE,
    autoretry_for=(StudentUnavailable,),  # an unreachable student endpoint: back off, retry
    retry_backoff=2,
    retry_backoff_max=300,
    retry_jitter=True,
    max_retries=None,
    **_COMMON,
)
def iteration_evaluate(iteration_id: str) -> None:
    run_step(evaluate_iteration, iteration_id)


@celery_app.task(name=names.JOB_RECONCILE, **_COMMON)
def job_reconcile() -> None:
    run_step(reconcile, get_settings().worker, with_ports=False)


@celery_app.task(name=names.EXPORT_WRITE, **_COMMON)
def export_write(export_id: str) -> None:
    run_step(write_export, export_id, with_ports=False)


@celery_app.task(name=names.WEBHOOKS_DELIVER, **_COMMON)
def webhooks_deliver() -> None:
    run_step(deliver_due, with_ports=False)
