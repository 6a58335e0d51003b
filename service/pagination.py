"""Cursor pagination over (created_at, id), newest first: stable under concurrent inserts."""

from __future__ import annotations

import base64
import re
import struct
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any, Generic, TypeVar

from pydantic import BaseModel
from sqlalchemy import Select, and_, or_
from sqlalchemy.orm import InstrumentedAttribute, Session

from service.errors import ValidationFailed

T = TypeVar("T")


class Page(BaseModel, Generic[T]):
    items: list[T]
    next_cursor: str | None = None


# A cursor is the page's last (created_at, id): microseconds since the epoch (8 bytes, signed)
# and the UUID (16 bytes), base64url without padding, so exactly 32 characters. Every string of
# that shape decodes to a position, so the OpenAPI pattern below and the code agree on which
# cursors are valid (issue 11: a cursor the schema allowed was refused).
CURSOR_PATTERN = r"^[A-Za-z0-9_-]{32}$"
_CURSOR = struct.Struct(">q16s")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_EARLIEST = datetime.min.replace(tzinfo=UTC)
_LATEST = datetime.max.replace(tzinfo=UTC)


def encode_cursor(created_at: datetime, row_id: uuid.UUID) -> str:
    if created_at.tzinfo is None:  # SQLite gives back the UTC wall clock without a zone
        created_at = created_at.replace(tzinfo=UTC)
    micros = (created_at - _EPOCH) // timedelta(microseconds=1)
    return base64.urlsafe_b64encode(_CURSOR.pack(micros, row_id.bytes)).decode()


def decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    if not re.fullmatch(CURSOR_PATTERN, cursor):
        raise ValidationFailed(
            "invalid cursor",
            details=[{"field": "cursor", "message": "a next_cursor of an earlier page"}],
        )
    micros, row_id = _CURSOR.unpack(base64.urlsafe_b64decode(cursor))
    try:
        created = _EPOCH + timedelta(microseconds=micros)
    except OverflowError:  # beyond the dates Python holds: before or after every row
        created = _LATEST if micros > 0 else _EARLIEST
    return created, uuid.UUID(bytes=row_id)


def paginate(
    session: Session,
    stmt: Select[Any],
    *,
    created_col: InstrumentedAttribute[datetime],
    id_col: InstrumentedAttribute[uuid.UUID],
    cursor: str | None,
    limit: int,
    ascending: bool = False,
) -> tuple[list[Any], str | None]:
    """Returns one page of ORM rows and the cursor of the next page (None at the end)."""
    if cursor:
        created, row_id = decode_cursor(cursor)
        if ascending:
            cond = or_(created_col > created, and_(created_col == created, id_col > row_id))
        else:
            cond = or_(created_col < created, and_(created_col == created, id_col < row_id))
        stmt = stmt.where(cond)
    order = (created_col.asc(), id_col.asc()) if ascending else (created_col.desc(), id_col.desc())
    rows = list(session.scalars(stmt.order_by(*order).limit(limit + 1)))
    next_cursor = None
    if len(rows) > limit:
        rows = rows[:limit]
        last = rows[-1]
        next_cursor = encode_cursor(getattr(last, created_col.key), getattr(last, id_col.key))
    return rows, next_cursor
