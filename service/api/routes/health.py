"""Liveness and readiness (database and broker reachable); no auth."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text

from service.api.routing import DocumentedRoute
from service.api.schemas import Health

router = APIRouter(tags=["health"], route_class=DocumentedRoute)


@router.get("/healthz", summary="Check liveness", response_model=Health)
def healthz() -> Health:
    return Health(status="ok")


@router.get(
    "/readyz",
    summary="Check readiness (database and broker)",
    response_model=Health,
    responses={503: {"model": Health, "description": "The database or the broker is down."}},
)
def readyz(request: Request) -> JSONResponse:
    checks: dict[str, str] = {}
    try:
        with request.app.state.session_factory() as session:
            session.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:  # readiness reports any failure, whatever its type
        checks["database"] = f"error: {type(exc).__name__}"
    broker_url = request.app.state.settings.broker.url
    if broker_url:
        import redis

        try:
            client = redis.Redis.from_url(broker_url, socket_timeout=2, socket_connect_timeout=2)
            try:
                client.ping()
            finally:
                client.close()
            checks["broker"] = "ok"
        except Exception as exc:  # same: any failure means not ready
            checks["broker"] = f"error: {type(exc).__name__}"
    else:
        checks["broker"] = "embedded"
    ok = all(v in ("ok", "embedded") for v in checks.values())
    body = Health(status="ok" if ok else "unavailable", checks=checks)
    return JSONResponse(body.model_dump(), status_code=200 if ok else 503)
