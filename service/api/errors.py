"""Exception handlers: every error leaves the API in the one JSON shape."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import iter_route_contexts
from sqlalchemy.exc import DataError, IntegrityError
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.errors import DistillError

logger = logging.getLogger(__name__)


def _body(code: str, message: str, details: Any = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "details": details}}


def _field(loc: tuple[Any, ...] | list[Any]) -> str:
    return ".".join(str(p) for p in loc if p != "body")


def _detail(err: dict[str, Any]) -> dict[str, str]:
    if err.get("type") == "json_invalid":
        # FastAPI reports a body it cannot parse at ("body", <character position>).
        loc = list(err.get("loc") or ())
        position = loc[1] if len(loc) > 1 else None
        reason = (err.get("ctx") or {}).get("error")
        message = "the body is not valid JSON"
        if reason:
            message += f": {reason}"
        if isinstance(position, int):
            message += f" (at character {position})"
        return {"field": "body", "message": message}
    return {"field": _field(err["loc"]), "message": err["msg"]}


def allowed_methods(request: Request) -> list[str]:
    """Every method some route at the request's path answers: Starlette's 405 names only the
    first matching route's, and GET and POST of one path are two routes here."""
    path = request.scope["path"]
    root = request.scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :]
    methods: set[str] = set()
    for route in iter_route_contexts(request.app.routes):
        regex = getattr(route, "path_regex", None)
        if route.methods and regex is not None and regex.match(path):
            methods |= route.methods
    return sorted(methods)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(DistillError)
    async def _distill(_: Request, exc: DistillError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status_code == 401 else None
        return JSONResponse(exc.to_body(), status_code=exc.status_code, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        details = [_detail(err) for err in exc.errors()]
        first = details[0] if details else {"field": "", "message": "invalid request"}
        message = f"{first['field']}: {first['message']}" if first["field"] else first["message"]
        return JSONResponse(_body("validation_failed", message, details), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        headers = exc.headers
        if exc.status_code == 405:
            headers = {**(headers or {}), "Allow": ", ".join(allowed_methods(request))}
        return JSONResponse(
            _body(code, str(exc.detail)), status_code=exc.status_code, headers=headers
        )

    # A safety net, not the validation: the request models hold values to their columns, so
    # reaching these is a missing check. The session dependency has rolled back by now
    # (service/api/deps.py), so nothing of the request is written.
    @app.exception_handler(DataError)
    async def _data(request: Request, exc: DataError) -> JSONResponse:
        logger.error(
            "database refused a value: %s %s", request.method, request.url.path, exc_info=exc
        )
        message = (
            "a value in the request does not fit what can be stored (too long, out of range, "
            "or containing a character such as NUL that cannot be stored)"
        )
        return JSONResponse(
            _body("invalid_value", message, [{"field": "request", "message": message}]),
            status_code=422,
        )

    @app.exception_handler(IntegrityError)
    async def _integrity(request: Request, exc: IntegrityError) -> JSONResponse:
        logger.error(
            "database constraint violated: %s %s", request.method, request.url.path, exc_info=exc
        )
        message = "the request conflicts with existing data (e.g. a name already in use)"
        return JSONResponse(
            _body("conflict", message, [{"field": "request", "message": message}]),
            status_code=409,
        )
