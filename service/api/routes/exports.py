"""Exports: stream a job's dataset in a format, or request files written by a worker, follow
them and download them."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Annotated, Any, Literal

import anyio
import structlog
from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse, StreamingResponse
from sqlalchemy import select
from starlette.requests import ClientDisconnect
from starlette.types import Receive, Scope, Send

from service.api.deps import PrincipalDep, SessionDep
from service.api.routing import NDJSON, DocumentedRoute, error_responses
from service.api.schemas import ExportCreate, ExportRead, ExportStreamQuery
from service.domain.statuses import ExportStatus
from service.errors import Conflict, NotFound, ValidationFailed
from service.export_files import ExportStream
from service.exports import get_export, request_export
from service.jobs import get_job
from service.models import Export

log = structlog.get_logger(__name__)
router = APIRouter(prefix="/v1", tags=["exports"], route_class=DocumentedRoute)
_CONFLICT = error_responses(409)
GZIP = "application/gzip"
# The streamed and downloaded files: JSON Lines, or the same gzipped.
_FILE = {
    "description": "The dataset file: JSON Lines, one row per line (gzipped with gzip=true).",
    "content": {
        NDJSON: {"schema": {"type": "string"}},
        GZIP: {"schema": {"type": "string", "format": "binary"}},
    },
}


class _ExportResponse(StreamingResponse):
    """A streamed export that always ends its database session: when the body is sent, and
    when the client goes away mid-way (Starlette then cancels the sending; the chunk being
    read finishes first, then the cursor and the session are closed here)."""

    def __init__(self, stream: ExportStream, media_type: str) -> None:
        self._stream = stream
        super().__init__(
            self._body(),
            media_type=media_type,
            headers={"Content-Disposition": f'attachment; filename="{stream.file_name}"'},
        )

    async def _body(self) -> Any:
        while (chunk := await anyio.to_thread.run_sync(next, self._stream, None)) is not None:
            yield chunk

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except ClientDisconnect:  # the body could not be sent: nothing to answer
            log.info("export.stream_disconnected", job_id=str(self._stream.plan.job.id))
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self._stream.close)


@router.get(
    "/jobs/{job_id}/export",
    summary="Stream a job's dataset",
    response_class=StreamingResponse,
    responses={**_CONFLICT, 200: _FILE},
)
def stream_export(
    job_id: uuid.UUID,
    query: Annotated[ExportStreamQuery, Query()],
    request: Request,
    session: SessionDep,
    principal: PrincipalDep,
) -> StreamingResponse:
    """Streams the dataset in a format, as it is read (memory independent of its size): the
    best dataset by default, narrowed by the selection; with a `validation_fraction`, the
    `split` file of the deterministic stratified split. The same selection of the same data
    gives the same bytes as `distill export` and the exports a worker writes."""
    get_job(session, principal.tenant_id, job_id)
    session.commit()  # the stream reads in a session of its own; this one holds nothing open
    stream = ExportStream(
        request.app.state.session_factory,
        job_id,
        query.format,
        query.selection,
        split=query.split,
        gzip=query.gzip,
    )
    return _ExportResponse(stream, GZIP if query.gzip else NDJSON)


@router.post(
    "/jobs/{job_id}/exports",
    summary="Write an export to files",
    status_code=202,
    response_model=ExportRead,
    responses=_CONFLICT,
)
def create_export(
    job_id: uuid.UUID, body: ExportCreate, session: SessionDep, principal: PrincipalDep
) -> Export:
    """Starts writing the export's files and manifest (the best dataset by default: seed rows
    plus the accepted examples of the included iterations up to the best one); follow the
    returned export until it has succeeded, then download its file(s)."""
    export = request_export(
        session,
        get_job(session, principal.tenant_id, job_id),
        body.format,
        body.selection,
        gzip=body.gzip,
    )
    session.commit()
    return export


@router.get(
    "/jobs/{job_id}/exports", summary="List a job's exports", response_model=list[ExportRead]
)
def list_exports(job_id: uuid.UUID, session: SessionDep, principal: PrincipalDep) -> list[Export]:
    job = get_job(session, principal.tenant_id, job_id)
    return list(
        session.scalars(
            select(Export).where(Export.job_id == job.id).order_by(Export.created_at.desc())
        )
    )


@router.get("/exports/{export_id}", summary="Read an export", response_model=ExportRead)
def read_export(export_id: uuid.UUID, session: SessionDep, principal: PrincipalDep) -> Export:
    return get_export(session, principal.tenant_id, export_id)


@router.get(
    "/exports/{export_id}/download",
    summary="Download an export's file",
    response_class=FileResponse,
    responses={**_CONFLICT, 200: _FILE},
)
def download_export(
    export_id: uuid.UUID,
    session: SessionDep,
    principal: PrincipalDep,
    split: Annotated[
        Literal["train", "validation"] | None,
        Query(description="Of a split export: which file (default train)."),
    ] = None,
) -> FileResponse:
    export = get_export(session, principal.tenant_id, export_id)
    if export.status is not ExportStatus.succeeded or not export.path:
        raise Conflict(
            f"export {export_id} is {export.status.value}", details={"status": export.status.value}
        )
    files = export.manifest.get("files") or {}
    path = Path(export.path)
    if split is not None and split not in (files or {"train": None}):
        raise ValidationFailed(
            f"split: export {export_id} has no {split} file",
            details=[{"field": "split", "message": f"one of {sorted(files) or ['train']}"}],
        )
    if split is not None and files:
        path = path.with_name(files[split]["file"])
    if not path.is_file():
        raise NotFound(f"the file of export {export_id} is no longer on disk; export again")
    media = GZIP if path.suffix == ".gz" else NDJSON
    return FileResponse(path, media_type=media, filename=path.name)
