"""API keys of the caller's tenant: create (tenant-wide or scoped to one job), list, revoke."""

from __future__ import annotations

import uuid
from datetime import timedelta

from fastapi import APIRouter, status

from service.api.deps import PrincipalDep, SessionDep
from service.api.routing import DocumentedRoute
from service.api.schemas import ApiKeyCreate, ApiKeyCreated, ApiKeyRead
from service.auth import create_api_key, list_api_keys, revoke_api_key
from service.errors import ValidationFailed
from service.models import Tenant, utcnow

router = APIRouter(prefix="/v1/keys", tags=["keys"], route_class=DocumentedRoute)


@router.post(
    "",
    summary="Create an API key",
    status_code=status.HTTP_201_CREATED,
    response_model=ApiKeyCreated,
)
def create(body: ApiKeyCreate, session: SessionDep, principal: PrincipalDep) -> ApiKeyCreated:
    """A new key, shown once. With `job_id` it may only read and refresh that job (a CI
    secret); with `expires_at` or `expires_in_s` it stops working then."""
    if body.expires_at is not None and body.expires_in_s is not None:
        raise ValidationFailed(
            "give expires_at or expires_in_s, not both",
            details=[{"field": "expires_in_s", "message": "expires_at is given"}],
        )
    expires_at = body.expires_at
    if body.expires_in_s is not None:
        expires_at = utcnow() + timedelta(seconds=body.expires_in_s)
    tenant = session.get(Tenant, principal.tenant_id)
    assert tenant is not None
    row, plain = create_api_key(
        session, tenant, body.name, job_id=body.job_id, expires_at=expires_at
    )
    session.commit()
    return ApiKeyCreated.model_validate(
        {**ApiKeyRead.model_validate(row).model_dump(), "key": plain}
    )


@router.get("", summary="List API keys", response_model=list[ApiKeyRead])
def list_keys(session: SessionDep, principal: PrincipalDep) -> list[ApiKeyRead]:
    """The tenant's keys, newest first (the keys themselves are never shown again)."""
    return [ApiKeyRead.model_validate(k) for k in list_api_keys(session, principal.tenant_id)]


@router.post("/{key_id}/revoke", summary="Revoke an API key", response_model=ApiKeyRead)
def revoke(key_id: uuid.UUID, session: SessionDep, principal: PrincipalDep) -> ApiKeyRead:
    """The key is refused from the next request on; it stays listed with its revocation time."""
    row = revoke_api_key(session, principal.tenant_id, key_id)
    session.commit()
    return ApiKeyRead.model_validate(row)
