"""Webhook subscriptions (per tenant or per job) and their delivery log."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Query, Response, status
from sqlalchemy import select

from service.api.deps import PrincipalDep, SessionDep, SettingsDep
from service.api.routing import DocumentedRoute
from service.api.schemas import (
    CursorQuery,
    WebhookCreate,
    WebhookCreated,
    WebhookDeliveryRead,
    WebhookRead,
)
from service.domain.statuses import DeliveryStatus
from service.models import WebhookDelivery
from service.pagination import Page, paginate
from service.webhooks import create_subscription, get_subscription, list_subscriptions

router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"], route_class=DocumentedRoute)


@router.post(
    "",
    summary="Subscribe to webhook events",
    status_code=status.HTTP_201_CREATED,
    response_model=WebhookCreated,
)
def create(
    body: WebhookCreate, session: SessionDep, principal: PrincipalDep, settings: SettingsDep
) -> WebhookCreated:
    """Subscribe a URL to events of the tenant (or of one job). The signing secret is returned
    this once; deliveries carry X-Distill-Signature (docs/ci.md has the verification recipe)."""
    subscription, secret = create_subscription(
        session,
        principal.tenant_id,
        url=body.url,
        events=body.events,
        job_id=body.job_id,
        secret=body.secret,
        description=body.description,
        allow_private=settings.api.allow_private_webhook_urls,
    )
    session.commit()
    read = WebhookRead.model_validate(subscription)
    return WebhookCreated.model_validate({**read.model_dump(), "secret": secret})


@router.get("", summary="List webhook subscriptions", response_model=list[WebhookRead])
def list_webhooks(session: SessionDep, principal: PrincipalDep) -> list[WebhookRead]:
    return [WebhookRead.model_validate(s) for s in list_subscriptions(session, principal.tenant_id)]


@router.get("/{webhook_id}", summary="Read a webhook subscription", response_model=WebhookRead)
def read(webhook_id: uuid.UUID, session: SessionDep, principal: PrincipalDep) -> WebhookRead:
    return WebhookRead.model_validate(get_subscription(session, principal.tenant_id, webhook_id))


@router.delete(
    "/{webhook_id}",
    summary="Delete a webhook subscription",
    status_code=status.HTTP_204_NO_CONTENT,
)
def delete(webhook_id: uuid.UUID, session: SessionDep, principal: PrincipalDep) -> Response:
    """Stops the subscription; its delivery log goes with it."""
    session.delete(get_subscription(session, principal.tenant_id, webhook_id))
    session.commit()
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get(
    "/{webhook_id}/deliveries",
    summary="List a webhook's deliveries",
    response_model=Page[WebhookDeliveryRead],
)
def list_deliveries(
    webhook_id: uuid.UUID,
    session: SessionDep,
    principal: PrincipalDep,
    status_: Annotated[DeliveryStatus | None, Query(alias="status")] = None,
    cursor: CursorQuery = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> Page[WebhookDeliveryRead]:
    """The delivery log, newest first: each event with its attempts, the receiver's last
    status code or error, and when the next attempt is due."""
    subscription = get_subscription(session, principal.tenant_id, webhook_id)
    stmt = select(WebhookDelivery).where(WebhookDelivery.subscription_id == subscription.id)
    if status_ is not None:
        stmt = stmt.where(WebhookDelivery.status == status_)
    rows, next_cursor = paginate(
        session,
        stmt,
        created_col=WebhookDelivery.created_at,
        id_col=WebhookDelivery.id,
        cursor=cursor,
        limit=limit,
    )
    items = []
    for row in rows:
        read = WebhookDeliveryRead.model_validate(row)
        if row.status is not DeliveryStatus.pending:
            read.next_attempt_at = None
        items.append(read)
    return Page[WebhookDeliveryRead](items=items, next_cursor=next_cursor)
