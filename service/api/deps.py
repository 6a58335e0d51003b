"""FastAPI dependencies: a session per request (the route commits) and the caller's tenant."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from service.auth import Principal, authenticate
from service.settings import Settings
from service.tasks import SENDER


def get_session(request: Request) -> Iterator[Session]:
    factory = request.app.state.session_factory
    with factory() as session:
        session.info[SENDER] = request.app.state.task_sender
        yield session


def get_settings_dep(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


SessionDep = Annotated[Session, Depends(get_session)]
SettingsDep = Annotated[Settings, Depends(get_settings_dep)]


# auto_error=False: a missing key is answered by our own 401 in the one error shape.
_bearer = HTTPBearer(auto_error=False, description="An API key from `distill keys create`.")


def get_principal(
    session: SessionDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    header = f"{credentials.scheme} {credentials.credentials}" if credentials else None
    return authenticate(session, header)


PrincipalDep = Annotated[Principal, Depends(get_principal)]
