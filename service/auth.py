"""API keys: shown once, stored only as a SHA-256 hash; every row belongs to a tenant.

A key is either a tenant key (everything the tenant may do) or a job-scoped key: it reads one
job and refreshes it — what a CI secret should be — and nothing else. Deny by default: a
job-scoped key may call only the operations in `JOB_KEY_OPERATIONS`; another job's ids answer
404 (as if they did not exist), any other operation 403. Keys may expire and be revoked.
"""

from __future__ import annotations

import hashlib
import secrets
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.errors import Forbidden, NotFound, Unauthorized, ValidationFailed
from service.models import ApiKey, Export, Job, Tenant, utcnow

KEY_PREFIX = "dst_"

# (method, route path) a job-scoped key may call, for its own job only. Everything else a
# tenant key can do (create jobs, teachers, datasets, webhooks, keys; pause, cancel, delete)
# is refused with 403. tests/integration/test_api_keys.py checks every entry is a real route.
JOB_KEY_OPERATIONS: frozenset[tuple[str, str]] = frozenset(
    {
        ("GET", "/v1/jobs/{job_id}"),
        ("GET", "/v1/jobs/{job_id}/iterations"),
        ("GET", "/v1/jobs/{job_id}/iterations/{number}"),
        ("GET", "/v1/jobs/{job_id}/examples"),
        ("GET", "/v1/jobs/{job_id}/evaluation-rows"),
        ("POST", "/v1/jobs/{job_id}/iterations/{number}/feedback"),
        ("POST", "/v1/jobs/{job_id}/refresh"),
        ("GET", "/v1/jobs/{job_id}/refreshes"),
        ("GET", "/v1/jobs/{job_id}/refreshes/{refresh_id}"),
        ("GET", "/v1/jobs/{job_id}/export"),  # the streamed export
        ("POST", "/v1/jobs/{job_id}/exports"),
        ("GET", "/v1/jobs/{job_id}/exports"),
        ("GET", "/v1/exports/{export_id}"),
        ("GET", "/v1/exports/{export_id}/download"),
    }
)


@dataclass(frozen=True)
class Principal:
    tenant_id: uuid.UUID
    api_key_id: uuid.UUID
    job_id: uuid.UUID | None = None  # a job-scoped key: this job only


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


def _aware(moment: datetime) -> datetime:
    # SQLite hands timezone-aware columns back naive; they were stored in UTC.
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def create_api_key(
    session: Session,
    tenant: Tenant,
    name: str = "default",
    *,
    job_id: uuid.UUID | None = None,
    expires_at: datetime | None = None,
) -> tuple[ApiKey, str]:
    """Returns the stored row and the plain key, which is never stored or shown again.

    `job_id` makes a job-scoped key (the job must be the tenant's); `expires_at` an expiring one.
    """
    if job_id is not None:
        job = session.get(Job, job_id)
        if job is None or job.tenant_id != tenant.id:
            raise ValidationFailed(
                "job_id: job not found",
                details=[{"field": "job_id", "message": f"no job {job_id} in this tenant"}],
            )
    if expires_at is not None and _aware(expires_at) <= utcnow():
        raise ValidationFailed(
            "expires_at: must be in the future",
            details=[{"field": "expires_at", "message": _aware(expires_at).isoformat()}],
        )
    plain = KEY_PREFIX + secrets.token_urlsafe(32)
    row = ApiKey(
        tenant_id=tenant.id,
        name=name,
        prefix=plain[:10],
        key_hash=hash_key(plain),
        job_id=job_id,
        expires_at=expires_at,
    )
    session.add(row)
    session.flush()
    return row, plain


def list_api_keys(session: Session, tenant_id: uuid.UUID) -> list[ApiKey]:
    return list(
        session.scalars(
            select(ApiKey)
            .where(ApiKey.tenant_id == tenant_id)
            .order_by(ApiKey.created_at.desc(), ApiKey.id)
        )
    )


def revoke_api_key(session: Session, tenant_id: uuid.UUID, key_id: uuid.UUID) -> ApiKey:
    """Revoke a key of the tenant (from the next request on); revoking twice is a no-op."""
    row = session.get(ApiKey, key_id)
    if row is None or row.tenant_id != tenant_id:
        raise NotFound(f"API key {key_id} not found")
    if row.revoked_at is None:
        row.revoked_at = utcnow()
        session.flush()
    return row


def authenticate(session: Session, authorization: str | None) -> Principal:
    if not authorization:
        raise Unauthorized("missing Authorization header (expected 'Bearer <api key>')")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("malformed Authorization header (expected 'Bearer <api key>')")
    row = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(token.strip())))
    if row is None:
        raise Unauthorized("invalid API key")
    return _principal_of(row)


def _principal_of(row: ApiKey) -> Principal:
    # Whoever holds the key learns why it stopped working; nobody else can tell keys apart.
    if row.revoked_at is not None:
        raise Unauthorized(f"API key {row.prefix}… was revoked", code="key_revoked")
    if row.expires_at is not None and _aware(row.expires_at) <= utcnow():
        raise Unauthorized(
            f"API key {row.prefix}… expired at {_aware(row.expires_at).isoformat()}",
            code="key_expired",
        )
    return Principal(tenant_id=row.tenant_id, api_key_id=row.id, job_id=row.job_id)


def _is(value: str, expected: uuid.UUID) -> bool:
    try:
        return uuid.UUID(str(value)) == expected
    except ValueError:
        return False


def check_key_scope(
    session: Session,
    principal: Principal,
    method: str,
    route_path: str | None,
    path_params: Mapping[str, str],
) -> None:
    """A job-scoped key outside its job: 404 for another job's ids, 403 for anything else."""
    if principal.job_id is None:
        return
    job_param = path_params.get("job_id")
    if job_param is not None and not _is(job_param, principal.job_id):
        raise NotFound(f"job {job_param} not found")
    export_param = path_params.get("export_id")
    if export_param is not None:
        try:
            export = session.get(Export, uuid.UUID(export_param))
        except ValueError:
            export = None
        if export is None or export.job_id != principal.job_id:
            raise NotFound(f"export {export_param} not found")
    if (method.upper(), route_path or "") not in JOB_KEY_OPERATIONS:
        raise Forbidden(
            f"this API key is limited to reading and refreshing job {principal.job_id}",
            details=[{"field": "Authorization", "message": "job-scoped key"}],
        )


def touch_key(session: Session, principal: Principal) -> None:
    key = session.get(ApiKey, principal.api_key_id)
    if key is not None:
        key.last_used_at = utcnow()


def principal_for_key(session: Session, api_key_id: uuid.UUID, tenant_id: uuid.UUID) -> Principal:
    """The principal of a key already checked once (a dashboard session): still there, of the
    same tenant, neither revoked nor expired, else Unauthorized. Revoking a key ends its
    sessions."""
    row = session.get(ApiKey, api_key_id)
    if row is None or row.tenant_id != tenant_id:
        raise Unauthorized("the API key of this session was deleted")
    return _principal_of(row)
