"""Refreshes: start the next iteration(s) of a job from its latest student (CI), and follow them."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Header, Response, status

from service.api.deps import PrincipalDep, SessionDep, SettingsDep
from service.api.routing import DocumentedRoute, error_responses
from service.api.schemas import IterationRead, RefreshRead
from service.jobs import get_job
from service.models import JobRefresh
from service.refreshes import (
    RefreshCreate,
    get_refresh,
    list_refreshes,
    refresh_state,
    request_refresh,
)
from service.secrets import key_env_policy
from service.splits import without_private_keys
from service.teachers import teacher_url_policy

router = APIRouter(prefix="/v1/jobs", tags=["refreshes"], route_class=DocumentedRoute)


def refresh_read(session: SessionDep, refresh: JobRefresh) -> RefreshRead:
    state = refresh_state(session, refresh)
    return RefreshRead(
        id=refresh.id,
        job_id=refresh.job_id,
        status=refresh.status.value,
        outcome=state.outcome,
        note=refresh.note,
        student=without_private_keys(refresh.student),
        extra_budget=refresh.extra_budget,
        student_iteration=state.student_iteration,
        iteration=refresh.iteration,
        dataset_iteration=state.dataset_iteration,
        metric=state.metric,
        baseline_metric=refresh.baseline_metric,
        job_status=state.job.status,
        job_status_reason=state.job.status_reason,
        best_iteration=state.job.best_iteration,
        iterations=[IterationRead.model_validate(it) for it in state.iterations],
        created_at=refresh.created_at,
        started_at=refresh.started_at,
    )


@router.post(
    "/{job_id}/refresh",
    summary="Refresh a job from its latest student",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=RefreshRead,
    responses={
        **error_responses(409),
        200: {"model": RefreshRead, "description": "Replayed Idempotency-Key"},
    },
)
def refresh(
    job_id: uuid.UUID,
    response: Response,
    session: SessionDep,
    principal: PrincipalDep,
    settings: SettingsDep,
    body: RefreshCreate | None = None,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
) -> RefreshRead:
    """Start the next iteration(s) of a finished or paused job (or of a running one, once its
    current iteration completes), aimed at the errors of its latest student: the loop's own,
    the predictions posted to the last iteration (external), or the served model, which may
    have a new name or URL (endpoint; it is evaluated first). 202 with the refresh, which
    names its iterations as the loop plans them; follow it with GET …/refreshes/{id} until
    `outcome` is no longer `waiting`. The same Idempotency-Key returns the same refresh (200)."""
    job = get_job(session, principal.tenant_id, job_id)
    body = body or RefreshCreate()
    # A served student is a model server like a teacher: the same operator policy.
    student_url = body.student.base_url if body.student else None
    refresh, created = request_refresh(
        session,
        job,
        body,
        idempotency_key=idempotency_key,
        api_key_id=principal.api_key_id,
        allow_private=teacher_url_policy(settings).allows(student_url or ""),
        key_envs=key_env_policy(settings),
    )
    session.commit()
    if not created:
        response.status_code = status.HTTP_200_OK
    return refresh_read(session, refresh)


@router.get(
    "/{job_id}/refreshes", summary="List a job's refreshes", response_model=list[RefreshRead]
)
def list_job_refreshes(
    job_id: uuid.UUID, session: SessionDep, principal: PrincipalDep
) -> list[RefreshRead]:
    """The job's refreshes, newest first."""
    job = get_job(session, principal.tenant_id, job_id)
    return [refresh_read(session, r) for r in list_refreshes(session, job)]


@router.get(
    "/{job_id}/refreshes/{refresh_id}", summary="Read a refresh", response_model=RefreshRead
)
def read_refresh(
    job_id: uuid.UUID, refresh_id: uuid.UUID, session: SessionDep, principal: PrincipalDep
) -> RefreshRead:
    job = get_job(session, principal.tenant_id, job_id)
    return refresh_read(session, get_refresh(session, job, refresh_id))
