"""API keys: shown once, stored only as a SHA-256 hash; every row belongs to a tenant."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from uuid import UUID

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.errors import Unauthorized
from service.models import ApiKey, Tenant, utcnow

KEY_PREFIX = "dst_"


@dataclass(frozen=True)
class Principal:
    tenant_id: UUID
    api_key_id: UUID


def hash_key(key: str) -> str:
    # Keys are 256-bit random tokens, so a fast hash is enough (no password stretching needed).
    return hashlib.sha256(key.encode()).hexdigest()


def get_or_create_tenant(session: Session, name: str) -> Tenant:
    tenant = session.scalar(select(Tenant).where(Tenant.name == name))
    if tenant is None:
        tenant = Tenant(name=name)
        session.add(tenant)
        session.flush()
    return tenant


def create_api_key(session: Session, tenant: Tenant, name: str = "default") -> tuple[ApiKey, str]:
    """Returns the stored row and the plain key, which is never stored or shown again."""
    plain = KEY_PREFIX + secrets.token_urlsafe(32)
    row = ApiKey(tenant_id=tenant.id, name=name, prefix=plain[:10], key_hash=hash_key(plain))
    session.add(row)
    session.flush()
    return row, plain


def authenticate(session: Session, authorization: str | None) -> Principal:
    if not authorization:
        raise Unauthorized("missing Authorization header (expected 'Bearer <api key>')")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("malformed Authorization header (expected 'Bearer <api key>')")
    row = session.scalar(
        select(ApiKey).where(
            ApiKey.key_hash == hash_key(token.strip()), ApiKey.revoked_at.is_(None)
        )
    )
    if row is None:
        raise Unauthorized("invalid or revoked API key")
    return Principal(tenant_id=row.tenant_id, api_key_id=row.id)


def touch_key(session: Session, principal: Principal) -> None:
    key = session.get(ApiKey, principal.api_key_id)
    if key is not None:
        key.last_used_at = utcnow()


def principal_for_key(session: Session, api_key_id: UUID, tenant_id: UUID) -> Principal:
    """The principal of a key already checked once (a dashboard session): still there, not
    revoked and of the same tenant, else Unauthorized. Revoking a key ends its sessions."""
    row = session.get(ApiKey, api_key_id)
    if row is None or row.revoked_at is not None or row.tenant_id != tenant_id:
        raise Unauthorized("the API key of this session was revoked or deleted")
    return Principal(tenant_id=row.tenant_id, api_key_id=row.id)
