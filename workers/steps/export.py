"""Export: write a requested export's files and manifest (service/export_files.py) under the
exports directory, and record where they are."""

from __future__ import annotations

import uuid
from pathlib import Path

from sqlalchemy.orm import Session

from service.domain.export_formats import ExportRow, ExportSelection, Split
from service.domain.statuses import ExportStatus
from service.errors import DistillError
from service.export_files import file_stem, write_files
from service.export_rows import iter_rows, plan_export
from service.exports import export_selection
from service.models import Export, Job
from service.settings import get_settings


def write_export(session: Session, export_id: uuid.UUID, out_dir: Path | None = None) -> None:
    """Write the files of a pending export; a second delivery of a finished one is a no-op."""
    export = session.get(Export, export_id)
    if export is None or export.status is ExportStatus.succeeded:
        return
    job = session.get(Job, export.job_id)
    assert job is not None
    export.status = ExportStatus.running
    session.flush()
    selection, gzip = export_selection(export)
    stem = f"{file_stem(job.name)}-{export.format}-{export.id.hex[:8]}"
    suffix = ".jsonl.gz" if gzip else ".jsonl"

    def name(split: Split | None) -> str:
        return f"{stem}.{split}{suffix}" if split else f"{stem}{suffix}"

    try:
        plan = plan_export(session, job, export.format, selection)
        result = write_files(
            session,
            plan,
            out_dir or get_settings().exports_dir / str(job.id),
            name,
            f"{stem}.manifest.json",
            gzip=gzip,
        )
    except (OSError, ValueError, DistillError) as exc:
        # A full disk, or a request that no longer fits the job: failed with the reason.
        export.status = ExportStatus.failed
        export.error = f"{type(exc).__name__}: {getattr(exc, 'message', None) or exc}"
        session.flush()
        return
    export.status = ExportStatus.succeeded
    export.path = str(result.files["train"])
    export.row_count = result.rows
    export.manifest = result.manifest
    session.flush()


def export_job(
    session: Session,
    job_id: uuid.UUID,
    *,
    fmt: str = "jsonl",
    out_dir: Path | None = None,
    selection: ExportSelection | None = None,
) -> Export:
    """Export in this process (the CLI's `distill run`)."""
    selection = selection or ExportSelection()
    export = Export(
        job_id=job_id,
        format=fmt,
        status=ExportStatus.pending,
        options={"selection": selection.model_dump(mode="json", exclude_defaults=True)},
    )
    session.add(export)
    session.flush()
    write_export(session, export.id, out_dir)
    return export


def best_dataset(session: Session, job: Job, through: int | None = None) -> list[ExportRow]:
    """The rows of the best dataset (or the one up to `through`) in memory, for small jobs."""
    selection = ExportSelection(iteration="best" if through is None else through)
    return list(iter_rows(session, plan_export(session, job, "jsonl", selection)))
