"""What the OpenAPI document promises, held true for every route in one place.

Why one place: the document and the behaviour drifted apart route by route (issue 11: errors
answered but not documented, a 405 whose `Allow` missed methods, a non-JSON body refused as
"Input should be a valid dictionary"). `DocumentedRoute` derives the error responses a route
can give from what it declares (a key, path parameters, a body) and refuses a body in a media
type it does not declare, with the same list the document shows; a 405 names every method of the
path (errors.py); `operation_id` makes each operation's id from its summary.
`tests/integration/test_openapi*.py` check the document against the behaviour with
schemathesis.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import HTTPException
from fastapi.dependencies.models import Dependant
from fastapi.dependencies.utils import get_flat_params
from fastapi.routing import APIRoute
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import Response

from service.api.deps import get_principal
from service.api.schemas import ErrorBody
from service.errors import UnsupportedMediaType, ValidationFailed

JSON = "application/json"
NDJSON = "application/x-ndjson"

# What each error status means in this API (service/errors.py draws the hierarchy).
ERROR_DESCRIPTIONS: dict[int, str] = {
    400: "The request is malformed.",
    401: "No API key, or an unknown, expired or revoked one.",
    403: "A job-scoped API key outside what it may do.",
    404: "No such resource in the caller's tenant (another tenant's ids included).",
    409: "The request conflicts with the resource's state (e.g. a transition not allowed).",
    413: "The body is larger than the configured limit.",
    415: "The body's Content-Type is not one this operation accepts.",
    422: "A field, parameter or line is invalid; the details name it.",
}

# Models a route refers to from `openapi_extra` (a body it parses itself): their JSON Schemas
# go into the document's components, so that the reference resolves (issue 11: `$defs`).
_COMPONENT_MODELS: dict[str, type[BaseModel]] = {}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The `responses=` entries of these error statuses, in the one error shape."""
    return {code: {"model": ErrorBody, "description": ERROR_DESCRIPTIONS[code]} for code in codes}


def component_ref(model: type[BaseModel]) -> dict[str, str]:
    """A `$ref` to `model` in the document's components (added by `component_schemas`)."""
    _COMPONENT_MODELS[model.__name__] = model
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def component_schemas() -> dict[str, Any]:
    """The JSON Schemas of the models `component_ref` handed out, nested models included."""
    from pydantic.json_schema import models_json_schema

    if not _COMPONENT_MODELS:
        return {}
    _, schema = models_json_schema(
        [(model, "validation") for model in _COMPONENT_MODELS.values()],
        ref_template="#/components/schemas/{model}",
    )
    defs: dict[str, Any] = schema.get("$defs", {})
    return defs


_ARTICLES = {"a", "an", "the"}


def operation_id(route: APIRoute) -> str:
    """`create_teacher` from the summary "Create a teacher": ids as readable as the summaries
    and unique with them (a test checks both)."""
    summary = route.summary or route.name
    words = re.split(r"[^a-z0-9]+", summary.lower().replace("'", ""))
    return "_".join(w for w in words if w and w not in _ARTICLES)


def _needs_key(dependant: Dependant) -> bool:
    return dependant.call is get_principal or any(_needs_key(d) for d in dependant.dependencies)


def _media_type(value: str) -> str:
    return value.partition(";")[0].strip().lower()


def _has_body(request: Request) -> bool:
    length = request.headers.get("content-length")
    if length is not None:
        return length.strip() not in ("", "0")
    return "transfer-encoding" in request.headers


class DocumentedRoute(APIRoute):
    """An APIRoute whose document lists the errors it can answer and whose body must come in
    a media type the document declares (a 415 naming the expected types otherwise)."""

    def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
        super().__init__(path, endpoint, **kwargs)
        self.body_media_types = self._declared_media_types()
        derived: set[int] = set()
        if _needs_key(self.dependant):
            derived |= {401, 403}
        if self.param_convertors:  # a resource named in the path may not exist
            derived.add(404)
        if self.body_media_types:
            derived |= {415, 422}
        if get_flat_params(self.dependant):
            derived.add(422)
        # Declared ones win; FastAPI's own 422 schema (HTTPValidationError) is then not used,
        # which is right: the handlers answer every error in the one shape.
        self.responses = {**error_responses(*sorted(derived)), **self.responses}

    def _declared_media_types(self) -> tuple[str, ...]:
        extra = (self.openapi_extra or {}).get("requestBody", {}).get("content")
        if extra:
            return tuple(extra)
        if self.body_field is None:
            return ()
        return (JSON,)

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        expected = self._declared_media_types()  # runs inside APIRoute.__init__ too
        if not expected:
            return handler

        async def checked(request: Request) -> Response:
            if _has_body(request):
                given = request.headers.get("content-type")
                if given is None or _media_type(given) not in expected:
                    names = " or ".join(expected)
                    raise UnsupportedMediaType(
                        f"Content-Type must be {names}, not {given!r}"
                        if given
                        else f"the body has no Content-Type (expected {names})",
                        details=[{"field": "Content-Type", "message": f"expected {names}"}],
                    )
            try:
                return await handler(request)
            except (HTTPException, StarletteHTTPException) as exc:
                if exc.status_code != 400:
                    raise
                # FastAPI's "There was an error parsing the body" (JSON that is not UTF-8,
                # nested past the parser's depth) and Starlette's malformed multipart: a body
                # that cannot be read is a 422 naming it, as JSON that does not parse is.
                cause = exc.__cause__ or exc.__context__
                reason = f"{type(cause).__name__}: {cause}" if cause else str(exc.detail)
                raise ValidationFailed(
                    f"the body could not be read: {reason[:200]}",
                    details=[{"field": "body", "message": reason[:500]}],
                ) from exc

        return checked
