"""Teachers: OpenAI-compatible endpoints with limits and prices; keys are write-only."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Query, Response, status
from sqlalchemy import select

from service.api.deps import PrincipalDep, SessionDep, SettingsDep
from service.api.routing import DocumentedRoute, error_responses
from service.api.schemas import CursorQuery, TeacherCreate, TeacherRead, TeacherUpdate
from service.models import Teacher
from service.pagination import Page, paginate
from service.secrets import key_env_policy
from service.teachers import (
    create_teacher,
    delete_teacher,
    get_teacher,
    teacher_url_policy,
    update_teacher,
)

router = APIRouter(prefix="/v1/teachers", tags=["teachers"], route_class=DocumentedRoute)
_CONFLICT = error_responses(409)  # a name in use; a teacher a job still uses


def to_read(teacher: Teacher) -> TeacherRead:
    return TeacherRead.model_validate(
        {
            **{c: getattr(teacher, c) for c in TeacherRead.model_fields if c != "has_api_key"},
            "has_api_key": bool(teacher.api_key_encrypted or teacher.api_key_env),
        }
    )


@router.post(
    "",
    summary="Create a teacher",
    status_code=status.HTTP_201_CREATED,
    response_model=TeacherRead,
    responses=_CONFLICT,
)
def create(
    body: TeacherCreate, session: SessionDep, principal: PrincipalDep, settings: SettingsDep
) -> TeacherRead:
    key_env_policy(settings).check(
        body.api_key_env, [body.base_url, *body.replica_urls], field="api_key_env"
    )
    teacher = create_teacher(
        session,
        principal.tenant_id,
        body.as_spec(),
        name=body.name,
        api_key=body.api_key,
        allow_private=teacher_url_policy(settings).allows_all([body.base_url, *body.replica_urls]),
    )
    session.commit()
    return to_read(teacher)


@router.get("", summary="List teachers", response_model=Page[TeacherRead])
def list_teachers(
    session: SessionDep,
    principal: PrincipalDep,
    cursor: CursorQuery = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    name: Annotated[str | None, Query(max_length=200, description="Only this name.")] = None,
) -> Page[TeacherRead]:
    stmt = select(Teacher).where(Teacher.tenant_id == principal.tenant_id)
    if name is not None:
        stmt = stmt.where(Teacher.name == name)
    rows, next_cursor = paginate(
        session,
        stmt,
        created_col=Teacher.created_at,
        id_col=Teacher.id,
        cursor=cursor,
        limit=limit,
    )
    return Page[TeacherRead](items=[to_read(r) for r in rows], next_cursor=next_cursor)


@router.get("/{teacher_id}", summary="Read a teacher", response_model=TeacherRead)
def read(teacher_id: uuid.UUID, session: SessionDep, principal: PrincipalDep) -> TeacherRead:
    return to_read(get_teacher(session, principal.tenant_id, teacher_id))


@router.patch(
    "/{teacher_id}", summary="Update a teacher", response_model=TeacherRead, responses=_CONFLICT
)
def update(
    teacher_id: uuid.UUID,
    body: TeacherUpdate,
    session: SessionDep,
    principal: PrincipalDep,
    settings: SettingsDep,
) -> TeacherRead:
    teacher = get_teacher(session, principal.tenant_id, teacher_id)
    changes = {field: getattr(body, field) for field in body.model_fields_set}
    if "structured_mode" in changes and changes["structured_mode"] is not None:
        changes["structured_mode"] = changes["structured_mode"].value
    urls = [changes.get("base_url") or teacher.base_url]
    urls += changes.get("replica_urls") or teacher.replica_urls or []
    # The key's variable and the URLs it is sent to, as they will be after the change: a new
    # URL must not carry an old key elsewhere.
    key_env_policy(settings).check(
        changes.get("api_key_env") or teacher.api_key_env, urls, field="api_key_env"
    )
    update_teacher(
        session, teacher, changes, allow_private=teacher_url_policy(settings).allows_all(urls)
    )
    session.commit()
    return to_read(teacher)


@router.delete(
    "/{teacher_id}",
    summary="Delete a teacher",
    status_code=status.HTTP_204_NO_CONTENT,
    responses=_CONFLICT,
)
def delete(teacher_id: uuid.UUID, session: SessionDep, principal: PrincipalDep) -> Response:
    delete_teacher(session, get_teacher(session, principal.tenant_id, teacher_id))
    session.commit()
    return Response(status_code=status.HTTP_204_NO_CONTENT)
