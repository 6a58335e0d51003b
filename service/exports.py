"""Export requests: a row that tracks the file a worker writes (JSONL + manifest)."""

from __future__ import annotations

import uuid

from sqlalchemy.orm import Session

from service import tasks
from service.domain.export_formats import ALL_FORMATS, PREFERENCE_FORMATS
from service.domain.statuses import ExportStatus
from service.errors import NotFound, ValidationFailed
from service.models import Export, Job


def request_export(session: Session, job: Job, fmt: str, iteration: int | None = None) -> Export:
    if fmt not in ALL_FORMATS:
        raise ValidationFailed(
            f"format: unknown export format {fmt!r}",
            details=[{"field": "format", "message": f"one of {sorted(ALL_FORMATS)}"}],
        )
    if fmt in PREFERENCE_FORMATS and job.strategy != "arte":
        raise ValidationFailed(
            f"format: {fmt!r} exports preference pairs, which only the arte strategy stores "
            f"(this job is {job.strategy})",
            details=[{"field": "format", "message": "use jsonl, lineage or chat"}],
        )
    if iteration is not None and iteration > job.current_iteration:
        raise ValidationFailed(
            f"iteration: the job has no iteration {iteration} yet",
            details=[{"field": "iteration", "message": f"latest is {job.current_iteration}"}],
        )
    export = Export(job_id=job.id, format=fmt, status=ExportStatus.pending, iteration=iteration)
    session.add(export)
    session.flush()
    tasks.enqueue(session, tasks.EXPORT_WRITE, str(export.id))
    return export


def get_export(session: Session, tenant_id: uuid.UUID, export_id: uuid.UUID) -> Export:
    export = session.get(Export, export_id)
    job = session.get(Job, export.job_id) if export is not None else None
    if export is None or job is None or job.tenant_id != tenant_id:
        raise NotFound(f"export {export_id} not found")
    return export
