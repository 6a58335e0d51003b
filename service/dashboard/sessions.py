"""Dashboard sign-in: an API key is exchanged for a signed session cookie with a CSRF token.

The cookie holds the API key's id, its tenant and a random CSRF token, signed (not encrypted:
it holds nothing secret) with DISTILL_SECRET_KEY by itsdangerous, and carries its issue time,
so it expires after `api.session_max_age_s`. Every request looks the key up again, so revoking
the key ends its sessions at once. The cookie is HttpOnly, SameSite=Lax and Secure when the
request came over https; it authenticates the dashboard only — the REST API under /v1 takes
bearer keys alone, so a browser's cookie can never make a cross-site API call.

Each state-changing form carries the session's CSRF token (checked in constant time); the
sign-in form, which has no session yet, uses a double-submit token in a short-lived cookie.
"""

from __future__ import annotations

import hmac
import secrets
import uuid
from dataclasses import dataclass
from typing import Any

from fastapi import Request, Response
from itsdangerous import BadSignature, URLSafeTimedSerializer
from sqlalchemy.orm import Session

from service.auth import Principal, principal_for_key
from service.errors import Forbidden, Unauthorized
from service.settings import Settings

SESSION_COOKIE = "distill_session"
SIGN_IN_COOKIE = "distill_sign_in"
SIGN_IN_MAX_AGE_S = 3600
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "x-csrf-token"
_SALT = "distill.dashboard.session"


# Why a page sent the user to sign in; the sign-in page shows only these fixed sentences (a
# link cannot make it say anything else).
SIGN_IN_REASONS = {
    "required": "Sign in to see this page.",
    "expired": "Your session expired or is not valid: sign in again.",
    "revoked": "The API key of your session was revoked or deleted: sign in with another key.",
}


class SignInRequired(Exception):
    """No valid session: the dashboard answers with a redirect to the sign-in page."""

    def __init__(self, reason: str) -> None:
        super().__init__(SIGN_IN_REASONS[reason])
        self.reason = reason  # a key of SIGN_IN_REASONS


@dataclass(frozen=True)
class DashboardSession:
    principal: Principal
    csrf_token: str


def _serializer(settings: Settings) -> URLSafeTimedSerializer:
    return URLSafeTimedSerializer(settings.secret_key, salt=_SALT)


def _secure(request: Request) -> bool:
    return request.url.scheme == "https"


def start_session(
    response: Response, request: Request, settings: Settings, principal: Principal
) -> None:
    payload = {
        "k": str(principal.api_key_id),
        "t": str(principal.tenant_id),
        "c": secrets.token_urlsafe(32),
    }
    response.set_cookie(
        SESSION_COOKIE,
        _serializer(settings).dumps(payload),
        max_age=settings.api.session_max_age_s,
        path="/",
        httponly=True,
        samesite="lax",
        secure=_secure(request),
    )
    response.delete_cookie(SIGN_IN_COOKIE, path="/sign-in", secure=_secure(request))


def end_session(response: Response, request: Request) -> None:
    response.delete_cookie(
        SESSION_COOKIE, path="/", httponly=True, samesite="lax", secure=_secure(request)
    )


def read_session(request: Request, db: Session, settings: Settings) -> DashboardSession:
    """The request's session, or SignInRequired (no cookie, a bad or expired signature, or a
    key that is revoked or gone)."""
    raw = request.cookies.get(SESSION_COOKIE)
    if not raw:
        raise SignInRequired("required")
    try:
        payload: Any = _serializer(settings).loads(raw, max_age=settings.api.session_max_age_s)
        key_id, tenant_id, csrf = uuid.UUID(payload["k"]), uuid.UUID(payload["t"]), payload["c"]
    except (BadSignature, KeyError, TypeError, ValueError) as exc:
        raise SignInRequired("expired") from exc
    if not isinstance(csrf, str) or not csrf:
        raise SignInRequired("expired")
    try:
        principal = principal_for_key(db, key_id, tenant_id)
    except Unauthorized as exc:
        raise SignInRequired("revoked") from exc
    return DashboardSession(principal=principal, csrf_token=csrf)


def check_csrf(session: DashboardSession, submitted: str | None) -> None:
    if not submitted or not hmac.compare_digest(submitted, session.csrf_token):
        raise Forbidden(
            "the form's CSRF token is missing or does not match this session; reload the page "
            "and try again",
            details=[{"field": CSRF_FIELD, "message": "missing or does not match"}],
            code="csrf_failed",
        )


def sign_in_token(request: Request) -> str:
    """The sign-in form's double-submit token: the one in its cookie, or a new one."""
    return request.cookies.get(SIGN_IN_COOKIE) or secrets.token_urlsafe(32)


def set_sign_in_cookie(response: Response, request: Request, token: str) -> None:
    response.set_cookie(
        SIGN_IN_COOKIE,
        token,
        max_age=SIGN_IN_MAX_AGE_S,
        path="/sign-in",
        httponly=True,
        samesite="strict",
        secure=_secure(request),
    )


def check_sign_in_token(request: Request, submitted: str | None) -> None:
    expected = request.cookies.get(SIGN_IN_COOKIE)
    if not expected:
        raise Forbidden(
            "the browser did not send the sign-in cookie: allow cookies for this site and "
            "load the sign-in page again",
            details=[{"field": CSRF_FIELD, "message": "no sign-in cookie"}],
            code="csrf_failed",
        )
    if not submitted or not hmac.compare_digest(submitted, expected):
        raise Forbidden(
            "the sign-in form is stale: load the sign-in page again",
            details=[{"field": CSRF_FIELD, "message": "does not match the sign-in cookie"}],
            code="csrf_failed",
        )
