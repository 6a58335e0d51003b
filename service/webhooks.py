"""Webhooks: signed event deliveries, stored as rows and retried with backoff from the database.

Events are `iteration.completed`, `job.completed` and `job.failed`. An event becomes one
`WebhookDelivery` row per matching subscription (the tenant's, or one job's) inside the
transaction that made the change (an outbox): no event for a change that rolled back, none
lost for one that committed, none twice for a redelivered step (a natural key per event). The
periodic task `webhooks.deliver` (workers/steps/webhooks.py) POSTs the rows that are due and
schedules retries; nothing in the loop waits for a receiver.

Every request carries `X-Distill-Timestamp` (Unix seconds) and `X-Distill-Signature:
v1=<hex>`, the HMAC-SHA256 of `"<timestamp>.<body>"` under the subscription's secret; a
receiver recomputes it over the raw body and refuses a timestamp older than
`REPLAY_WINDOW_S` (docs/ci.md has the recipe in Python and shell). `X-Distill-Delivery` is the
delivery id, the same on every retry: receivers dedupe on it.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import uuid
from collections.abc import Sequence
from typing import Any

from sqlalchemy import event, inspect, or_, select
from sqlalchemy.orm import Session

from service.db import insert_ignore
from service.domain.statuses import DeliveryStatus, IterationStatus, JobStatus
from service.errors import NotFound, ValidationFailed
from service.models import (
    Iteration,
    Job,
    WebhookDelivery,
    WebhookSubscription,
    isoformat_utc,
    utcnow,
)
from service.secrets import encrypt_secret
from service.teachers import check_base_url

EVENTS = ("iteration.completed", "job.completed", "job.failed")
REPLAY_WINDOW_S = 300
SECRET_PREFIX = "whsec_"
WEBHOOK_PRIVATE_HINT = (
    "only an operator can allow such a webhook: set DISTILL_API__ALLOW_PRIVATE_WEBHOOK_URLS=true "
    "on the API"
)


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The X-Distill-Signature value for a body sent at `timestamp` (Unix seconds)."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"v1={mac.hexdigest()}"


# --- subscriptions ------------------------------------------------------------------------------


def create_subscription(
    session: Session,
    tenant_id: uuid.UUID,
    *,
    url: str,
    events: Sequence[str],
    job_id: uuid.UUID | None = None,
    secret: str | None = None,
    description: str | None = None,
    allow_private: bool,
) -> tuple[WebhookSubscription, str]:
    """Returns the subscription and its signing secret (generated unless given)."""
    unknown = sorted(set(events) - set(EVENTS))
    if unknown:
        raise ValidationFailed(
            f"events: unknown event {unknown[0]!r}",
            details=[{"field": "events", "message": f"one of {list(EVENTS)}; got {unknown}"}],
        )
    check_base_url(url, allow_private=allow_private, field="url", private_hint=WEBHOOK_PRIVATE_HINT)
    if job_id is not None:
        job = session.get(Job, job_id)
        if job is None or job.tenant_id != tenant_id:
            raise ValidationFailed(
                "job_id: job not found",
                details=[{"field": "job_id", "message": f"no job {job_id} in this tenant"}],
            )
    secret = secret or SECRET_PREFIX + secrets.token_urlsafe(32)
    subscription = WebhookSubscription(
        tenant_id=tenant_id,
        job_id=job_id,
        url=url,
        events=[e for e in EVENTS if e in events],
        description=description,
        secret_encrypted=encrypt_secret(secret),
        # As for teachers: deliveries are held to public addresses at connect time as well.
        allow_private_network=allow_private,
    )
    session.add(subscription)
    session.flush()
    return subscription, secret


def get_subscription(
    session: Session, tenant_id: uuid.UUID, subscription_id: uuid.UUID
) -> WebhookSubscription:
    subscription = session.get(WebhookSubscription, subscription_id)
    if subscription is None or subscription.tenant_id != tenant_id:
        raise NotFound(f"webhook {subscription_id} not found")
    return subscription


def list_subscriptions(session: Session, tenant_id: uuid.UUID) -> list[WebhookSubscription]:
    return list(
        session.scalars(
            select(WebhookSubscription)
            .where(WebhookSubscription.tenant_id == tenant_id)
            .order_by(WebhookSubscription.created_at.desc(), WebhookSubscription.id)
        )
    )


# --- events -------------------------------------------------------------------------------------


def _job_data(session: Session, job: Job, current: Iteration | None = None) -> dict[str, Any]:
    best_metric = None
    if current is not None and job.best_iteration == current.number:
        best_metric = current.metric  # not flushed yet when this runs before a flush
    elif job.best_iteration is not None:
        best_metric = session.scalar(
            select(Iteration.metric).where(
                Iteration.job_id == job.id, Iteration.number == job.best_iteration
            )
        )
    return {
        "id": str(job.id),
        "name": job.name,
        "strategy": job.strategy,
        "status": job.status.value,
        "status_reason": job.status_reason,
        "current_iteration": job.current_iteration,
        "best_iteration": job.best_iteration,
        "best_metric": best_metric,
        "examples_accepted": job.examples_accepted,
        "tokens": job.tokens_in + job.tokens_out,
        "cost_usd": job.cost_usd,
        "finished_at": isoformat_utc(job.finished_at) if job.finished_at else None,
    }


def record_event(
    session: Session,
    job: Job,
    event_type: str,
    key: str,
    data: dict[str, Any],
) -> None:
    """One pending delivery per subscription that wants this event (none twice for one key)."""
    subscriptions = session.scalars(
        select(WebhookSubscription).where(
            WebhookSubscription.tenant_id == job.tenant_id,
            or_(WebhookSubscription.job_id.is_(None), WebhookSubscription.job_id == job.id),
        )
    ).all()
    now = utcnow()
    rows = []
    for subscription in subscriptions:
        if event_type not in subscription.events:
            continue
        delivery_id = uuid.uuid4()
        rows.append(
            {
                "id": delivery_id,
                "subscription_id": subscription.id,
                "job_id": job.id,
                "event": event_type,
                "event_key": key,
                "payload": {
                    "id": str(delivery_id),
                    "type": event_type,
                    "created_at": isoformat_utc(now),
                    "data": data,
                },
                "status": DeliveryStatus.pending.value,
                "attempts": 0,
                "next_attempt_at": now,
                "created_at": now,
                "updated_at": now,
            }
        )
    insert_ignore(session, WebhookDelivery, rows, ["subscription_id", "event_key"])


def record_job_event(session: Session, job: Job) -> None:
    """job.completed / job.failed for a job that just reached that status (service/jobs.py)."""
    event_type = {JobStatus.succeeded: "job.completed", JobStatus.failed: "job.failed"}.get(
        job.status
    )
    if event_type is None:
        return
    # A refreshed job completes again: the finishing time tells the two events apart.
    finished = job.finished_at.isoformat() if job.finished_at else ""
    record_event(
        session,
        job,
        event_type,
        f"{event_type}:{job.id}:{finished}",
        {"job": _job_data(session, job)},
    )


def _iteration_data(iteration: Iteration) -> dict[str, Any]:
    return {
        "number": iteration.number,
        "status": IterationStatus.completed.value,
        "metric": iteration.metric,
        "regressed": iteration.regressed,
        "included": iteration.included,
        "targets": iteration.targets_count,
        "examples_accepted": iteration.examples_accepted,
        "examples_rejected": iteration.examples_rejected,
        "tokens": (iteration.tokens_in or 0) + (iteration.tokens_out or 0),
        "cost_usd": iteration.cost_usd,
        "note": iteration.note,
        "refresh_id": str(iteration.refresh_id) if iteration.refresh_id else None,
    }


@event.listens_for(Session, "before_flush")
def _iteration_completed(session: Session, _context: Any, _instances: Any) -> None:
    """iteration.completed, wherever a step marks an iteration completed: the status change
    and its deliveries are written by the same flush, so they commit or roll back together."""
    completed = []
    for obj in session.dirty:
        if not isinstance(obj, Iteration):
            continue
        history = inspect(obj).attrs.status.history
        if IterationStatus.completed in (history.added or ()) and IterationStatus.completed not in (
            history.deleted or ()
        ):
            completed.append(obj)
    if not completed:
        return
    with session.no_autoflush:
        for iteration in completed:
            job = session.get(Job, iteration.job_id)
            if job is None:
                continue
            record_event(
                session,
                job,
                "iteration.completed",
                f"iteration.completed:{iteration.id}",
                {
                    "job": _job_data(session, job, iteration),
                    "iteration": _iteration_data(iteration),
                },
            )
