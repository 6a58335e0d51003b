"""Webhook delivery: POST the deliveries that are due, signed; retry failures with backoff.

The schedule lives in the rows (`next_attempt_at`), not in the broker: a periodic task claims
what is due, sends it, and writes the outcome and the next attempt. A claim pushes
`next_attempt_at` past the time a send can take, so two runs never send the same row at once,
and a run that dies mid-send leaves rows that are simply due again later (at least once:
receivers dedupe on X-Distill-Delivery).

Receivers are held to the same address rules as teachers (workers/teacher/network.py): a
tenant's webhook resolves only to public addresses at connect time, and redirects are not
followed.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass
from datetime import datetime, timedelta

import aiohttp
import structlog
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from service.domain.statuses import DeliveryStatus
from service.models import WebhookDelivery, WebhookSubscription, utcnow
from service.secrets import decrypt_secret
from service.settings import Settings, get_settings
from service.webhooks import sign
from workers.teacher.network import (
    PublicOnlyResolver,
    literal_private_host,
    private_address_error,
)

log = structlog.get_logger()

BATCH = 50
USER_AGENT = "distill-webhooks/1"


@dataclass
class Attempt:
    ok: bool
    status: int | None = None
    error: str | None = None
    retry_after_s: float | None = None
    permanent: bool = False  # a private address: no retry will reach it


def backoff_s(settings: Settings, attempts: int) -> float:
    """Delay before attempt `attempts + 1`: doubling from retry_base_s, capped, with jitter."""
    hooks = settings.webhooks
    delay = min(hooks.retry_base_s * 2 ** max(attempts - 1, 0), hooks.retry_max_s)
    return float(delay * random.uniform(0.8, 1.2))


def _retry_after(value: str | None) -> float | None:
    try:
        return max(float(value), 0.0) if value else None
    except ValueError:
        return None  # an HTTP date: the backoff applies


async def _post(
    http: aiohttp.ClientSession,
    url: str,
    body: bytes,
    headers: dict[str, str],
    *,
    public_only: bool,
) -> Attempt:
    # An IP literal never reaches a resolver, so the public-only rule is checked here too.
    host = literal_private_host(url) if public_only else None
    if host is not None:
        return Attempt(ok=False, error=f"{host} is a private address: refused", permanent=True)
    try:
        async with http.post(url, data=body, headers=headers, allow_redirects=False) as resp:
            if 200 <= resp.status < 300:
                return Attempt(ok=True, status=resp.status)
            text = (await resp.text(errors="replace"))[:200]
            return Attempt(
                ok=False,
                status=resp.status,
                error=f"HTTP {resp.status}" + (f": {text}" if text else ""),
                retry_after_s=_retry_after(resp.headers.get("Retry-After")),
            )
    except Exception as exc:  # connection refused, timeout, TLS, DNS: all mean "try later"
        private = private_address_error(exc)
        if private is not None:
            return Attempt(ok=False, error=str(private), permanent=True)
        return Attempt(ok=False, error=f"{type(exc).__name__}: {exc}"[:500])


async def _send_all(
    jobs: list[tuple[WebhookDelivery, WebhookSubscription]], timeout_s: float
) -> list[Attempt]:
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    public = aiohttp.ClientSession(
        timeout=timeout, connector=aiohttp.TCPConnector(resolver=PublicOnlyResolver())
    )
    private = aiohttp.ClientSession(timeout=timeout)
    try:

        async def one(delivery: WebhookDelivery, subscription: WebhookSubscription) -> Attempt:
            body = json.dumps(delivery.payload, separators=(",", ":")).encode()
            timestamp = int(time.time())  # the receiver's clock judges it: the real time
            try:
                secret = decrypt_secret(subscription.secret_encrypted)
            except RuntimeError as exc:
                return Attempt(ok=False, error=str(exc))
            headers = {
                "Content-Type": "application/json",
                "User-Agent": USER_AGENT,
                "X-Distill-Event": delivery.event,
                "X-Distill-Delivery": str(delivery.id),
                "X-Distill-Timestamp": str(timestamp),
                "X-Distill-Signature": sign(secret, timestamp, body),
            }
            allowed = subscription.allow_private_network
            return await _post(
                private if allowed else public,
                subscription.url,
                body,
                headers,
                public_only=not allowed,
            )

        return list(await asyncio.gather(*(one(d, s) for d, s in jobs)))
    finally:
        await public.close()
        await private.close()


def deliver_due(session: Session, now: datetime | None = None) -> int:
    """Send up to BATCH due deliveries; returns how many were attempted."""
    settings = get_settings()
    now = now or utcnow()
    ids = list(
        session.scalars(
            select(WebhookDelivery.id)
            .where(
                WebhookDelivery.status == DeliveryStatus.pending,
                WebhookDelivery.next_attempt_at <= now,
            )
            .order_by(WebhookDelivery.next_attempt_at)
            .limit(BATCH)
            .with_for_update(skip_locked=True)
        )
    )
    if not ids:
        session.rollback()
        return 0
    lease = now + timedelta(seconds=settings.webhooks.timeout_s * 2 + 30)
    session.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.id.in_(ids))
        .values(next_attempt_at=lease, updated_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    session.commit()  # claimed: a concurrent run skips these until the lease ends
    rows = session.execute(
        select(WebhookDelivery, WebhookSubscription)
        .join(WebhookSubscription, WebhookSubscription.id == WebhookDelivery.subscription_id)
        .where(WebhookDelivery.id.in_(ids))
        .order_by(WebhookDelivery.next_attempt_at, WebhookDelivery.id)
        .execution_options(populate_existing=True)
    ).all()
    jobs = [(d, s) for d, s in rows]
    attempts = asyncio.run(_send_all(jobs, settings.webhooks.timeout_s))
    for (delivery, subscription), attempt in zip(jobs, attempts, strict=True):
        _record(settings, delivery, attempt, now)
        log.info(
            "webhook.delivered" if attempt.ok else "webhook.attempt_failed",
            delivery_id=str(delivery.id),
            subscription_id=str(subscription.id),
            event_type=delivery.event,
            attempts=delivery.attempts,
            status=attempt.status,
            next_attempt_at=delivery.next_attempt_at.isoformat()
            if delivery.status is DeliveryStatus.pending
            else None,
        )
    session.commit()
    return len(jobs)


def _record(settings: Settings, delivery: WebhookDelivery, attempt: Attempt, now: datetime) -> None:
    delivery.attempts += 1
    delivery.last_attempt_at = utcnow()
    delivery.response_status = attempt.status
    if attempt.ok:
        delivery.status = DeliveryStatus.succeeded
        delivery.delivered_at = utcnow()
        delivery.next_attempt_at = now
        delivery.last_error = None
        return
    delivery.last_error = attempt.error
    if attempt.permanent or delivery.attempts >= settings.webhooks.max_attempts:
        delivery.status = DeliveryStatus.failed
        delivery.next_attempt_at = now
        return
    delay = backoff_s(settings, delivery.attempts)
    if attempt.retry_after_s is not None:
        delay = min(max(delay, attempt.retry_after_s), settings.webhooks.retry_max_s)
    delivery.next_attempt_at = now + timedelta(seconds=delay)
