"""The webhook retry schedule: doubling with jitter, capped, honouring Retry-After."""

from __future__ import annotations

import uuid
from datetime import timedelta

from service.domain.statuses import DeliveryStatus
from service.models import WebhookDelivery, utcnow
from service.settings import Settings, WebhookSettings
from workers.steps.webhooks import Attempt, _record, backoff_s

SETTINGS = Settings(webhooks=WebhookSettings(retry_base_s=10, retry_max_s=3600, max_attempts=5))


def _delivery(attempts: int = 0) -> WebhookDelivery:
    return WebhookDelivery(
        id=uuid.uuid4(),
        subscription_id=uuid.uuid4(),
        event="job.completed",
        event_key="k",
        payload={},
        status=DeliveryStatus.pending,
        attempts=attempts,
        next_attempt_at=utcnow(),
    )


def test_backoff_doubles_with_jitter_up_to_the_cap() -> None:
    for attempts, nominal in (
        (1, 10),
        (2, 20),
        (3, 40),
        (8, 1280),
        (9, 2560),
        (10, 3600),
        (30, 3600),
    ):
        for _ in range(20):
            assert 0.8 * nominal <= backoff_s(SETTINGS, attempts) <= 1.2 * nominal


def test_a_failed_attempt_is_scheduled_and_the_last_one_gives_up() -> None:
    now = utcnow()
    delivery = _delivery()
    _record(SETTINGS, delivery, Attempt(ok=False, status=503, error="HTTP 503"), now)
    assert delivery.status is DeliveryStatus.pending and delivery.attempts == 1
    assert now + timedelta(seconds=8) <= delivery.next_attempt_at <= now + timedelta(seconds=12)

    polite = _delivery()
    _record(SETTINGS, polite, Attempt(ok=False, status=429, retry_after_s=120), now)
    assert polite.next_attempt_at >= now + timedelta(seconds=120)

    last = _delivery(attempts=4)
    _record(SETTINGS, last, Attempt(ok=False, error="ConnectionRefusedError"), now)
    assert last.status is DeliveryStatus.failed and last.attempts == 5

    refused = _delivery()
    _record(SETTINGS, refused, Attempt(ok=False, error="private", permanent=True), now)
    assert refused.status is DeliveryStatus.failed and refused.attempts == 1

    ok = _delivery(attempts=2)
    _record(SETTINGS, ok, Attempt(ok=True, status=200), now)
    assert ok.status is DeliveryStatus.succeeded and ok.delivered_at is not None
