"""One error hierarchy, one JSON shape: `{"error": {"code", "message", "details"}}`.

DistillError
├── BadRequest (400)
│   └── ValidationFailed (422) — a field or a JSONL line is wrong; details name it
├── Unauthorized (401)
├── Forbidden (403) — a valid key that may not do this (a job-scoped key outside its job),
│                     or a dashboard form without the session's CSRF token
├── NotFound (404) — also another tenant's ids, which must not be distinguishable
├── Conflict (409) — e.g. a state transition that is not allowed
├── PayloadTooLarge (413)
└── UnsupportedMediaType (415) — a body whose Content-Type the operation does not accept

Domain code raises these; the API's exception handlers turn them into responses, the CLI
prints them. Nothing outside `service/api` raises HTTPException.
"""

from __future__ import annotations

from typing import Any


class DistillError(Exception):
    status_code = 500
    code = "internal_error"

    def __init__(self, message: str, *, details: Any = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details
        if code is not None:
            self.code = code

    def to_body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, "details": self.details}}


class BadRequest(DistillError):
    status_code = 400
    code = "bad_request"


class ValidationFailed(BadRequest):
    status_code = 422
    code = "validation_failed"


class Unauthorized(DistillError):
    status_code = 401
    code = "unauthorized"


class Forbidden(DistillError):
    status_code = 403
    code = "forbidden"


class NotFound(DistillError):
    status_code = 404
    code = "not_found"


class Conflict(DistillError):
    status_code = 409
    code = "conflict"


class PayloadTooLarge(DistillError):
    status_code = 413
    code = "payload_too_large"


class UnsupportedMediaType(DistillError):
    status_code = 415
    code = "unsupported_media_type"
