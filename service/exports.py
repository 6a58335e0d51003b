"""Export requests: a row that tracks the files a worker writes (JSONL + manifest)."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy.orm import Session

from service import tasks
from service.domain.export_formats import ExportSelection
from service.domain.statuses import ExportStatus
from service.errors import NotFound
from service.export_rows import plan_export
from service.models import Export, Job


def request_export(
    session: Session,
    job: Job,
    fmt: str,
    selection: ExportSelection | None = None,
    *,
    gzip: bool = False,
) -> Export:
    """Check the request (a ValidationFailed names the field) and queue the writing."""
    selection = selection or ExportSelection()
    plan_export(session, job, fmt, selection)
    export = Export(
        job_id=job.id,
        format=fmt,
        status=ExportStatus.pending,
        iteration=selection.iteration if isinstance(selection.iteration, int) else None,
        options={
            "selection": selection.model_dump(mode="json", exclude_defaults=True),
            "gzip": gzip,
        },
    )
    session.add(export)
    session.flush()
    tasks.enqueue(session, tasks.EXPORT_WRITE, str(export.id))
    return export


def export_selection(export: Export) -> tuple[ExportSelection, bool]:
    """The selection and gzip flag an export was requested with (rows written before exports
    had options carry only `iteration`)."""
    options: dict[str, Any] = export.options or {}
    selection = dict(options.get("selection") or {})
    if "iteration" not in selection and export.iteration is not None:
        selection["iteration"] = export.iteration
    return ExportSelection.model_validate(selection), bool(options.get("gzip"))


def get_export(session: Session, tenant_id: uuid.UUID, export_id: uuid.UUID) -> Export:
    export = session.get(Export, export_id)
    job = session.get(Job, export.job_id) if export is not None else None
    if export is None or job is None or job.tenant_id != tenant_id:
        raise NotFound(f"export {export_id} not found")
    return export
