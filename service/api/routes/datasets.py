"""Datasets: upload JSONL (a file or an NDJSON body), list, get with a row preview."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Query, Request, status
from fastapi.concurrency import run_in_threadpool
from sqlalchemy import select
from starlette.datastructures import UploadFile

from service.api.deps import PrincipalDep, SessionDep, SettingsDep
from service.api.schemas import DatasetDetail, DatasetRead, DatasetRowRead, ErrorBody
from service.datasets import create_dataset, get_dataset, parse_jsonl, preview_rows
from service.errors import PayloadTooLarge, ValidationFailed
from service.models import Dataset
from service.pagination import Page, paginate

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])

_ERRORS: dict[int | str, dict[str, object]] = {
    401: {"model": ErrorBody},
    403: {"model": ErrorBody},  # a job-scoped API key
    413: {"model": ErrorBody},
    422: {"model": ErrorBody},
}


async def _read_limited(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"upload is larger than the limit of {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"upload is larger than the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=DatasetRead,
    responses=_ERRORS,
    openapi_extra={
        "requestBody": {
            "content": {
                "application/x-ndjson": {"schema": {"type": "string"}},
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
    session: SessionDep,
    principal: PrincipalDep,
    settings: SettingsDep,
    name: Annotated[str | None, Query(max_length=200)] = None,
) -> Dataset:
    """Upload JSONL rows. A bad line is a 422 naming it; a rejected upload stores nothing."""
    limit = settings.api.max_upload_bytes
    body = await _read_limited(request, limit)
    content_type = request.headers.get("content-type", "")
    data = body
    if content_type.startswith("multipart/form-data"):
        request._body = body  # starlette re-reads the cached body when parsing the form
        form = await request.form(max_part_size=limit)
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise ValidationFailed(
                "multipart upload needs a 'file' part",
                details=[{"field": "file", "message": "missing"}],
            )
        data = await upload.read()
        name = name or upload.filename
        await form.close()
    rows = parse_jsonl(data)

    def _store() -> Dataset:
        dataset = create_dataset(
            session, principal.tenant_id, name or "dataset", rows, size_bytes=len(data)
        )
        session.commit()
        return dataset

    return await run_in_threadpool(_store)


@router.get("", response_model=Page[DatasetRead], responses=_ERRORS)
def list_datasets(
    session: SessionDep,
    principal: PrincipalDep,
    settings: SettingsDep,
    cursor: str | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> Page[DatasetRead]:
    stmt = select(Dataset).where(Dataset.tenant_id == principal.tenant_id)
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


@router.get("/{dataset_id}", response_model=DatasetDetail, responses={404: {"model": ErrorBody}})
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
