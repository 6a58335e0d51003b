"""FastAPI dependencies: a session per request (the route commits) and the caller's tenant."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from service.auth import Principal, authenticate, check_key_scope
from service.errors import Unauthorized
from service.settings import Settings
from service.tasks import SENDER


def get_session(request: Request) -> Iterator[Session]:
    factory = request.app.state.session_factory
    with factory() as session:
        session.info[SENDER] = request.app.state.task_sender
        try:
            yield session
        except Exception:
            # A failed request writes nothing, and a failed flush (DataError, IntegrityError)
            # leaves the session unusable until it is rolled back.
            session.rollback()
            raise


def get_settings_dep(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


SessionDep = Annotated[Session, Depends(get_session)]
SettingsDep = Annotated[Settings, Depends(get_settings_dep)]


# auto_error=False: a missing key is answered by our own 401 in the one error shape. It is a
# dependency for the OpenAPI security scheme; the header itself is read below, because
# HTTPBearer reports any other scheme (Basic ...) as no header at all.
_bearer = HTTPBearer(auto_error=False, description="An API key from `distill keys create`.")


def get_principal(
    request: Request,
    session: SessionDep,
    _credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    header = request.headers.get("authorization")
    if header:
        scheme = header.partition(" ")[0]
        if scheme.lower() != "bearer":
            raise Unauthorized(
                f"the Authorization scheme must be Bearer, not {scheme[:20]!r} "
                "(expected 'Bearer <api key>')",
                details=[{"field": "Authorization", "message": "scheme must be Bearer"}],
            )
    principal = authenticate(session, header)
    # Every authenticated route passes here, so a job-scoped key is held to its job in one
    # place, deny by default: a route added later is closed to it until listed in auth.py.
    route = request.scope.get("route")
    check_key_scope(
        session,
        principal,
        request.method,
        getattr(route, "path", None),
        request.path_params,
    )
    return principal


PrincipalDep = Annotated[Principal, Depends(get_principal)]
