"""The FastAPI application factory: REST under /v1, health, and the error shape."""

from __future__ import annotations

import asyncio
import hmac

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from sqlalchemy.orm import Session, sessionmaker
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from service.api.docs import install_docs, install_openapi
from service.api.errors import install_error_handlers
from service.api.routes import (
    datasets,
    exports,
    health,
    jobs,
    keys,
    refreshes,
    teachers,
    webhooks,
)
from service.api.routing import operation_id
from service.dashboard import install_dashboard
from service.db import session_factory
from service.domain.spec import TeacherSpec
from service.settings import Settings, get_settings
from service.tasks import CeleryTaskSender, RecordingTaskSender, TaskSender


def _bearer_only(inner: ASGIApp, token: str) -> ASGIApp:
    """Wrap an ASGI app so that it answers only `Authorization: Bearer <token>`."""
    expected = f"Bearer {token}".encode()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            given = dict(scope.get("headers") or ()).get(b"authorization", b"")
            if not hmac.compare_digest(given, expected):
                response = JSONResponse(
                    {
                        "error": {
                            "code": "unauthorized",
                            "message": "/metrics needs Authorization: Bearer <metrics token>",
                            "details": None,
                        }
                    },
                    status_code=401,
                    headers={"WWW-Authenticate": "Bearer"},
                )
                await response(scope, receive, send)
                return
        await inner(scope, receive, send)

    return app


class _AsgiEndpoint:
    """An ASGI app as a route's endpoint: Starlette calls a plain function endpoint with a
    Request, and an object like this one with (scope, receive, send)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)


class InFlightLimit:
    """At most `limit` requests inside the app at once; the others wait here, in the event
    loop, holding nothing.

    Why: a sync route runs in several threadpool hops (dependencies, the route, the response
    validation) and its session holds a database connection from its first query to the end.
    With more requests in flight than connections, threads blocked waiting for a connection
    hold every threadpool token while the requests that hold connections wait for a token:
    nothing moves until the pool's 30 s timeout (issue 11 measured p99 16-19 s; 120 clients
    with no think time stalled for 60 s here). Admitting no more requests than there are
    connections makes that wait impossible.
    """

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit
        self._gate: asyncio.Semaphore | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self._gate is None:
            self._gate = asyncio.Semaphore(self.limit)
        async with self._gate:
            await self.app(scope, receive, send)


def create_app(
    settings: Settings | None = None,
    *,
    sessions: sessionmaker[Session] | None = None,
    task_sender: TaskSender | None = None,
    local_teacher: TeacherSpec | None = None,
) -> FastAPI:
    """Build the app. The composition root passes an in-process task sender in embedded mode,
    and the local teacher's spec (the local teacher's defaults are worker code) when the
    deployment runs one, for jobs that say `teacher: local`."""
    settings = settings or get_settings()
    if task_sender is None:
        task_sender = (
            CeleryTaskSender(
                settings.broker.url,
                key_prefix=settings.broker.key_prefix,
                visibility_timeout_s=settings.broker.visibility_timeout_s,
            )
            if settings.broker.url
            else RecordingTaskSender()
        )
    app = FastAPI(
        title="distill",
        version="0.1.0",
        description="Closed-loop distillation: a teacher LLM writes training data aimed at a "
        "student's own mistakes. Authenticate with `Authorization: Bearer <api key>`.",
        docs_url=None,  # served from local assets by install_docs
        redoc_url=None,
        generate_unique_id_function=operation_id,
    )
    app.state.settings = settings
    app.state.session_factory = sessions or session_factory()
    app.state.task_sender = task_sender
    app.state.local_teacher = local_teacher
    install_error_handlers(app)
    # Prometheus metrics of this process (in embedded mode that includes the teacher calls the
    # steps make here; workers serve theirs with `distill worker --metrics-port`).
    from prometheus_client import make_asgi_app

    metrics_app = make_asgi_app()
    token = settings.api.metrics_token
    guarded = metrics_app if token is None else _bearer_only(metrics_app, token.get_secret_value())
    # Routes, not a mount: a mount answers /metrics with a 307 to /metrics/, which some
    # scrapers do not follow; both paths answer here.
    for path in ("/metrics", "/metrics/"):
        app.router.routes.append(Route(path, _AsgiEndpoint(guarded), include_in_schema=False))
    for router in (
        health.router,
        datasets.router,
        teachers.router,
        jobs.router,
        exports.router,
        refreshes.router,
        keys.router,
        webhooks.router,
    ):
        app.include_router(router)
    install_dashboard(app)  # the pages at / and /jobs/... (service/dashboard)
    install_openapi(app)
    install_docs(app)
    # The engine's pool holds pool_size + max_overflow connections (service.db.make_engine).
    app.add_middleware(InFlightLimit, limit=2 * settings.database.pool_size)
    return app
