"""Datasets: upload JSONL (a file or an NDJSON body), list, get with a row preview, delete."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response, status
from fastapi.concurrency import run_in_threadpool
from sqlalchemy import select
from starlette.datastructures import UploadFile
from starlette.requests import ClientDisconnect
from starlette.types import Message

from service.api.deps import PrincipalDep, SessionDep, SettingsDep
from service.api.routing import NDJSON, DocumentedRoute, error_responses
from service.api.schemas import CursorQuery, DatasetDetail, DatasetRead, DatasetRowRead
from service.datasets import (
    CHUNK_ROWS,
    DatasetWriter,
    JsonlStream,
    delete_dataset,
    get_dataset,
    preview_rows,
    same_upload,
)
from service.errors import PayloadTooLarge, ValidationFailed
from service.models import Dataset
from service.pagination import Page, paginate

router = APIRouter(prefix="/v1/datasets", tags=["datasets"], route_class=DocumentedRoute)
_READ_BYTES = 256 * 1024


def _limited(request: Request, limit: int) -> Request:
    """The same request, refusing (413) once more than `limit` bytes of body arrived."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"upload is larger than the limit of {limit} bytes")
    size = 0
    receive = request.receive

    async def counted() -> Message:
        nonlocal size
        message = await receive()
        if message["type"] == "http.request":
            size += len(message.get("body", b""))
            if size > limit:
                raise PayloadTooLarge(f"upload is larger than the limit of {limit} bytes")
        return message

    return Request(request.scope, counted)


async def _file_chunks(upload: UploadFile) -> AsyncIterator[bytes]:
    while chunk := await upload.read(_READ_BYTES):
        yield chunk


@router.post(
    "",
    summary="Upload a dataset",
    status_code=status.HTTP_201_CREATED,
    response_model=DatasetRead,
    responses={
        **error_responses(413),
        200: {"model": DatasetRead, "description": "The same upload again: the earlier dataset"},
    },
    openapi_extra={
        "requestBody": {
            "content": {
                NDJSON: {"schema": {"type": "string"}},
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "properties": {"file": {"type": "string", "format": "binary"}},
                        "required": ["file"],
                    }
                },
            },
            "required": True,
        }
    },
)
async def upload_dataset(
    request: Request,
    response: Response,
    session: SessionDep,
    principal: PrincipalDep,
    settings: SettingsDep,
    name: Annotated[str | None, Query(max_length=200)] = None,
) -> Dataset:
    """Upload JSONL rows. A bad line is a 422 naming it; a rejected upload stores nothing.

    The body is parsed and stored as it arrives, in chunks of rows (memory does not grow with
    the row count), in one transaction committed at the end: a client that goes away stops
    the work and nothing is stored. The same upload again (same name and content) answers
    200 with the dataset stored the first time.
    """
    limited = _limited(request, settings.api.max_upload_bytes)
    chunks: AsyncIterator[bytes]
    form = None
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        # Starlette spools a file part to disk past 1 MiB: read back in chunks below.
        form = await limited.form(max_part_size=settings.api.max_upload_bytes)
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise ValidationFailed(
                "multipart upload needs a 'file' part",
                details=[{"field": "file", "message": "missing"}],
            )
        name = name or upload.filename
        chunks = _file_chunks(upload)
    else:
        chunks = limited.stream()
    try:
        stream = JsonlStream()
        writer = await run_in_threadpool(
            DatasetWriter, session, principal.tenant_id, name or "dataset"
        )
        size = 0
        try:
            async for chunk in chunks:
                size += len(chunk)
                for line, row in stream.feed(chunk):
                    if stream.errors:  # after a bad line, only look for more errors
                        continue
                    writer.add(line, row)
                    if writer.pending >= CHUNK_ROWS:
                        await run_in_threadpool(writer.flush)
        except ClientDisconnect:
            await run_in_threadpool(session.rollback)
            raise ValidationFailed(
                "the client went away before the upload was complete; nothing was stored",
                details=[{"field": "body", "message": "incomplete"}],
            ) from None
        for line, row in stream.close():
            if not stream.errors:
                writer.add(line, row)
        stream.raise_errors()

        def store() -> Dataset:
            dataset = writer.finish(size)
            earlier = same_upload(session, dataset)
            if earlier is not None:
                session.rollback()
                response.status_code = status.HTTP_200_OK
                return earlier
            session.commit()
            return dataset

        return await run_in_threadpool(store)
    finally:
        if form is not None:
            await form.close()


@router.get("", summary="List datasets", response_model=Page[DatasetRead])
def list_datasets(
    session: SessionDep,
    principal: PrincipalDep,
    settings: SettingsDep,
    cursor: CursorQuery = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    name: Annotated[
        str | None,
        Query(max_length=200, description="Only datasets with this name (a job spec's name)."),
    ] = None,
) -> Page[DatasetRead]:
    stmt = select(Dataset).where(Dataset.tenant_id == principal.tenant_id)
    if name is not None:
        stmt = stmt.where(Dataset.name == name)
    rows, next_cursor = paginate(
        session,
        stmt,
        created_col=Dataset.created_at,
        id_col=Dataset.id,
        cursor=cursor,
        limit=min(limit, settings.api.max_page_size),
    )
    return Page[DatasetRead](
        items=[DatasetRead.model_validate(r) for r in rows], next_cursor=next_cursor
    )


@router.get(
    "/{dataset_id}",
    summary="Read a dataset with a preview of its rows",
    response_model=DatasetDetail,
)
def read_dataset(
    dataset_id: uuid.UUID,
    session: SessionDep,
    principal: PrincipalDep,
    preview: Annotated[int, Query(ge=0, le=100)] = 10,
) -> DatasetDetail:
    dataset = get_dataset(session, principal.tenant_id, dataset_id)
    rows = preview_rows(session, dataset.id, preview)
    return DatasetDetail.model_validate(
        {
            **DatasetRead.model_validate(dataset).model_dump(),
            "preview": [DatasetRowRead.model_validate(r) for r in rows],
        }
    )


@router.delete(
    "/{dataset_id}",
    summary="Delete a dataset and its rows",
    status_code=status.HTTP_204_NO_CONTENT,
    responses=error_responses(409),  # a job still uses it: delete the job first
)
def delete(dataset_id: uuid.UUID, session: SessionDep, principal: PrincipalDep) -> Response:
    """Refused with 409, naming the jobs, while a job uses the dataset: a job's examples and
    predictions point at the rows it trained and was evaluated on."""
    delete_dataset(session, get_dataset(session, principal.tenant_id, dataset_id))
    session.commit()
    return Response(status_code=status.HTTP_204_NO_CONTENT)
