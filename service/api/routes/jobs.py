"""Jobs, their iterations and examples; the job spec's JSON Schema."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Body, Header, Path, Query, Request, Response, status
from fastapi.concurrency import run_in_threadpool

from service.api.deps import PrincipalDep, SessionDep, SettingsDep
from service.api.routing import JSON, NDJSON, DocumentedRoute, component_ref, error_responses
from service.api.schemas import PG_INT_MAX, CursorQuery, ExampleRead, IterationRead, JobRead
from service.domain.spec import JobSpec, StrategyName, Text, job_json_schema
from service.domain.statuses import ExampleStatus, JobStatus
from service.domain.strategies.base import ExampleKind
from service.examples import ExampleFilters
from service.examples import list_examples as find_examples
from service.feedback import FeedbackBody, evaluation_rows, parse_feedback, post_feedback
from service.jobs import (
    create_job,
    delete_job,
    get_iteration,
    get_job,
    parse_spec,
    request_transition,
)
from service.jobs import (
    list_iterations as find_iterations,
)
from service.jobs import (
    list_jobs as find_jobs,
)
from service.models import Iteration, Job
from service.pagination import Page
from service.secrets import key_env_policy
from service.splits import without_private_keys
from service.teachers import teacher_url_policy

router = APIRouter(prefix="/v1", tags=["jobs"], route_class=DocumentedRoute)
# Iteration numbers are a Postgres integer: a larger one is a 422, not a query that fails.
IterationNumber = Annotated[int, Path(ge=0, le=PG_INT_MAX, description="Iteration number.")]
_CONFLICT = error_responses(409)  # a transition the job's status does not allow


def job_read(job: Job) -> JobRead:
    read = JobRead.model_validate(job)
    read.spec = without_private_keys(job.spec)
    return read


@router.get("/schemas/job", summary="Read the job spec's JSON Schema", tags=["schemas"])
def job_schema() -> dict[str, Any]:
    """JSON Schema of the job spec (the same document as the CLI's YAML)."""
    return job_json_schema()


@router.post(
    "/jobs",
    summary="Create a job",
    status_code=status.HTTP_201_CREATED,
    response_model=JobRead,
    # The spec is parsed by parse_spec (its errors name the field); the document shows its
    # schema, the one /v1/schemas/job serves.
    openapi_extra={"requestBody": {"content": {JSON: {"schema": component_ref(JobSpec)}}}},
    responses={**_CONFLICT, 200: {"model": JobRead, "description": "Replayed Idempotency-Key"}},
)
def create(
    request: Request,
    response: Response,
    session: SessionDep,
    principal: PrincipalDep,
    settings: SettingsDep,
    spec: Annotated[dict[str, Any], Body(description="A job spec; see /v1/schemas/job.")],
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
) -> JobRead:
    job, created = create_job(
        session,
        principal.tenant_id,
        parse_spec(spec),
        idempotency_key=idempotency_key,
        allow_trainer_command=settings.api.allow_trainer_commands,
        teacher_policy=teacher_url_policy(settings),
        key_envs=key_env_policy(settings),
        local_teacher=request.app.state.local_teacher,
    )
    session.commit()
    if not created:
        response.status_code = status.HTTP_200_OK
    return job_read(job)


@router.get("/jobs", summary="List jobs", response_model=Page[JobRead])
def list_jobs(
    session: SessionDep,
    principal: PrincipalDep,
    status_: Annotated[JobStatus | None, Query(alias="status")] = None,
    strategy: StrategyName | None = None,
    cursor: CursorQuery = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> Page[JobRead]:
    rows, next_cursor = find_jobs(
        session,
        principal.tenant_id,
        status=status_,
        strategy=strategy,
        cursor=cursor,
        limit=limit,
    )
    return Page[JobRead](items=[job_read(r) for r in rows], next_cursor=next_cursor)


@router.get("/jobs/{job_id}", summary="Read a job", response_model=JobRead)
def read(job_id: uuid.UUID, session: SessionDep, principal: PrincipalDep) -> JobRead:
    return job_read(get_job(session, principal.tenant_id, job_id))


def _transition(job_id: uuid.UUID, target: JobStatus, session: Any, principal: Any) -> JobRead:
    job = request_transition(session, get_job(session, principal.tenant_id, job_id), target)
    session.commit()
    return job_read(job)


@router.post(
    "/jobs/{job_id}/cancel",
    summary="Cancel a job",
    status_code=202,
    response_model=JobRead,
    responses=_CONFLICT,
)
def cancel(job_id: uuid.UUID, session: SessionDep, principal: PrincipalDep) -> JobRead:
    """Stops the job within one generation batch."""
    return _transition(job_id, JobStatus.cancelled, session, principal)


@router.delete(
    "/jobs/{job_id}",
    summary="Delete a finished job",
    status_code=status.HTTP_204_NO_CONTENT,
    responses=_CONFLICT,
)
def delete(job_id: uuid.UUID, session: SessionDep, principal: PrincipalDep) -> Response:
    """Deletes a finished (succeeded, failed or cancelled) job and everything it stored; its
    teacher's cached calls stay. 409 while it is queued, running or paused: cancel it first."""
    delete_job(session, get_job(session, principal.tenant_id, job_id))
    session.commit()
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post(
    "/jobs/{job_id}/pause",
    summary="Pause a job",
    status_code=202,
    response_model=JobRead,
    responses=_CONFLICT,
)
def pause(job_id: uuid.UUID, session: SessionDep, principal: PrincipalDep) -> JobRead:
    return _transition(job_id, JobStatus.paused, session, principal)


@router.post(
    "/jobs/{job_id}/resume",
    summary="Resume a paused job",
    status_code=202,
    response_model=JobRead,
    responses=_CONFLICT,
)
def resume(job_id: uuid.UUID, session: SessionDep, principal: PrincipalDep) -> JobRead:
    return _transition(job_id, JobStatus.running, session, principal)


@router.get(
    "/jobs/{job_id}/iterations",
    summary="List a job's iterations",
    response_model=list[IterationRead],
)
def list_iterations(
    job_id: uuid.UUID, session: SessionDep, principal: PrincipalDep
) -> list[Iteration]:
    return find_iterations(session, get_job(session, principal.tenant_id, job_id))


@router.get(
    "/jobs/{job_id}/iterations/{number}",
    summary="Read an iteration",
    response_model=IterationRead,
)
def read_iteration(
    job_id: uuid.UUID, number: IterationNumber, session: SessionDep, principal: PrincipalDep
) -> Iteration:
    return get_iteration(session, get_job(session, principal.tenant_id, job_id), number)


@router.get(
    "/jobs/{job_id}/examples", summary="List a job's examples", response_model=Page[ExampleRead]
)
def list_examples(
    job_id: uuid.UUID,
    session: SessionDep,
    principal: PrincipalDep,
    iteration: Annotated[
        int | None, Query(ge=0, le=PG_INT_MAX, description="Iteration number.")
    ] = None,
    kind: ExampleKind | None = None,
    status_: Annotated[ExampleStatus | None, Query(alias="status")] = None,
    label: Annotated[Text | None, Query(description="Output/label equals.")] = None,
    q: Annotated[
        Text | None,
        Query(
            max_length=200,
            description="Case-insensitive text found in the input, output or rationale.",
        ),
    ] = None,
    cursor: CursorQuery = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> Page[ExampleRead]:
    job = get_job(session, principal.tenant_id, job_id)
    filters = ExampleFilters(
        iteration=iteration,
        kind=kind.value if kind is not None else None,
        status=status_,
        label=label,
        text=q,
    )
    rows, next_cursor = find_examples(session, job, filters, cursor=cursor, limit=limit)
    return Page[ExampleRead](
        items=[ExampleRead.model_validate(r) for r in rows], next_cursor=next_cursor
    )


@router.get("/jobs/{job_id}/evaluation-rows", summary="List the rows an external student predicts")
def list_evaluation_rows(
    job_id: uuid.UUID, session: SessionDep, principal: PrincipalDep
) -> list[dict[str, Any]]:
    """The rows an external student predicts each iteration, with the ids to post back."""
    return evaluation_rows(session, get_job(session, principal.tenant_id, job_id))


@router.post(
    "/jobs/{job_id}/iterations/{number}/feedback",
    summary="Post an external student's predictions",
    status_code=202,
    response_model=IterationRead,
    responses=_CONFLICT,
    openapi_extra={
        "requestBody": {
            "content": {
                JSON: {"schema": component_ref(FeedbackBody)},
                NDJSON: {"schema": {"type": "string"}},
                "application/jsonl": {"schema": {"type": "string"}},
            },
            "required": True,
        }
    },
)
async def post_iteration_feedback(
    job_id: uuid.UUID,
    number: IterationNumber,
    request: Request,
    session: SessionDep,
    principal: PrincipalDep,
) -> Iteration:
    """Predictions from the user's own trainer (external student): JSON or JSONL keyed by
    row id. Unknown or missing rows and labels outside the label set are a 422; nothing is
    stored unless the whole feedback is valid. Complete feedback lets the loop continue."""
    items = parse_feedback(await request.body(), request.headers.get("content-type", ""))

    def _store() -> Iteration:
        job = get_job(session, principal.tenant_id, job_id)
        iteration = post_feedback(session, job, number, items)
        session.commit()
        return iteration

    return await run_in_threadpool(_store)
