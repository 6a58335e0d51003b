"""Exports: request a JSONL snapshot of a job's best dataset, follow it, download it."""

from __future__ import annotations

import uuid
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse
from sqlalchemy import select

from service.api.deps import PrincipalDep, SessionDep
from service.api.schemas import ErrorBody, ExportCreate, ExportRead
from service.domain.statuses import ExportStatus
from service.errors import Conflict
from service.exports import get_export, request_export
from service.jobs import get_job
from service.models import Export

router = APIRouter(prefix="/v1", tags=["exports"])
_ERRORS: dict[int | str, dict[str, object]] = {
    401: {"model": ErrorBody},
    403: {"model": ErrorBody},  # a job-scoped API key outside what it may do
    404: {"model": ErrorBody},
    409: {"model": ErrorBody},
    422: {"model": ErrorBody},
}


@router.post(
    "/jobs/{job_id}/exports", status_code=202, response_model=ExportRead, responses=_ERRORS
)
def create_export(
    job_id: uuid.UUID, body: ExportCreate, session: SessionDep, principal: PrincipalDep
) -> Export:
    """Starts writing the best dataset (seed rows + accepted examples of included iterations
    up to the best one, or up to `iteration`); follow the returned export until it has
    succeeded."""
    export = request_export(
        session, get_job(session, principal.tenant_id, job_id), body.format, body.iteration
    )
    session.commit()
    return export


@router.get("/jobs/{job_id}/exports", response_model=list[ExportRead], responses=_ERRORS)
def list_exports(job_id: uuid.UUID, session: SessionDep, principal: PrincipalDep) -> list[Export]:
    job = get_job(session, principal.tenant_id, job_id)
    return list(
        session.scalars(
            select(Export).where(Export.job_id == job.id).order_by(Export.created_at.desc())
        )
    )


@router.get("/exports/{export_id}", response_model=ExportRead, responses=_ERRORS)
def read_export(export_id: uuid.UUID, session: SessionDep, principal: PrincipalDep) -> Export:
    return get_export(session, principal.tenant_id, export_id)


@router.get(
    "/exports/{export_id}/download",
    response_class=FileResponse,
    responses={**_ERRORS, 200: {"content": {"application/x-ndjson": {}}}},
)
def download_export(
    export_id: uuid.UUID, session: SessionDep, principal: PrincipalDep
) -> FileResponse:
    export = get_export(session, principal.tenant_id, export_id)
    if export.status is not ExportStatus.succeeded or not export.path:
        raise Conflict(
            f"export {export_id} is {export.status.value}", details={"status": export.status.value}
        )
    path = Path(export.path)
    return FileResponse(path, media_type="application/x-ndjson", filename=path.name)
