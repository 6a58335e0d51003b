"""Dataset uploads: JSONL validated line by line, content-hashed, stored whole or not at all."""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterable
from typing import Any

from sqlalchemy import func, insert, select
from sqlalchemy.orm import Session

from service.errors import NotFound, ValidationFailed
from service.models import Dataset, DatasetRow

MAX_REPORTED_ERRORS = 20


def parse_jsonl(data: bytes) -> list[dict[str, Any]]:
    """Parse JSONL; every bad line is reported with its 1-based number, nothing is kept on error."""
    rows: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValidationFailed(
            "the file is not UTF-8",
            details=[{"line": data.count(b"\n", 0, exc.start) + 1, "message": str(exc)}],
        ) from exc
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue  # blank lines (e.g. a trailing newline) carry no row
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            errors.append(
                {"line": number, "message": f"invalid JSON: {exc.msg} at column {exc.colno}"}
            )
        else:
            if not isinstance(value, dict):
                errors.append({"line": number, "message": "each line must be a JSON object"})
            elif not value:
                errors.append({"line": number, "message": "empty object"})
            else:
                rows.append(value)
        if len(errors) >= MAX_REPORTED_ERRORS:
            break
    if errors:
        first = errors[0]
        raise ValidationFailed(
            f"line {first['line']}: {first['message']}", details=errors, code="invalid_jsonl"
        )
    if not rows:
        raise ValidationFailed("the dataset has no rows", details=[{"line": 1, "message": "empty"}])
    return rows


def content_hash(rows: Iterable[dict[str, Any]]) -> str:
    digest = hashlib.sha256()
    for row in rows:
        digest.update(json.dumps(row, sort_keys=True, ensure_ascii=False).encode())
        digest.update(b"\n")
    return digest.hexdigest()


def create_dataset(
    session: Session, tenant_id: uuid.UUID, name: str, rows: list[dict[str, Any]], size_bytes: int
) -> Dataset:
    fields = sorted({key for row in rows for key in row})
    dataset = Dataset(
        tenant_id=tenant_id,
        name=name,
        content_hash=content_hash(rows),
        row_count=len(rows),
        size_bytes=size_bytes,
        fields=fields,
    )
    session.add(dataset)
    session.flush()
    session.execute(
        insert(DatasetRow),
        [
            {"id": uuid.uuid4(), "dataset_id": dataset.id, "index": i, "data": row}
            for i, row in enumerate(rows)
        ],
    )
    return dataset


def get_dataset(session: Session, tenant_id: uuid.UUID, dataset_id: uuid.UUID) -> Dataset:
    dataset = session.get(Dataset, dataset_id)
    if dataset is None or dataset.tenant_id != tenant_id:
        raise NotFound(f"dataset {dataset_id} not found")
    return dataset


def preview_rows(session: Session, dataset_id: uuid.UUID, limit: int) -> list[DatasetRow]:
    stmt = (
        select(DatasetRow)
        .where(DatasetRow.dataset_id == dataset_id)
        .order_by(DatasetRow.index)
        .limit(limit)
    )
    return list(session.scalars(stmt))


def load_rows(session: Session, dataset_id: uuid.UUID) -> list[DatasetRow]:
    stmt = select(DatasetRow).where(DatasetRow.dataset_id == dataset_id).order_by(DatasetRow.index)
    return list(session.scalars(stmt))


def count_rows(session: Session, dataset_id: uuid.UUID) -> int:
    stmt = select(func.count()).where(DatasetRow.dataset_id == dataset_id)
    return int(session.scalar(stmt) or 0)
